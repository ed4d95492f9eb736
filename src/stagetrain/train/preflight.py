"""Preflight: everything a run will need is checked before step 0.

A typo in a later stage's ``freeze`` pattern, an evaluation whose loss cannot be
imported, two sources that cannot share a batch or a model that cannot run on a
stage's data would otherwise surface after hours of earlier stages. Before the first
step, :func:`preflight`:

* matches every stage's ``freeze`` and ``lr_multipliers`` patterns against the model's
  parameter names and builds every optimizer a stage will build;
* resolves every evaluation's loss and metrics and builds its dataset;
* fetches one sample of every source of every stage together (so sources whose items
  do not fit in one batch are found), and runs the model (and teacher) with the
  stage's loss on the stage's first batch, without gradients;
* runs every evaluation on one batch and checks that the advance rules' metrics exist.

Errors name the field: ``stages[1].freeze[0]``, ``evals[0].loss``. The random number
generators are left exactly as they were, so a run with a preflight trains bitwise
like one without.
"""

from __future__ import annotations

import warnings

import torch

from stagetrain.batch import to_device
from stagetrain.curriculum import Curriculum, Stage
from stagetrain.errors import ConfigError, StageTrainError
from stagetrain.evaluation import EvalSet, build_eval, evaluate_sums, finalize
from stagetrain.handoff import builds_optimizer, check_patterns
from stagetrain.optim import build_optimizer, param_groups
from stagetrain.seeding import preserved_rng
from stagetrain.sources.preflight import check_vocab


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"


def check_parameters(curriculum: Curriculum, model: torch.nn.Module) -> None:
    """Freeze and LR-multiplier patterns match parameters; every optimizer builds."""
    named = list(model.named_parameters())
    names = [n for n, _ in named]
    for stage in curriculum.stages:
        cfg = stage.config
        field = f"stages[{stage.index}]"
        check_patterns(names, cfg.freeze, field=f"{field}.freeze")
        assert cfg.optimizer is not None
        param_groups(named, cfg.optimizer, field=f"{field}.optimizer")
        if builds_optimizer(cfg, stage.index):
            build_optimizer(named, cfg.optimizer, field=f"{field}.optimizer")


def check_stage_runs(
    curriculum: Curriculum,
    stage: Stage,
    model: torch.nn.Module,
    teacher: torch.nn.Module | None,
    device: torch.device,
    rank: int,
    world_size: int,
) -> None:
    """The model (and teacher) run with the stage's loss on its first batch."""
    field = f"stages[{stage.index}]"
    try:
        batch = to_device(stage.batch(0, rank, world_size), device)
    except StageTrainError:
        raise
    except Exception as exc:
        raise StageTrainError(
            f"{field}.data: cannot fetch the first batch ({_first_line(exc)})"
        ) from None
    what = "the model and loss"
    try:
        pred = stage.io.predict(model, batch)
        teacher_pred = None
        if stage.loss.needs_teacher and teacher is not None:
            what = "the teacher"  # it gets the student's batch (e.g. a budget= beside the ids)
            teacher_pred = stage.io.predict_teacher(teacher, batch, model)
            what = "the model and loss"
        stage.loss(pred, teacher=teacher_pred, model=model)
    except StageTrainError:
        raise
    except Exception as exc:
        raise StageTrainError(
            f"{field}: {what} cannot run on the stage's first batch ({_first_line(exc)})"
        ) from None


def check_evaluations(
    curriculum: Curriculum,
    model: torch.nn.Module,
    eval_sets: dict[str, EvalSet],
    device: torch.device,
) -> None:
    """Every evaluation runs on one batch at each sequence length it will see; the advance
    rules' metrics are among the values it produces."""
    produced: dict[str, set[str]] = {}
    seen: set[tuple[str, int | None]] = set()
    for stage in curriculum.stages:
        for ev in curriculum.evals_for(stage):
            seq_len = curriculum.eval_seq_len(ev, stage)
            if (ev.name, seq_len) in seen:
                continue
            seen.add((ev.name, seq_len))
            eval_set = eval_sets[ev.name]
            try:
                dataset = curriculum.eval_dataset(ev, stage)
                sums = evaluate_sums(
                    model, dataset, eval_set, seq_len=seq_len, device=device, limit=1
                )
                values = finalize(eval_set, sums)
            except StageTrainError:
                raise
            except Exception as exc:
                raise StageTrainError(
                    f"{eval_set.field}: the evaluation cannot run on its first batch "
                    f"({_first_line(exc)})"
                ) from None
            produced.setdefault(ev.name, set()).update(values)
    for stage in curriculum.stages:
        rule = stage.config.advance
        if rule is None:
            continue
        name, _, key = rule.metric.partition(".")
        if key not in produced.get(name, set()):
            available = sorted(f"{n}.{k}" for n, keys in produced.items() for k in keys)
            raise ConfigError(
                f"stages[{stage.index}].advance.metric: no evaluation of this stage produces "
                f"{rule.metric!r}; available: {available}"
            )


def warn_eval_context(curriculum: Curriculum) -> None:
    """Warn when a curriculum-level evaluation without its own ``seq_len`` would measure
    another context in each stage (short then long): its curve, and a comparison of arms
    by it, would mix measurements."""
    lengths = sorted({s.config.seq_len for s in curriculum.stages}, key=lambda n: n or 0)
    if len(lengths) < 2:
        return
    shown = ", ".join("none" if n is None else str(n) for n in lengths)
    for i, ev in enumerate(curriculum.config.evals):
        if ev.seq_len is None:
            warnings.warn(
                f"evals[{i}] ({ev.name!r}) has no seq_len: it is evaluated at each stage's "
                f"seq_len ({shown}), so its values are not comparable across stages; set "
                f"evals[{i}].seq_len to measure one context",
                stacklevel=2,
            )


def build_eval_sets(curriculum: Curriculum) -> dict[str, EvalSet]:
    """Every evaluation of the curriculum, built (losses and metrics resolved)."""
    out: dict[str, EvalSet] = {}
    for ev in [*curriculum.config.evals, *(e for s in curriculum.config.stages for e in s.evals)]:
        out[ev.name] = build_eval(curriculum, ev)
    return out


def preflight(
    curriculum: Curriculum,
    model: torch.nn.Module,
    teacher: torch.nn.Module | None,
    *,
    device: torch.device,
    rank: int = 0,
    world_size: int = 1,
    run_model: bool = True,
) -> dict[str, EvalSet]:
    """Check everything before step 0 (see the module docstring); returns the built
    evaluations. ``run_model=False`` skips the forward passes (a resumed run that
    already trained with this curriculum)."""
    for stage in curriculum.stages:
        if stage.loss.needs_teacher and teacher is None:
            raise ConfigError(
                f"stages[{stage.index}].loss: a term needs a teacher model; declare 'teacher' "
                "in the config or pass fit(..., teacher=model)"
            )
    check_parameters(curriculum, model)
    warn_eval_context(curriculum)
    check_vocab(curriculum, model)  # a token id past the embedding is named before step 0
    eval_sets = build_eval_sets(curriculum)
    with preserved_rng():
        for stage in curriculum.stages:
            stage.check_sources_fit()
        if run_model:
            was_training = model.training
            model.eval()
            try:
                with torch.no_grad():
                    for stage in curriculum.stages:
                        check_stage_runs(
                            curriculum, stage, model, teacher, device, rank, world_size
                        )
                check_evaluations(curriculum, model, eval_sets, device)
            finally:
                model.train(was_training)
    return eval_sets
