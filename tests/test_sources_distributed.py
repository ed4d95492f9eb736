"""The tokens source under torchrun (2 gloo processes) through `stagetrain run`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from helpers_sources import token_file

from stagetrain import Curriculum, parse_config

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

TESTS = Path(__file__).parent


def torchrun(args: list[str], nproc: int) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": f"{TESTS}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}  # fmt: skip
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc_per_node={nproc}", *args]  # fmt: skip
    proc = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


def config(data: str, record: Path) -> dict[str, Any]:
    def source(seq_len: int) -> dict[str, Any]:
        return {"builtin": "tokens", "name": f"t{seq_len}",
                "args": {"files": data, "dtype": "uint16", "seq_len": seq_len, "vocab_size": 32}}  # fmt: skip

    return {
        "name": "tokens-ddp", "seed": 5, "batch_size": 8, "log_every": 5,
        "model": {"factory": "helpers_sources:recording_lm", "args": {"out_dir": str(record)}},
        "stages": [
            {"name": "short", "duration": "5ba", "seq_len": 8, "data": source(8),
             "optimizer": {"name": "adamw", "lr": 0.01}},
            {"name": "long", "duration": "5ba", "seq_len": 16, "data": source(16)},
        ],
    }  # fmt: skip


def test_ranks_windows_union_to_the_single_process_batch(tmp_path: Path) -> None:
    data = token_file(tmp_path / "t.bin", n=5000)
    record = tmp_path / "record"
    record.mkdir()
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(config(data, record)))
    torchrun(["-m", "stagetrain.cli", "run", str(path), "--run-dir", str(tmp_path / "run"),
              "--no-progress", "--device", "cpu"], nproc=2)  # fmt: skip
    ranks = [[json.loads(x) for x in (record / f"rank{r}.jsonl").read_text().splitlines()]
             for r in range(2)]  # fmt: skip
    single = Curriculum(parse_config(config(data, record)))
    expected = [stage.batch(t)[0].tolist() for stage in single.stages for t in range(stage.steps)]
    assert len(ranks[0]) == len(ranks[1]) == len(expected) == 10
    for step, (a, b, whole) in enumerate(zip(ranks[0], ranks[1], expected, strict=True)):
        assert len(a) == len(b) == 4, step
        assert a + b == whole, step  # rank 0 takes the first half of the global batch
    assert {len(row) for rows in expected[:5] for row in rows} == {8}
    assert {len(row) for rows in expected[5:] for row in rows} == {16}
