"""A user-defined difficulty function, importable as 'helpers_for_tests:by_first_feature'."""

import torch

CALLS = {"count": 0}


def by_first_feature(inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    CALLS["count"] += 1
    return inputs[:, 0].float()


NAN_AT = {"calls": 0, "steps": set(), "always_after": None}


def cross_entropy_with_nans(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Cross-entropy that is NaN on the calls listed in NAN_AT (a way to inject a fault)."""
    call = NAN_AT["calls"]
    NAN_AT["calls"] = call + 1
    loss = torch.nn.functional.cross_entropy(output, target)
    after = NAN_AT["always_after"]
    if call in NAN_AT["steps"] or (after is not None and call >= after):
        return loss * float("nan")
    return loss


def inject_nans(steps: set[int] = frozenset(), always_after: int | None = None) -> None:  # type: ignore[assignment]
    NAN_AT.update(calls=0, steps=set(steps), always_after=always_after)


class _KillAt(torch.nn.Module):
    """Wraps a model; SIGKILLs its own process at forward call ``at`` on rank ``rank`` of the
    first attempt of a torchrun job (a way to test restarts)."""

    def __init__(self, inner: torch.nn.Module, at: int, rank: int) -> None:
        super().__init__()
        self.inner = inner
        self.at, self.rank, self.calls = at, rank, 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        import os
        import signal

        if self.training:
            self.calls += 1
            first_attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0"
            if first_attempt and self.calls == self.at and os.environ.get("RANK") == str(self.rank):
                os.kill(os.getpid(), signal.SIGKILL)
        return self.inner(x)


def mlp_killed_at(*, at: int, rank: int = 1, **mlp_args: object) -> torch.nn.Module:
    from stagetrain.recipes.models import mlp

    return _KillAt(mlp(**mlp_args), at, rank)  # type: ignore[arg-type]


def mlp_exit_on_seed(*, exit_on: int, **mlp_args: object) -> torch.nn.Module:
    """An MLP, except under seed ``exit_on``: then the process dies (a crash to contain)."""
    import os

    from stagetrain.recipes.models import mlp

    if torch.initial_seed() == exit_on:  # build_model seeds torch with the run's seed
        os._exit(3)
    return mlp(**mlp_args)  # type: ignore[arg-type]


def mlp_raise_on_seed(*, raise_on: int, **mlp_args: object) -> torch.nn.Module:
    """An MLP, except under seed ``raise_on``: then a Python exception."""
    from stagetrain.recipes.models import mlp

    if torch.initial_seed() == raise_on:
        raise RuntimeError(f"no model for seed {raise_on}")
    return mlp(**mlp_args)  # type: ignore[arg-type]
