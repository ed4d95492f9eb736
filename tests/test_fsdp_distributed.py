"""FSDP2 under torchrun (gloo on CPU, 2 processes): equivalence, sharded resume, kills.

Every test trains the small GPT of helpers_fsdp.gpt_config (16 steps, two stages:
freezing, lr_multipliers, grad accumulation, clipping, an evaluation with unequal
shares). The reference runs are shared by the module.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from helpers_fsdp import (
    assert_same_weights,
    final_weights,
    gpt_config,
    records,
    run_script,
    write_config,
)

from stagetrain.train.fsdp import MIN_TORCH, torch_version

pytestmark = [
    pytest.mark.distributed,
    pytest.mark.slow,
    pytest.mark.skipif(torch_version() < MIN_TORCH, reason="FSDP2 needs torch >= 2.6"),
]


@pytest.fixture(scope="module")
def refs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Uninterrupted FSDP runs on 2 processes (``fsdp2``) and on 1 (``fsdp1``)."""
    root = tmp_path_factory.mktemp("fsdp-refs")
    config = write_config(root / "fsdp.yaml", gpt_config("fsdp"))
    run_script(config, root / "fsdp2")
    run_script(config, root / "fsdp1", nproc=1)
    return root


def test_fsdp_on_two_processes_matches_ddp_and_one_process(refs: Path, tmp_path: Path) -> None:
    ddp = write_config(tmp_path / "ddp.yaml", gpt_config("ddp"))
    run_script(ddp, tmp_path / "ddp2")
    run_script(ddp, tmp_path / "one", nproc=1)
    fsdp2, fsdp1 = final_weights(refs / "fsdp2"), final_weights(refs / "fsdp1")
    ddp2, one = final_weights(tmp_path / "ddp2"), final_weights(tmp_path / "one")
    assert_same_weights(fsdp2, ddp2)
    assert_same_weights(fsdp2, one)
    assert_same_weights(fsdp1, one, exact=True)  # one-rank FSDP changes no arithmetic
    # Same gradient norms (a wrongly averaged gradient would show here even where Adam's
    # scale invariance hides it in the weights) and evaluations as one process; the same
    # training loss as one process and DDP (the global batch's, not rank 0's half of it).
    for kind, key, other, rel in (
        ("train", "grad_norm", "one", 1e-3), ("eval", "loss", "one", 1e-3),
        ("train", "loss", "one", 1e-5), ("train", "loss", "ddp2", 1e-5),
    ):  # fmt: skip
        got, want = records(refs / "fsdp2", kind), records(tmp_path / other, kind)
        assert [r["step"] for r in got] == [r["step"] for r in want] and got
        for a, b in zip(got, want, strict=True):
            assert a[key] == pytest.approx(b[key], rel=rel), (kind, a["step"], key, other)
    ddp2, one = records(tmp_path / "ddp2", "train"), records(tmp_path / "one", "train")
    for a, b in zip(ddp2, one, strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5), ("ddp2", a["step"])


def test_resume_mid_stage_two_across_world_sizes(refs: Path, tmp_path: Path) -> None:
    config = refs / "fsdp.yaml"
    # Interrupted at step 14 without a checkpoint: the newest is step 12, mid stage 2.
    run_script(config, tmp_path / "part2", "--stop-at", "14")
    run_script(config, tmp_path / "part1", "--stop-at", "14", nproc=1)
    for source, target in (("part2", "r22"), ("part2", "r21"), ("part1", "r12")):
        shutil.copytree(tmp_path / source, tmp_path / target)
    run_script(config, tmp_path / "r22", "--resume")
    proc = run_script(config, tmp_path / "r21", "--resume", nproc=1)
    assert "resumed from step 12: stage 'long', stage step 4 of 8" in proc.stdout
    assert "world size 1 from a checkpoint written with 2" in proc.stderr
    run_script(config, tmp_path / "r12", "--resume")
    fsdp2, fsdp1 = final_weights(refs / "fsdp2"), final_weights(refs / "fsdp1")
    assert_same_weights(final_weights(tmp_path / "r22"), fsdp2, exact=True)  # 2 -> 2
    assert_same_weights(final_weights(tmp_path / "r21"), fsdp1)  # 2 -> 1
    assert_same_weights(final_weights(tmp_path / "r12"), fsdp2)  # 1 -> 2
    # The resumed runs' logs continue the interrupted ones: one train record per interval.
    assert [r["step"] for r in records(tmp_path / "r21", "train")] == [4, 8, 12, 16]
    # ... with the global batch's losses whatever the world size (2 -> 2 exactly).
    for resumed, ref, rel in (
        ("r22", "fsdp2", 0.0),
        ("r21", "fsdp1", 1e-5),
        ("r12", "fsdp2", 1e-5),
    ):
        got, want = records(tmp_path / resumed, "train"), records(refs / ref, "train")
        assert [r["loss"] for r in got] == pytest.approx([r["loss"] for r in want], rel=rel)


def test_kill_9_during_a_sharded_checkpoint_write(refs: Path, tmp_path: Path) -> None:
    config = gpt_config("fsdp")
    config["checkpoint"]["async_save"] = True  # the write runs in the background thread
    path = write_config(tmp_path / "async.yaml", config)
    record = tmp_path / "starts.jsonl"
    # Rank 1 dies half-way through writing its shards of the 3rd checkpoint (step 12).
    proc = run_script(
        path, tmp_path / "killed", "--kill-at-write", "3", "--record", str(record),
        extra=["--max-restarts=1"],
    )  # fmt: skip
    starts = [json.loads(line) for line in record.read_text().splitlines()]
    second = [s for s in starts if s["attempt"] == 1]
    assert len(second) == 2, proc.stderr[-2000:]  # torchrun restarted both ranks
    # The restarted job found the half-written directory and resumed from the checkpoint
    # before it (step 8), never from the one that was being written.
    assert all(s["start_step"] == 8 for s in second)
    assert any(s["temp_dirs"] == [".ckpt-00000012.tmp"] for s in second)
    checkpoints = tmp_path / "killed" / "checkpoints"
    assert not list(checkpoints.glob(".ckpt-*"))  # removed, then written again in full
    manifest = json.loads((checkpoints / "sharded.json").read_text())
    assert [e["step"] for e in manifest["checkpoints"]] == [4, 8, 12, 16]
    assert_same_weights(final_weights(tmp_path / "killed"), final_weights(refs / "fsdp2"),
                        exact=True)  # fmt: skip


def test_activation_checkpointing_cpu_offload_and_no_resharding(refs: Path, tmp_path: Path) -> None:
    config = gpt_config(
        "fsdp", activation_checkpointing=True, cpu_offload=True, reshard_after_forward=False
    )
    run_script(write_config(tmp_path / "options.yaml", config), tmp_path / "options")
    # Recomputation, host-resident shards and gathered-after-forward parameters change
    # where the arithmetic happens, not what it computes.
    assert_same_weights(final_weights(tmp_path / "options"), final_weights(refs / "fsdp2"))


def test_export_consolidates_the_shards_of_a_two_process_run(refs: Path, tmp_path: Path) -> None:
    from safetensors.torch import load_file

    out = tmp_path / "export"
    proc = subprocess.run(
        [sys.executable, "-m", "stagetrain.cli", "export", str(refs / "fsdp2"),
         "--format", "safetensors", "--out", str(out)],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "exported step 16 (stage 'long')" in proc.stdout
    assert_same_weights(load_file(out / "model.safetensors"), final_weights(refs / "fsdp2"),
                        exact=True)  # fmt: skip
    provenance = json.loads((out / "export.json").read_text())
    assert provenance["checkpoint"] == "ckpt-00000016" and provenance["step"] == 16
