"""Two processes under torchrun (gloo on CPU): sharding, equivalence, agreement, restarts."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from conftest import tiny_config_dict

from stagetrain import Curriculum, parse_config

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

TESTS = Path(__file__).parent


def torchrun(
    args: list[str], *, nproc: int = 2, extra: list[str] | None = None, timeout: int = 240
) -> subprocess.CompletedProcess[str]:
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": f"{TESTS}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
    }
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={nproc}",
        *(extra or []),
        *args,
    ]
    proc = subprocess.run(command, capture_output=True, text=True, env=env, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def write_config(tmp_path: Path, config: dict[str, Any], name: str = "c.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(config))
    return path


INDICES_PROBE = """
import json, sys
import stagetrain
from stagetrain.distributed import init_from_env
info = init_from_env()
curriculum = stagetrain.Curriculum.from_file(sys.argv[1])
out = {s.name: [s.indices(t, info.rank, info.world_size).tolist() for t in range(s.steps)] for s in curriculum.stages}
json.dump(out, open(f"{sys.argv[2]}/rank{info.rank}.json", "w"))
"""


def test_ranks_draw_disjoint_shards_of_each_global_batch(tmp_path: Path) -> None:
    config = tiny_config_dict()
    path = write_config(tmp_path, config)
    (tmp_path / "probe.py").write_text(INDICES_PROBE)
    torchrun([str(tmp_path / "probe.py"), str(path), str(tmp_path)])
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    single = Curriculum(parse_config(config))
    for stage in single.stages:
        for t in range(stage.steps):
            union = ranks[0][stage.name][t] + ranks[1][stage.name][t]
            assert len(ranks[0][stage.name][t]) == stage.batch_size // 2
            assert union == stage.sampler.global_batch(t).tolist(), (stage.name, t)


def final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    checkpoints = sorted((run_dir / "checkpoints").glob("ckpt-*.pt"))
    return torch.load(checkpoints[-1], weights_only=True)["model"]


def train_losses(run_dir: Path) -> list[tuple[int, dict[str, float]]]:
    records = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [
        (r["step"], {k: v for k, v in r.items() if k == "loss" or k.startswith("loss/")})
        for r in records
        if r["type"] == "train"
    ]


def test_two_processes_match_one_with_the_same_global_batch(tmp_path: Path) -> None:
    config = tiny_config_dict()
    # Two loss terms in stage 2: each term's logged value is reduced over the ranks too.
    config["stages"][1]["loss"] = [{"name": "cross_entropy"}, {"name": "hinge", "weight": 0.5}]
    path = write_config(tmp_path, config)
    cli = ["-m", "stagetrain.cli", "run", str(path), "--no-progress"]
    torchrun([*cli, "--run-dir", str(tmp_path / "two")])
    torchrun([*cli, "--run-dir", str(tmp_path / "one")], nproc=1)
    two, one = final_weights(tmp_path / "two"), final_weights(tmp_path / "one")
    assert two.keys() == one.keys()
    for key in one:
        torch.testing.assert_close(two[key], one[key], rtol=1e-4, atol=1e-5)
    # The logged training losses are the global batch's, not rank 0's half of it.
    got, want = train_losses(tmp_path / "two"), train_losses(tmp_path / "one")
    assert [s for s, _ in got] == [s for s, _ in want] and "loss/hinge" in want[-1][1]
    for (step, a), (_, b) in zip(got, want, strict=True):
        assert a.keys() == b.keys(), step
        assert a == pytest.approx(b, rel=1e-5), step
    # only rank 0 wrote logs: one stage_start per stage
    records = [json.loads(x) for x in (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()]
    assert [r["stage"] for r in records if r["type"] == "stage_start"] == ["easy", "target"]
    checkpoint = torch.load(
        sorted((tmp_path / "two" / "checkpoints").glob("ckpt-*.pt"))[-1], weights_only=True
    )
    assert checkpoint["world_size"] == 2 and len(checkpoint["rng"]) == 2  # what every rank needs


TRANSITION_PROBE = """
import json, sys
import stagetrain
from stagetrain.distributed import init_from_env
info = init_from_env()
seen = []
class Record:
    def on_stage_start(self, run):
        seen.append([run.stage.name, run.state.step])
curriculum = stagetrain.Curriculum.from_file(sys.argv[1])
stagetrain.fit(curriculum.build_model(), curriculum, run_dir=sys.argv[2] + "/run", progress=False,
               tensorboard=False, callbacks=[Record()])
json.dump(seen, open(f"{sys.argv[2]}/transitions{info.rank}.json", "w"))
"""


def test_metric_triggered_transition_happens_at_the_same_step_on_every_rank(tmp_path: Path) -> None:
    config = tiny_config_dict(eval_every="5ba")
    config["stages"][0]["advance"] = {"metric": "test.loss", "patience": 2, "delta": 0.02}
    path = write_config(tmp_path, config)
    (tmp_path / "probe.py").write_text(TRANSITION_PROBE)
    torchrun([str(tmp_path / "probe.py"), str(path), str(tmp_path)])
    rank0, rank1 = (json.loads((tmp_path / f"transitions{r}.json").read_text()) for r in range(2))
    assert rank0 == rank1
    (stage0, start0), (stage1, start1) = rank0
    assert (stage0, start0, stage1) == ("easy", 0, "target")
    assert 0 < start1 < 30  # moved on before the maximum duration
    end = next(
        json.loads(x)
        for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
        if '"stage_end"' in x
    )
    assert end["reason"] == "plateau" and end["step"] == start1


COLLECTIVES_PROBE = """
import json, sys
import torch.distributed as dist
import stagetrain
from stagetrain.train import TorchEngine

engine = TorchEngine()
calls = []

def checked(name, fn):
    def wrapper(tensor, *args, **kwargs):
        # Every tensor the curriculum hands to a collective is on the engine's device.
        assert tensor.device == engine.device, (name, tensor.device, engine.device)
        calls.append(name)
        return fn(tensor, *args, **kwargs)
    return wrapper

dist.all_reduce = checked("all_reduce", dist.all_reduce)
dist.broadcast = checked("broadcast", dist.broadcast)
curriculum = stagetrain.Curriculum.from_file(sys.argv[1])
stagetrain.fit(curriculum.build_model(), curriculum, run_dir=sys.argv[2] + "/run", progress=False,
               tensorboard=False, engine=engine)
json.dump(calls, open(f"{sys.argv[2]}/calls{engine.info.rank}.json", "w"))
"""


def test_every_collective_tensor_is_on_the_engine_device(tmp_path: Path) -> None:
    config = tiny_config_dict(eval_every="5ba")
    config["stages"][0]["advance"] = {"metric": "test.loss", "patience": 2, "delta": 0.02}
    config["nonfinite"] = {"policy": "skip"}  # the per-step non-finite flag is agreed too
    path = write_config(tmp_path, config)
    (tmp_path / "probe.py").write_text(COLLECTIVES_PROBE)
    torchrun([str(tmp_path / "probe.py"), str(path), str(tmp_path)])
    for rank in range(2):
        calls = json.loads((tmp_path / f"calls{rank}.json").read_text())
        # evaluation sums and non-finite flags (all_reduce), advance decisions (broadcast)
        assert calls.count("broadcast") >= 2 and calls.count("all_reduce") > 70


def test_killed_rank_is_restarted_and_the_job_resumes(tmp_path: Path) -> None:
    def config_with(at: int) -> dict[str, Any]:
        config = tiny_config_dict()
        config["model"] = {
            "factory": "helpers_for_tests:mlp_killed_at",
            "args": {"at": at, "rank": 1, "in_features": 8, "hidden": [16], "out_features": 2},
        }
        return config

    cli = ["-m", "stagetrain.cli", "run", "--no-progress"]
    torchrun(
        [
            *cli,
            str(write_config(tmp_path, config_with(10**9), "ok.yaml")),
            "--run-dir",
            str(tmp_path / "ok"),
        ]
    )
    killed = write_config(tmp_path, config_with(45), "killed.yaml")  # rank 1 dies mid stage 2
    proc = torchrun(
        [*cli, str(killed), "--run-dir", str(tmp_path / "killed")], extra=["--max-restarts=2"]
    )
    assert "restart" in (proc.stdout + proc.stderr).lower() or "SIGKILL" in proc.stderr
    records = [
        json.loads(x) for x in (tmp_path / "killed" / "metrics.jsonl").read_text().splitlines()
    ]
    assert records[-1]["step"] == 70 and (tmp_path / "killed" / "summary.json").exists()
    ok, resumed = final_weights(tmp_path / "ok"), final_weights(tmp_path / "killed")
    for key in ok:
        assert torch.equal(ok[key], resumed[key]), key


def test_accelerate_launch_matches_torchrun(tmp_path: Path) -> None:
    pytest.importorskip("accelerate")
    path = write_config(tmp_path, tiny_config_dict())
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    accelerate = [
        sys.executable, "-m", "accelerate.commands.launch", "--cpu", "--num_processes", "2",
        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
    ]  # fmt: skip
    cli = ["-m", "stagetrain.cli", "run", str(path), "--no-progress"]
    proc = subprocess.run(
        [*accelerate, *cli, "--engine", "accelerate", "--run-dir", str(tmp_path / "acc")],
        capture_output=True,
        text=True,
        env=env,
        timeout=240,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    torchrun([*cli, "--run-dir", str(tmp_path / "tr")])
    acc, tr = final_weights(tmp_path / "acc"), final_weights(tmp_path / "tr")
    for key in tr:
        torch.testing.assert_close(acc[key], tr[key], rtol=1e-5, atol=1e-6)
