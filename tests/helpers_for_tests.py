"""A user-defined difficulty function, importable as 'helpers_for_tests:by_first_feature'."""

import torch

CALLS = {"count": 0}


def by_first_feature(inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    CALLS["count"] += 1
    return inputs[:, 0].float()


NAN_AT = {"calls": 0, "steps": set(), "always_after": None}


def cross_entropy_with_nans(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Cross-entropy that is NaN on the training calls listed in NAN_AT (a way to inject a
    fault); calls without gradients (fit's preflight, evaluations) are not counted."""
    if not torch.is_grad_enabled():
        return torch.nn.functional.cross_entropy(output, target)
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


class StopAt:
    """A callback that stops a run once ``step`` global steps are done, without a final
    checkpoint: the way an interrupted run (a crash, a kill) looks to a later resume; with
    ``checkpoint=True`` it writes one at that step first, as a SIGTERM does."""

    def __init__(self, step: int, checkpoint: bool = False) -> None:
        self.step = step
        self.checkpoint = checkpoint

    def on_step_end(self, run: object) -> None:
        if run.state.step >= self.step:  # type: ignore[attr-defined]
            run.request_stop(checkpoint=self.checkpoint)  # type: ignore[attr-defined]


def cache_dir() -> str:
    """The difficulty-score cache of the current test (see conftest's autouse fixture)."""
    import os

    return os.environ["STAGETRAIN_CACHE"]


EVAL_CALLS = {"count": 0}


def reset_eval_calls() -> None:
    EVAL_CALLS["count"] = 0


def nan_after_first_eval(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """An evaluation loss that is finite on its first call and NaN afterwards."""
    EVAL_CALLS["count"] += 1
    loss = torch.nn.functional.cross_entropy(output, target)
    return loss if EVAL_CALLS["count"] == 1 else loss * float("nan")


# --- real workloads: a transformers GPT-2 on variable-length documents ------------------------


def tiny_gpt2(*, vocab: int = 256, kill_at: int | None = None) -> torch.nn.Module:
    """A tiny ``transformers.GPT2LMHeadModel`` built from a config (nothing is downloaded).

    ``kill_at``: SIGKILL this process at that training forward pass when the environment
    variable ``STAGETRAIN_TEST_KILL`` is set (a way to interrupt ``stagetrain run``).
    """
    import os
    import signal

    import transformers

    config = transformers.GPT2Config(
        vocab_size=vocab, n_positions=64, n_embd=32, n_layer=2, n_head=2,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
    )  # fmt: skip
    model = transformers.GPT2LMHeadModel(config)
    if kill_at is not None and os.environ.get("STAGETRAIN_TEST_KILL"):
        calls = {"n": 0}

        def count(module: torch.nn.Module, args: object, kwargs: object) -> None:
            if module.training:
                calls["n"] += 1
                if calls["n"] == kill_at:
                    os.kill(os.getpid(), signal.SIGKILL)

        model.register_forward_pre_hook(count, with_kwargs=True)
    return model


class Documents:
    """Variable-length byte documents (lines of the standard library's source), as dict
    items ``{"input_ids", "labels"}`` with ``labels == input_ids`` (the causal-LM way)."""

    def __init__(self, count: int, max_len: int, min_len: int, split: str) -> None:
        from stagetrain.recipes.pystdlib import corpus

        text = corpus(split)[:400_000].tobytes().decode("utf-8", "replace")
        lines = [ln.encode()[:max_len] for ln in text.splitlines()]
        self.docs = [list(ln) for ln in lines if len(ln) >= min_len][:count]

    def __len__(self) -> int:
        return len(self.docs)

    def __getitem__(self, index: int) -> dict[str, list[int]]:
        ids = self.docs[index]
        return {"input_ids": ids, "labels": ids}


def documents(
    *, count: int = 400, max_len: int = 48, min_len: int = 8, split: str = "train"
) -> Documents:
    return Documents(count, max_len, min_len, split)


def random_features(*, size: int = 64, features: int = 4) -> object:
    """Data drawn from torch's global generator (a factory that takes no seed)."""
    from stagetrain import TensorPairDataset

    x = torch.randn(size, features)
    return TensorPairDataset(x, (x[:, 0] > 0).long())


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
