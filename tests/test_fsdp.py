"""FSDP2 and sharded checkpoints in one process: config, wrapping, safety, resume, export.

One-process FSDP (a one-rank gloo group of its own) runs the same code as a torchrun
job: sharded parameters, DCP checkpoints, the equal-batch evaluation. The multi-process
behaviour is in tests/test_fsdp_distributed.py.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import helpers_for_tests
import pytest
import torch
import torch.distributed as dist
import yaml
from conftest import tiny_config_dict
from helpers_for_tests import StopAt
from helpers_fsdp import assert_same_weights, final_weights, gpt_config, records

from stagetrain import Curriculum, fit, parse_config
from stagetrain.config import ParallelConfig
from stagetrain.errors import CheckpointError, ConfigError, StageTrainError
from stagetrain.evaluation import _eval_batches, build_eval, evaluate_sums
from stagetrain.recipes.gpt import GPT
from stagetrain.train import dcp, dcp_io
from stagetrain.train.fit import make_engine
from stagetrain.train.fsdp import MIN_TORCH, FSDPEngine, torch_version, wrap_targets

needs_fsdp2 = pytest.mark.skipif(torch_version() < MIN_TORCH, reason="FSDP2 needs torch >= 2.6")
NAN_LOSS = "helpers_for_tests:cross_entropy_with_nans"


@pytest.fixture(autouse=True)
def _own_process_group() -> Iterator[None]:
    """A one-process FSDP run creates a process group; tear it down after each test."""
    yield
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def run(config: dict[str, Any], run_dir: Path, **kwargs: Any) -> Any:
    curriculum = Curriculum(parse_config(config))
    model = curriculum.build_model()
    result = fit(model, curriculum, run_dir=run_dir, progress=False, tensorboard=False, **kwargs)
    if dist.is_initialized():
        dist.destroy_process_group()  # the next run in this test starts its own
    return result


def fsdp(config: dict[str, Any], **parallel: Any) -> dict[str, Any]:
    return {**config, "parallel": {"kind": "fsdp", **parallel}}


# --- config, CLI and engines (no training) --------------------------------------------------


def test_parallel_options_other_than_kind_apply_to_fsdp_only() -> None:
    config = tiny_config_dict(parallel={"cpu_offload": True})
    with pytest.raises(ConfigError, match=r"^parallel: cpu_offload applies to kind 'fsdp' only"):
        parse_config(config)
    with pytest.raises(ConfigError, match=r"parallel\.kind: Input should be 'ddp' or 'fsdp'"):
        parse_config(tiny_config_dict(parallel={"kind": "zero3"}))
    with pytest.raises(ConfigError, match=r"^precision: 'fp16' is not supported with parallel"):
        parse_config(fsdp(tiny_config_dict(precision="fp16")))
    spread = parse_config(fsdp(tiny_config_dict(), activation_checkpointing=True))
    # How a run is spread over ranks is not what it trains: resume across kinds' options.
    assert spread.fingerprint() == parse_config(tiny_config_dict()).fingerprint()


def test_cli_parallel_flag_is_validated_against_the_config(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from stagetrain.cli import main

    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(fsdp(tiny_config_dict(), cpu_offload=True)))
    code = main(["run", str(path), "--parallel", "ddp", "--run-dir", str(tmp_path / "r")])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1
    assert "--parallel: cpu_offload applies to kind 'fsdp' only" in err
    assert not (tmp_path / "r").exists()  # refused before anything was written


def test_wrap_targets_are_the_repeated_blocks_by_default_or_the_named_ones() -> None:
    model = GPT(vocab=16, context=8, width=8, layers=3, heads=2)
    assert [n for n, _ in wrap_targets(model, None)] == ["blocks.0", "blocks.1", "blocks.2"]
    assert [n for n, _ in wrap_targets(model, ["Block"])] == ["blocks.0", "blocks.1", "blocks.2"]
    # A glob takes the outermost modules it matches, not also every layer inside them.
    assert [n for n, _ in wrap_targets(model, ["blocks.*"])] == ["blocks.0", "blocks.1", "blocks.2"]
    # Two patterns nest; the inner units come first (FSDP2 wraps bottom-up).
    nested = [n for n, _ in wrap_targets(model, ["blocks.*", "*.mlp"])]
    assert nested[:3] == ["blocks.0.mlp", "blocks.1.mlp", "blocks.2.mlp"]
    with pytest.raises(ConfigError, match=r"parallel\.wrap\[1\]: 'Blok' matches no module class"):
        wrap_targets(model, ["Block", "Blok"])


def test_wrap_targets_follow_transformers_no_split_modules() -> None:
    pytest.importorskip("transformers")
    model = helpers_for_tests.tiny_gpt2()
    assert [n for n, _ in wrap_targets(model, None)] == ["transformer.h.0", "transformer.h.1"]


def test_fsdp_is_refused_with_one_line_on_torch_before_2_6(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(torch, "__version__", "2.5.1+cpu")
    with pytest.raises(StageTrainError, match=r"'fsdp' needs torch >= 2\.6 .* this is torch 2\.5"):
        make_engine("torch", "cpu", ParallelConfig(kind="fsdp"))
    assert not dist.is_initialized()


def test_accelerate_with_fsdp_is_refused_and_points_at_parallel_fsdp(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    accelerate = pytest.importorskip("accelerate")

    class FSDPState:
        distributed_type = "DistributedType.FSDP"

    class FakeAccelerator:
        state = FSDPState()

    monkeypatch.setattr(accelerate, "Accelerator", FakeAccelerator)
    with pytest.raises(StageTrainError, match=r"its FSDP configuration shards") as refused:
        make_engine("accelerate", "cpu")
    assert "parallel: {kind: fsdp}" in str(refused.value) and "--engine torch" in str(refused.value)
    with pytest.raises(ConfigError, match=r"parallel\.kind: 'fsdp' runs on PyTorch's FSDP2"):
        make_engine("accelerate", "cpu", ParallelConfig(kind="fsdp"))


def test_evaluation_runs_as_many_batches_on_every_rank_when_sharded() -> None:
    # 9 samples on 2 ranks in batches of 4: rank 0 holds 5 (2 batches), rank 1 holds 4 (1).
    # A sharded forward is a collective: rank 0's second batch would wait for rank 1.
    config = tiny_config_dict()
    config["evals"][0]["data"]["args"]["size"] = 9
    config["evals"][0]["batch_size"] = 4
    curriculum = Curriculum(parse_config(config))
    ev = curriculum.config.evals[0]
    eval_set, dataset = build_eval(curriculum, ev), curriculum.eval_dataset(ev)
    model = curriculum.build_model()

    def batches(rank: int, equal: bool) -> list[bool]:
        return [
            counted
            for _, counted in _eval_batches(
                dataset, eval_set=eval_set, batch_size=4, max_samples=None, seq_len=None,
                rank=rank, world_size=2, limit=None, equal_batches=equal,
            )
        ]  # fmt: skip

    assert [len(batches(r, False)) for r in (0, 1)] == [2, 1]  # what DDP runs
    assert [batches(r, True) for r in (0, 1)] == [[True, True], [True, False]]
    for rank in (0, 1):  # the filler batch is not counted: the sums are unchanged
        plain = evaluate_sums(model, dataset, eval_set, rank=rank, world_size=2)
        equal = evaluate_sums(model, dataset, eval_set, rank=rank, world_size=2, equal_batches=True)
        assert plain.keys() == equal.keys() and all(torch.equal(plain[k], equal[k]) for k in plain)
    # Fewer samples than ranks: the empty rank still joins with a filler forward.
    lonely = _eval_batches(
        dataset, eval_set=eval_set, batch_size=4, max_samples=1, seq_len=None,
        rank=1, world_size=2, limit=None, equal_batches=True,
    )  # fmt: skip
    assert [counted for _, counted in lonely] == [False]


class _Marker:
    """Unpickling this creates ``path``: proof that code from a file ran."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self) -> tuple[Any, ...]:
        return (Path.touch, (self.path,))


def test_dcp_metadata_that_asks_for_code_is_refused(tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    (tmp_path / ".metadata").write_bytes(pickle.dumps(_Marker(marker)))
    with pytest.raises(CheckpointError, match=r"refused: the file asks to import pathlib\.Path"):
        dcp.read_metadata(tmp_path)
    assert not marker.exists()


def test_non_tensor_values_are_read_weights_only(tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    buffer = io.BytesIO()
    torch.save({"lr": 0.1, "evil": _Marker(marker)}, buffer)
    buffer.seek(0)
    planner = dcp_io._planner()

    class Item:
        class dest_index:
            fqn = "optimizer.param_groups.0"

    with pytest.raises(CheckpointError, match="holds pickled code"):
        planner.load_bytes(Item(), buffer)
    assert not marker.exists()


# --- one-process FSDP runs ------------------------------------------------------------------


@needs_fsdp2
def test_an_evaluation_forward_leaves_the_parameters_sharded() -> None:
    # FSDP2 keeps the root's parameters gathered after a forward, for the backward that
    # follows in training. After an evaluation no backward follows: a stage's optimizer
    # built next must still see the sharded parameters, not the gathered copies.
    from torch.distributed.tensor import DTensor

    from stagetrain.config import OptimizerConfig
    from stagetrain.optim import build_optimizer

    engine = FSDPEngine(ParallelConfig(kind="fsdp"), device=torch.device("cpu"))
    model = engine.prepare(GPT(vocab=16, context=8, width=8, layers=2, heads=2))
    assert engine.units == ["blocks.0", "blocks.1"]
    with torch.no_grad():
        model(torch.zeros(2, 8, dtype=torch.long))
    assert all(isinstance(p, DTensor) for p in model.parameters())
    optimizer = build_optimizer(model.named_parameters(), OptimizerConfig(lr=0.1))
    model(torch.zeros(2, 8, dtype=torch.long)).sum().backward()
    optimizer.step()
    assert all(p in optimizer.state for p in model.parameters())  # the live shards stepped
    from stagetrain.train import full_state_dict

    full = full_state_dict(model)
    plain = GPT(vocab=16, context=8, width=8, layers=2, heads=2).state_dict()
    assert full.keys() == plain.keys()
    assert all(type(v) is torch.Tensor and v.shape == plain[k].shape for k, v in full.items())


@needs_fsdp2
@pytest.mark.slow
def test_one_process_fsdp_trains_like_plain_and_resumes_bitwise_past_damage(
    tmp_path: Path,
) -> None:
    plain = run(tiny_config_dict(), tmp_path / "plain")
    config = fsdp(tiny_config_dict())
    full = run(config, tmp_path / "full")
    assert full.state.step == plain.state.step == 70
    assert_same_weights(final_weights(tmp_path / "full"), final_weights(tmp_path / "plain"),
                        exact=True)  # fmt: skip
    checkpoints = tmp_path / "full" / "checkpoints"
    kept = json.loads((checkpoints / "sharded.json").read_text())["checkpoints"]
    assert [e["step"] for e in kept] == [50, 60, 70]  # keep: 3
    assert sorted(p.name for p in checkpoints.iterdir()) == [
        "ckpt-00000050", "ckpt-00000060", "ckpt-00000070", "sharded.json"
    ]  # fmt: skip
    # Interrupted at step 45 (newest checkpoint: 40, mid stage 2), its shard file damaged.
    run(config, tmp_path / "part", callbacks=[StopAt(45)])
    shard = tmp_path / "part" / "checkpoints" / "ckpt-00000040" / "__0_0.distcp"
    shard.write_bytes(shard.read_bytes()[:-7] + b"garbage")
    with pytest.warns(UserWarning, match=r"skipped damaged checkpoints: .*__0_0\.distcp: checksum"):
        resumed = run(config, tmp_path / "part", resume=True)
    assert resumed.state.step == 70
    assert_same_weights(final_weights(tmp_path / "part"), final_weights(tmp_path / "full"),
                        exact=True)  # fmt: skip


@needs_fsdp2
@pytest.mark.slow
def test_a_half_written_checkpoint_directory_is_never_loaded(tmp_path: Path) -> None:
    config = fsdp(tiny_config_dict())
    run(config, tmp_path / "r", callbacks=[StopAt(45)])
    checkpoints = tmp_path / "r" / "checkpoints"
    # What a kill during the write of step 50 leaves: shards, no DCP metadata, unlisted.
    partial = checkpoints / ".ckpt-00000050.tmp"
    shutil.copytree(checkpoints / "ckpt-00000040", partial)
    (partial / ".metadata").unlink()
    starts: list[int] = []

    class Start:
        def on_fit_start(self, run: Any) -> None:
            starts.append(run.state.step)

    run(config, tmp_path / "r", resume=True, callbacks=[Start()])
    assert starts == [40] and not partial.exists()


@needs_fsdp2
@pytest.mark.slow
def test_metadata_with_code_is_refused_on_resume_even_with_a_matching_checksum(
    tmp_path: Path,
) -> None:
    config = fsdp(tiny_config_dict())
    run(config, tmp_path / "r", callbacks=[StopAt(15)])
    checkpoints = tmp_path / "r" / "checkpoints"
    marker = tmp_path / "ran"
    metadata = checkpoints / "ckpt-00000010" / ".metadata"
    metadata.write_bytes(pickle.dumps(_Marker(marker)))
    manifest = json.loads((checkpoints / "sharded.json").read_text())
    manifest["checkpoints"][-1]["files"][".metadata"] = dcp.sha256_file(metadata)
    (checkpoints / "sharded.json").write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match=r"refused: the file asks to import pathlib\.Path"):
        run(config, tmp_path / "r", resume=True)
    assert not marker.exists()


@needs_fsdp2
@pytest.mark.slow
def test_async_saves_train_and_checkpoint_exactly_like_sync(tmp_path: Path) -> None:
    for kind in ("ddp", "fsdp"):
        config = tiny_config_dict(parallel={"kind": kind})
        run(config, tmp_path / f"{kind}-sync")
        config["checkpoint"]["async_save"] = True
        run(config, tmp_path / f"{kind}-async")
        sync, later = (
            final_weights(tmp_path / f"{kind}-sync"),
            final_weights(tmp_path / f"{kind}-async"),
        )
        assert_same_weights(later, sync, exact=True)
        # Every checkpoint, not just the last: the state was copied before training went on.
        assert [r["step"] for r in records(tmp_path / f"{kind}-async", "train")] == [
            r["step"] for r in records(tmp_path / f"{kind}-sync", "train")
        ]
    steps = [
        e.step for e in dcp.ShardedStore(tmp_path / "fsdp-async" / "checkpoints", keep=3).entries()
    ]
    assert steps == [50, 60, 70]


@needs_fsdp2
@pytest.mark.slow
@pytest.mark.parametrize("policy", ["skip", "rollback"])
def test_non_finite_policies_under_fsdp_match_plain(tmp_path: Path, policy: str) -> None:
    config = tiny_config_dict(nonfinite={"policy": policy})
    for stage in config["stages"]:
        stage["loss"] = NAN_LOSS
    helpers_for_tests.inject_nans(steps={44})
    plain = run(config, tmp_path / "plain")
    helpers_for_tests.inject_nans(steps={44})
    sharded = run(fsdp(config), tmp_path / "fsdp")
    assert (sharded.state.skipped, sharded.state.rollbacks) == (
        plain.state.skipped, plain.state.rollbacks,
    )  # fmt: skip
    assert (sharded.state.skipped, sharded.state.rollbacks) == (
        (1, 0) if policy == "skip" else (0, 1)
    )
    assert_same_weights(final_weights(tmp_path / "fsdp"), final_weights(tmp_path / "plain"),
                        exact=True)  # fmt: skip


@needs_fsdp2
@pytest.mark.slow
def test_bf16_mixed_precision_keeps_fp32_shards(tmp_path: Path) -> None:
    config = gpt_config("fsdp", mixed_precision={"param_dtype": "bf16", "reduce_dtype": "fp32"})
    config["stages"][1]["duration"] = "4ba"
    bf16 = run(config, tmp_path / "bf16")
    config["parallel"] = {"kind": "fsdp"}
    run(config, tmp_path / "fp32")
    low, full = final_weights(tmp_path / "bf16"), final_weights(tmp_path / "fp32")
    assert all(v.dtype == torch.float32 for v in low.values())  # master weights stay fp32
    assert bf16.state.step == 12 and all(torch.isfinite(v).all() for v in low.values())
    losses = [r["loss"] for r in records(tmp_path / "bf16", "train")]
    reference = [r["loss"] for r in records(tmp_path / "fp32", "train")]
    # bf16 compute: the same run to within bf16's precision, but not bitwise.
    assert losses == pytest.approx(reference, rel=2e-2) and losses != reference
    assert max(float((low[k] - full[k]).abs().max()) for k in low) < 5e-2


@needs_fsdp2
@pytest.mark.slow
def test_resuming_a_sharded_run_under_ddp_is_refused_in_one_line(tmp_path: Path) -> None:
    run(fsdp(tiny_config_dict()), tmp_path / "r", callbacks=[StopAt(15)])
    with pytest.raises(
        CheckpointError, match=r"holds sharded checkpoints .* parallel\.kind 'fsdp'"
    ):
        run(tiny_config_dict(), tmp_path / "r", resume=True)


@needs_fsdp2
@pytest.mark.slow
def test_a_sharded_transformers_run_exports_to_hf_and_serves_as_weights(tmp_path: Path) -> None:
    pytest.importorskip("transformers")
    from test_real_workloads import gpt2_config

    from stagetrain.sources.export import export_run

    config = fsdp(gpt2_config())
    config["stages"][0]["duration"], config["stages"][1]["duration"] = "4ba", "4ba"
    engines: list[Any] = []

    class Units:
        def on_fit_start(self, run: Any) -> None:
            engines.append(run.model)

    run(config, tmp_path / "r", callbacks=[Units()])
    from torch.distributed.fsdp import FSDPModule

    units = [n for n, m in engines[0].named_modules() if isinstance(m, FSDPModule)]
    assert units == ["", "transformer.h.0", "transformer.h.1"]  # root + GPT2Block x 2
    report = export_run(tmp_path / "r", format="hf", out=tmp_path / "hf")
    assert report.step == 8 and report.max_abs_diff is not None and report.max_abs_diff < 1e-5
    assert (tmp_path / "hf" / "config.json").is_file()
    # A sharded run directory is a `weights:` source too (a teacher, a next run).
    from stagetrain.registry import load_weights

    weights = load_weights(str(tmp_path / "r"), field="model.weights")
    assert_same_weights(weights, final_weights(tmp_path / "r"), exact=True)


def test_fsdp_engine_object_and_config_must_agree() -> None:
    from stagetrain.train import TorchEngine

    with pytest.raises(ConfigError, match=r"parallel\.kind: 'fsdp', but the engine passed"):
        make_engine(TorchEngine(), "cpu", ParallelConfig(kind="fsdp"))
    assert FSDPEngine.sharded and not TorchEngine.sharded
    assert os.environ.get("WORLD_SIZE") in (None, "1")
