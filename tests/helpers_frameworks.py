"""Shared pieces of the framework-adapter tests: tiny curricula on the standard-library
text, a recorder of every micro-batch the data path fetches, and our own loop's result
to compare the frameworks with."""

from __future__ import annotations

import copy
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from stagetrain import Curriculum, fit, parse_config
from stagetrain.stepdata import CurriculumDataset

CONTEXT = 32
TEXT = {"builtin": "stdlib_text", "args": {"split": "train", "context": CONTEXT, "limit": 3000}}


HF_NAMES = ("transformer.wte.*", "transformer.wpe.*")
"""Token and position embeddings of the Hugging Face GPT-2."""
OUR_GPT = {"builtin": "gpt", "args": {"context": CONTEXT, "width": 32, "layers": 1, "heads": 2}}
OUR_NAMES = ("tokens.*", "positions.*")
"""Token and position embeddings of stagetrain's small GPT (``OUR_GPT``)."""


def two_stage(grad_accum: int = 1, names: tuple[str, str] = HF_NAMES) -> dict[str, Any]:
    """A short-then-long curriculum: warmup, weight decay, an LR multiplier on the token
    embeddings, and a second stage that resets the optimizer, freezes the position
    embeddings and clips gradients (``names``: the two embeddings' patterns)."""
    tokens, positions = names
    config: dict[str, Any] = {
        "name": "frameworks",
        "seed": 0,
        "batch_size": 8,
        "log_every": 100,
        "checkpoint": {"every": "100ba", "keep": 2},
        "stages": [
            {"name": "short", "duration": "6ba", "seq_len": 16, "grad_accum": grad_accum,
             "data": {**TEXT, "name": "text"},
             "optimizer": {"name": "adamw", "lr": 2e-3, "warmup": "2ba", "weight_decay": 0.1,
                           "lr_multipliers": {tokens: 0.5}}},
            {"name": "long", "duration": "6ba", "seq_len": CONTEXT, "grad_accum": grad_accum,
             "handoff": "reset", "freeze": [positions], "data": {**TEXT, "name": "text"},
             "optimizer": {"name": "adamw", "lr": 1e-3, "warmup": "2ba", "weight_decay": 0.1,
                           "grad_clip": 0.5, "lr_multipliers": {tokens: 0.5}}},
        ],
    }  # fmt: skip
    if names == OUR_NAMES:
        config["model"] = OUR_GPT
    return config


def build(config: dict[str, Any], **kwargs: Any) -> Curriculum:
    return Curriculum(parse_config(copy.deepcopy(config)), progress=False, **kwargs)


def tiny_gpt2(seed: int = 0) -> torch.nn.Module:
    """A one-layer GPT-2 built from a config (no download), without dropout."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(seed)
    config = transformers.GPT2Config(vocab_size=256, n_positions=CONTEXT, n_embd=32, n_layer=1,
                                     n_head=2, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                                     bos_token_id=0, eos_token_id=0)  # fmt: skip
    return transformers.GPT2LMHeadModel(config)


class Fetches:
    """Every micro-batch fetched through :class:`CurriculumDataset`, as (stage, indices)."""

    def __init__(self) -> None:
        self.seen: list[tuple[int, tuple[int, ...]]] = []

    def clear(self) -> None:
        self.seen.clear()

    def per_step(self, micro_batches: int) -> list[list[tuple[int, tuple[int, ...]]]]:
        """The fetches grouped by optimizer step."""
        assert len(self.seen) % micro_batches == 0, len(self.seen)
        return [self.seen[i : i + micro_batches] for i in range(0, len(self.seen), micro_batches)]


@pytest.fixture
def fetches(monkeypatch: pytest.MonkeyPatch) -> Iterator[Fetches]:
    record = Fetches()
    original = CurriculumDataset.__getitems__

    def recording(self: CurriculumDataset, keys: Any) -> Any:
        record.seen.append((keys.stage, tuple(int(i) for i in keys.indices)))
        return original(self, keys)

    monkeypatch.setattr(CurriculumDataset, "__getitems__", recording)
    yield record


def our_loop(
    model: torch.nn.Module,
    config: dict[str, Any],
    run_dir: Path,
    fetched: Fetches,
    **kwargs: Any,
) -> tuple[dict[str, torch.Tensor], list[Any]]:
    """Train ``model`` with ``stagetrain.fit``; its final weights and its fetches."""
    fetched.clear()
    curriculum = build(
        config, has_teacher="teacher" in kwargs, datasets=kwargs.pop("datasets", None)
    )
    fit(model, curriculum, run_dir=run_dir, progress=False, tensorboard=False, **kwargs)
    seen = list(fetched.seen)
    fetched.clear()
    return {k: v.detach().clone() for k, v in model.state_dict().items()}, seen


def assert_same_weights(
    expected: dict[str, torch.Tensor], model: torch.nn.Module, *, prefix: str = ""
) -> None:
    """Bitwise equal weights (the same operations in the same order as our loop)."""
    got = {k.removeprefix(prefix): v for k, v in model.state_dict().items()}
    assert got.keys() == expected.keys()
    for name, value in expected.items():
        assert torch.equal(got[name], value), (name, (got[name] - value).abs().max().item())


def run_ddp(mode: str, out: Path, nproc: int = 2, timeout: int = 300) -> None:
    """``frameworks_ddp_script.py MODE OUT`` under torchrun, ``nproc`` gloo processes."""
    import os
    import subprocess
    import sys

    tests = Path(__file__).parent
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": f"{tests}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
    }
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc_per_node={nproc}", str(tests / "frameworks_ddp_script.py"), mode, str(out)]  # fmt: skip
    proc = subprocess.run(command, capture_output=True, text=True, env=env, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
