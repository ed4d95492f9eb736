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
