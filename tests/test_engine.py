"""The engine's collectives take tensors on the engine's device (NCCL serves only CUDA).

There is no GPU on the machines these tests run on, so "a device other than the CPU"
is PyTorch's ``meta`` device, and the process group is a fake that refuses CPU
tensors exactly as NCCL does. The first loop all-reduced CPU float64 evaluation sums
and broadcast a CPU advance flag: both are refused here.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.distributed as dist

from stagetrain import Curriculum, parse_config
from stagetrain.distributed import DistInfo
from stagetrain.evaluation import build_eval, evaluate_sums
from stagetrain.train.engine import TorchEngine


class _Delivered(Exception):
    """Raised by the fake collective after checking a tensor (it has no data to return)."""


class CudaOnlyGroup:
    """Stands in for ``torch.distributed``'s collectives; refuses CPU tensors like NCCL."""

    def __init__(self) -> None:
        self.devices: list[str] = []
        self.stop_after_delivery = False
        """Raise _Delivered once a tensor passed: for callers that read the result back,
        which a meta tensor cannot give."""

    def _take(self, tensor: torch.Tensor) -> None:
        if tensor.device.type == "cpu":
            raise RuntimeError("Tensors must be CUDA and dense")  # NCCL's complaint
        self.devices.append(tensor.device.type)
        if self.stop_after_delivery:
            raise _Delivered

    def all_reduce(self, tensor: torch.Tensor, op: Any = None) -> None:
        self._take(tensor)

    def broadcast(self, tensor: torch.Tensor, src: int = 0) -> None:
        self._take(tensor)

    def all_gather_object(self, out: list[Any], obj: Any) -> None:
        out[:] = [obj] * len(out)  # objects travel pickled, on the current device


@pytest.fixture
def group(monkeypatch: pytest.MonkeyPatch) -> CudaOnlyGroup:
    fake = CudaOnlyGroup()
    monkeypatch.setattr(dist, "all_reduce", fake.all_reduce)
    monkeypatch.setattr(dist, "broadcast", fake.broadcast)
    monkeypatch.setattr(dist, "all_gather_object", fake.all_gather_object)
    return fake


def engine_on(device: str) -> TorchEngine:
    return TorchEngine(DistInfo(rank=0, world_size=2), device=torch.device(device))


def test_sums_are_reduced_on_the_engine_device(group: CudaOnlyGroup) -> None:
    host_sums = {"correct": torch.tensor(3.0, dtype=torch.float64), "n": torch.tensor(4.0)}
    reduced = engine_on("meta").sum(host_sums)
    assert group.devices == ["meta"]  # one stacked all-reduce, on the engine's device
    assert {v.device.type for v in reduced.values()} == {"meta"}


def test_decisions_are_broadcast_on_the_engine_device(group: CudaOnlyGroup) -> None:
    group.stop_after_delivery = True
    with pytest.raises(_Delivered):
        engine_on("meta").agree(True)
    with pytest.raises(_Delivered):
        engine_on("meta").any(True)  # the non-finite flag: all-reduced by maximum
    assert group.devices == ["meta", "meta"]


def test_a_cpu_engine_would_be_refused_by_nccl(group: CudaOnlyGroup) -> None:
    # The fake is a real obstacle: a CPU tensor does not pass it.
    with pytest.raises(RuntimeError, match="must be CUDA"):
        engine_on("cpu").sum({"x": torch.tensor(1.0)})


def test_evaluation_sums_stay_on_the_model_device() -> None:
    config = {
        "batch_size": 4,
        "evals": [
            {
                "name": "test",
                "data": {"builtin": "parity", "args": {"n_bits": 8, "k": 2, "size": 32}},
                "metrics": ["loss", "accuracy", "exact_match", "perplexity"],
            }
        ],
        "stages": [{"name": "a", "duration": "1ba", "data": {"builtin": "parity"}}],
    }
    curriculum = Curriculum(parse_config(config), progress=False)
    ev = curriculum.config.evals[0]
    with torch.device("meta"):
        model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(8, 2))
    sums = evaluate_sums(
        model,
        curriculum.eval_dataset(ev),
        build_eval(curriculum, ev),
        device=torch.device("meta"),
    )
    assert sums and {v.device.type for v in sums.values()} == {"meta"}
