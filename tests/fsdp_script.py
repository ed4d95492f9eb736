"""One run of a curriculum under torchrun, for the FSDP tests (tests/test_fsdp_distributed.py).

    python -m torch.distributed.run --nproc_per_node=2 tests/fsdp_script.py CONFIG RUN_DIR
        [--stop-at STEP] [--resume] [--kill-at-write N] [--record FILE]

``--stop-at``: stop after STEP global steps without a checkpoint (an interrupted run).
``--resume``: continue from the newest checkpoint (also implied after a torchrun restart).
``--kill-at-write N``: on the first attempt, rank 1 SIGKILLs itself in the middle of
writing its shards of the N-th checkpoint (half of its file written).
``--record FILE``: append ``{"attempt", "rank", "start_step", "temp_dirs"}`` per process.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
from pathlib import Path

from helpers_for_tests import StopAt

import stagetrain


class RecordStart:
    """Records where each attempt started, and the unfinished checkpoint directories that
    were there before fit() (which removes them)."""

    def __init__(self, path: Path, run_dir: Path) -> None:
        self.path = path
        self.temp = sorted(p.name for p in (run_dir / "checkpoints").glob(".ckpt-*.tmp"))

    def on_fit_start(self, run: object) -> None:
        temp = self.temp
        record = {
            "attempt": int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")),
            "rank": int(os.environ.get("RANK", "0")),
            "start_step": run.state.step,  # type: ignore[attr-defined]
            "temp_dirs": temp,
        }
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")


def die_while_writing(nth: int) -> None:
    """Rank 1 writes half of its shard file of the ``nth`` checkpoint, then is killed."""
    from torch.distributed.checkpoint import FileSystemWriter

    original = FileSystemWriter.write_data
    calls = {"n": 0}

    def write_data(self: FileSystemWriter, plan: object, planner: object) -> object:
        calls["n"] += 1
        future = original(self, plan, planner)  # type: ignore[arg-type]
        if calls["n"] == nth:
            future.wait()
            for path in Path(self.path).glob("__1_*.distcp"):
                data = path.read_bytes()
                path.write_bytes(data[: len(data) // 2])
            os.kill(os.getpid(), signal.SIGKILL)
        return future

    FileSystemWriter.write_data = write_data  # type: ignore[method-assign]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("config", type=Path)
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--stop-at", type=int, default=None)
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--kill-at-write", type=int, default=None)
    parser.add_argument("--record", type=Path, default=None)
    args = parser.parse_args()
    attempt = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    if args.kill_at_write is not None and attempt == 0 and os.environ.get("RANK") == "1":
        die_while_writing(args.kill_at_write)
    curriculum = stagetrain.Curriculum.from_file(args.config)
    callbacks: list[object] = []
    if args.stop_at is not None:
        callbacks.append(StopAt(args.stop_at))
    if args.record is not None:
        callbacks.append(RecordStart(args.record, args.run_dir))
    stagetrain.fit(
        curriculum.build_model(),
        curriculum,
        run_dir=args.run_dir,
        resume=args.resume or attempt > 0,
        progress=False,
        tensorboard=False,
        callbacks=callbacks,
    )


if __name__ == "__main__":
    main()
