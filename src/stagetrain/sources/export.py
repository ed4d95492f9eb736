"""``stagetrain export``: a run's checkpoint as standalone model weights.

========================= ============================================================
``--format``              writes into ``--out``
========================= ============================================================
``safetensors``           ``model.safetensors`` (every state-dict key, tied tensors
                          stored once per key) and ``model.json``: a model config
                          (``builtin``/``factory``, ``args``, ``weights``) that rebuilds
                          the model with stagetrain
``hf``                    a ``transformers`` directory (``config.json`` +
                          ``model.safetensors``) that ``AutoModelForCausalLM
                          .from_pretrained`` loads; the run's model must be, or wrap, a
                          ``transformers`` ``PreTrainedModel``
========================= ============================================================

Both also get ``export.json`` (the run, checkpoint step, stage and SHA-256). The model is
rebuilt from the run's ``config.yaml`` and loaded with the checkpoint's weights, which
are read safely (``weights_only``, checksum verified); a sharded run's (``parallel:
fsdp``) shards are consolidated first, in one process. The export is written to a
temporary directory and renamed into place, and ``hf`` exports are loaded back and
compared with the run's model before they are kept.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from stagetrain.checkpoint import CheckpointStore, ManifestEntry, load_checkpoint, sha256_file
from stagetrain.config import ModelConfig, load_config
from stagetrain.errors import CheckpointError, ConfigError
from stagetrain.registry import build_model

if TYPE_CHECKING:
    from stagetrain.train.dcp import ShardedEntry

FORMATS = ("safetensors", "hf")
CHECK_TOLERANCE = 1e-5
"""Largest |logit difference| accepted between an ``hf`` export loaded back and the run's model."""


def select_checkpoint(
    run_dir: Path, step: int | None
) -> tuple[dict[str, Any], ManifestEntry | ShardedEntry]:
    """The newest intact checkpoint of ``run_dir``, or the one written at ``step``.

    A sharded run's (``parallel: fsdp``) shards are consolidated into full tensors
    (:func:`stagetrain.train.dcp.select_sharded`); the payload then holds ``model`` only.

    Raises:
        CheckpointError: when the run has no checkpoints, none at ``step``, or the chosen
            file fails its checksum.
    """
    from stagetrain.train import dcp

    if dcp.has_sharded(run_dir / "checkpoints"):
        weights, sharded_entry = dcp.select_sharded(run_dir, step)
        return {"model": weights}, sharded_entry
    store = CheckpointStore(run_dir / "checkpoints")
    if step is None:
        return store.load_latest()
    entries = store.entries()
    chosen = [e for e in entries if e.step == step]
    if not chosen:
        steps = ", ".join(str(e.step) for e in entries) or "none"
        raise CheckpointError(
            f"--checkpoint: {run_dir} has no checkpoint at step {step}; kept steps: {steps}"
        )
    path = store.directory / chosen[0].file
    if not path.is_file() or sha256_file(path) != chosen[0].sha256:
        raise CheckpointError(f"--checkpoint: {path} is missing or fails its checksum")
    return load_checkpoint(path), chosen[0]


def find_transformers_model(model: torch.nn.Module) -> Any | None:
    """``model`` itself when it is a ``transformers`` ``PreTrainedModel``, else the outermost
    such submodule (a wrapper that returns ``.logits``, say), else None."""
    try:
        from transformers import PreTrainedModel
    except ImportError:
        return None
    for _, module in model.named_modules():  # pre-order: the outermost comes first
        if isinstance(module, PreTrainedModel):
            return module
    return None


def untie(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[list[str]]]:
    """A copy of ``state`` in which no two keys share storage (safetensors refuses shared
    tensors), and the groups of keys that did (tied weights)."""
    groups: dict[tuple[str, int], list[str]] = {}
    for key, tensor in state.items():
        groups.setdefault((str(tensor.device), tensor.untyped_storage().data_ptr()), []).append(key)
    tied = [keys for keys in groups.values() if len(keys) > 1]
    shared = {k for keys in tied for k in keys}
    out = {
        k: (v.detach().clone() if k in shared else v.detach()).contiguous().cpu()
        for k, v in state.items()
    }
    return out, tied


@dataclass
class ExportReport:
    """What :func:`export_run` wrote."""

    format: str
    out: Path
    step: int
    stage: str
    parameters: int
    tied: list[list[str]] = field(default_factory=list)
    max_abs_diff: float | None = None

    def lines(self) -> list[str]:
        lines = [
            f"exported step {self.step:,} (stage {self.stage!r}) of the run: "
            f"{self.parameters:,} parameters as {self.format} into {self.out}",
        ]
        if self.tied:
            lines.append("tied weights: " + "; ".join(" = ".join(g) for g in self.tied))
        if self.max_abs_diff is not None:
            lines.append(f"loaded back: max |logits - run's model| = {self.max_abs_diff:.2e}")
        return lines


def _publish(temp: Path, out: Path) -> None:
    """Move the finished export ``temp`` to ``out``, replacing an earlier export there."""
    if out.exists():
        if not out.is_dir() or (any(out.iterdir()) and not (out / "export.json").is_file()):
            raise ConfigError(
                f"--out: {out} exists and is not an earlier export; remove it or choose another"
            )
        old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
        os.replace(out, old / out.name)
        os.replace(temp, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(temp, out)


def _rebuild(run_dir: Path) -> tuple[torch.nn.Module, ModelConfig]:
    """The run's model from its ``config.yaml``, with weights still to be loaded."""
    config_path = run_dir / "config.yaml"
    if not config_path.is_file():
        raise ConfigError(f"RUN: {run_dir} is not a run directory (no config.yaml)")
    config = load_config(config_path)
    if config.model is None:
        raise ConfigError(f"{config_path}: model: the run's config declares no model to rebuild")
    # The weights come from the checkpoint, not from whatever `weights` pointed at then.
    model_config = config.model.model_copy(update={"weights": None})
    model = build_model(model_config, seed=config.seed)
    return model, model_config


def export_run(
    run_dir: str | Path, *, format: str, out: str | Path, step: int | None = None
) -> ExportReport:
    """Export the final (or ``step``'s) checkpoint of ``run_dir`` (see the module docstring).

    Raises:
        ConfigError: on an unknown format, a run whose model is not a ``transformers``
            model (``hf``), or an ``--out`` that holds something else.
        CheckpointError: when the checkpoint is missing, damaged, or does not fit the model.
    """
    if format not in FORMATS:
        raise ConfigError(f"--format: expected one of {', '.join(FORMATS)}, got {format!r}")
    run = Path(run_dir)
    out_dir = Path(out)
    model, model_config = _rebuild(run)
    payload, entry = select_checkpoint(run, step)
    try:
        model.load_state_dict(payload["model"])
    except (RuntimeError, KeyError) as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise CheckpointError(
            f"{run}: the checkpoint at step {entry.step} does not fit the run's model ({first})"
        ) from None
    model.eval()
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    temp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        report = ExportReport(
            format, out_dir, entry.step, entry.stage, sum(p.numel() for p in model.parameters())
        )
        if format == "hf":
            report.max_abs_diff = _write_hf(model, temp, run)
        else:
            report.tied = _write_safetensors(model, model_config, temp, out_dir)
        provenance = {
            "run": str(run.resolve()), "step": entry.step, "stage": entry.stage,
            "checkpoint": entry.file, "checkpoint_sha256": entry.sha256, "format": format,
            "tied": report.tied,
        }  # fmt: skip
        (temp / "export.json").write_text(json.dumps(provenance, indent=1) + "\n")
        _publish(temp, out_dir)
    finally:
        if temp.exists():
            shutil.rmtree(temp, ignore_errors=True)
    return report


def _write_safetensors(
    model: torch.nn.Module, model_config: ModelConfig, temp: Path, out_dir: Path
) -> list[list[str]]:
    from safetensors.torch import save_file

    state, tied = untie(model.state_dict())
    save_file(state, str(temp / "model.safetensors"), metadata={"format": "pt"})
    rebuild = model_config.model_dump(mode="json", exclude_none=True)
    rebuild["weights"] = str((out_dir / "model.safetensors").resolve())
    (temp / "model.json").write_text(json.dumps(rebuild, indent=1) + "\n")
    return tied


@torch.no_grad()
def _write_hf(model: torch.nn.Module, temp: Path, run: Path) -> float:
    hf = find_transformers_model(model)
    if hf is None:
        raise ConfigError(
            f"--format: hf needs a transformers model, but {run}'s model is "
            f"{type(model).__name__} with none inside; use --format safetensors"
        )
    hf.save_pretrained(str(temp))
    from transformers import AutoModelForCausalLM

    loaded = AutoModelForCausalLM.from_pretrained(str(temp), local_files_only=True).eval()
    vocab = int(getattr(hf.config, "vocab_size", 2))
    length = int(min(16, getattr(hf.config, "n_positions", 16) or 16))
    ids = torch.randint(0, vocab, (2, length), generator=torch.Generator().manual_seed(0))
    expected = hf(input_ids=ids).logits
    got = loaded(input_ids=ids).logits
    diff = float((expected - got).abs().max())
    if diff > CHECK_TOLERANCE:
        raise CheckpointError(
            f"export: the saved {type(hf).__name__} does not reproduce the run's model "
            f"(max |logits difference| {diff:.2e} > {CHECK_TOLERANCE:.0e})"
        )
    return diff
