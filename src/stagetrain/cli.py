"""The ``stagetrain`` command line: plan, run (and compare, report, demo)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from stagetrain import console
from stagetrain.errors import ConfigError, StageTrainError


def _cmd_plan(args: argparse.Namespace) -> int:
    from stagetrain.config import load_config
    from stagetrain.curriculum import Curriculum
    from stagetrain.plan import make_plan

    config = load_config(args.config)
    print(make_plan(Curriculum(config)).format())
    return 0


def _cmd_run(args: argparse.Namespace) -> int:
    from stagetrain import fit
    from stagetrain.config import load_config
    from stagetrain.curriculum import Curriculum
    from stagetrain.env import read_launch_env

    env = read_launch_env()  # a malformed launcher variable is one line, before any work
    config = load_config(args.config)
    if args.seed is not None:
        config = config.model_copy(update={"seed": args.seed})
    if args.parallel is not None and args.parallel != config.parallel.kind:
        from pydantic import ValidationError

        from stagetrain.config import ParallelConfig, format_validation_error

        try:  # validated again: fsdp-only options under ddp are refused
            parallel = ParallelConfig.model_validate(
                {**config.parallel.model_dump(), "kind": args.parallel}
            )
        except ValidationError as exc:
            raise ConfigError(format_validation_error(exc, "--parallel")) from None
        config = config.model_copy(update={"parallel": parallel})
    if env.distributed and args.run_dir is None:
        raise ConfigError("--run-dir: required when several processes share one run")
    # Under torchrun --max-restarts, a restarted job continues from its last checkpoint.
    auto_resume = args.auto_resume or env.restarted
    curriculum = Curriculum(config)
    model = curriculum.build_model()
    result = fit(
        model,
        curriculum,
        teacher=curriculum.build_teacher(),
        run_dir=args.run_dir,
        resume=args.resume,
        auto_resume=auto_resume and not args.resume,
        overwrite=args.overwrite,
        on_change=args.on_change,
        device=args.device,
        progress=not args.no_progress,
        engine=args.engine,
        handle_signals=True,
    )
    if result.stopped_by is not None:
        if env.is_main:
            print(
                f"stagetrain: {result.stopped_by.message(step=result.state.step)}", file=sys.stderr
            )
        return result.stopped_by.exit_code
    if not env.is_main:
        return 0  # only rank 0 reports
    for name, metrics in result.metrics.items():
        shown = ", ".join(f"{k} {v:.4f}" for k, v in metrics.items())
        print(f"{name}: {shown}")
    print(f"run directory: {result.run_dir}")
    return 0


def _cmd_compare(args: argparse.Namespace) -> int:
    from stagetrain.compare import compare
    from stagetrain.report import write_report

    out = args.out or Path("runs") / f"compare-{args.config.stem}"
    compare(
        args.config, out, arms=args.arms, seeds=args.seeds, jobs=args.jobs,
        metric=args.metric, target=args.target, vary=args.vary,
    )  # fmt: skip
    path, table = write_report(out)  # the comparison's own report, at its --target
    print()
    print(table)
    print(f"\nreport: {path}")
    return 0


def _cmd_lr_find(args: argparse.Namespace) -> int:
    from stagetrain.config import load_config
    from stagetrain.curriculum import Curriculum
    from stagetrain.train.lr_find import lr_find

    curriculum = Curriculum(load_config(args.config))
    out = args.out or Path("runs") / f"lr-find-{args.config.stem}"
    found = lr_find(curriculum, args.stage, out, run_dir=args.run_dir, device=args.device)
    result = found.result
    note = " (fallback: every candidate diverged)" if result.fallback else ""
    print(f"chosen lr {result.lr:.4g}{note}; range-test pick {result.pick:.3g} ({result.rule})")
    print(f"search: {result.steps:,} steps, {result.samples:,} samples")
    print(f"plot: {found.png}\nscores: {found.json}")
    return 0


def _add_lr_find(sub: argparse._SubParsersAction) -> None:
    """``lr-find`` (stagetrain.train.lr_find)."""
    lrf = sub.add_parser("lr-find", help="run one stage's LR search (lr: auto) and plot it")
    lrf.add_argument("config", type=Path, help="curriculum file (.yaml or .toml)")
    lrf.add_argument("--stage", required=True, help="the stage's name")
    lrf.add_argument(
        "--out", type=Path, default=None, help="output directory (default runs/lr-find-NAME)"
    )
    lrf.add_argument(
        "--run-dir",
        type=Path,
        default=None,
        help="start from this run's checkpoint at the stage (default: the initial weights)",
    )
    lrf.add_argument("--device", default=None, help="cpu, cuda ... (default: cuda if available)")
    lrf.set_defaults(func=_cmd_lr_find)


def _cmd_report(args: argparse.Namespace) -> int:
    from stagetrain.compare import check_target
    from stagetrain.report import write_report

    check_target(args.target)
    path, table = write_report(args.run_dir, target=args.target, metric=args.metric, out=args.out)
    print(table)
    print(f"\nreport: {path}")
    return 0


def _cmd_extract(args: argparse.Namespace) -> int:
    from stagetrain.elastic.export import extract_run

    report = extract_run(
        args.run_dir,
        args.budget,
        args.out,
        format=args.format,
        tolerance=args.tolerance,
        allow_off_target=args.allow_off_target,
        project=args.project,
        check_batches=args.check_batches,
    )
    for line in report.lines():
        print(line)
    for warning in report.warnings:
        print(f"stagetrain: warning: {warning}", file=sys.stderr)
    if max(report.max_abs_diff, report.reloaded_diff) >= 1e-4:
        print("stagetrain: error: the extracted model does not match the parent", file=sys.stderr)
        return 1
    return 0


def _cmd_prepare(args: argparse.Namespace) -> int:
    from stagetrain.sources.prepare import prepare, read_file_list

    inputs = list(args.inputs)
    if args.files_from is not None:
        inputs += read_file_list(args.files_from)
    result = prepare(
        inputs,
        args.out,
        tokenizer=args.tokenizer,
        fmt=args.format,
        text_field=args.text_field,
        eos_id=args.eos_id,
        workers=args.workers,
        progress=not args.no_progress,
    )
    print(result.line())
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    from stagetrain.sources.export import export_run

    report = export_run(args.run_dir, format=args.format, out=args.out, step=args.checkpoint)
    for line in report.lines():
        print(line)
    return 0


def _add_data_commands(sub: argparse._SubParsersAction) -> None:
    """``prepare`` and ``export`` (stagetrain.sources)."""
    prep = sub.add_parser(
        "prepare", help="tokenize text / JSONL / a HF dataset into a token file (.bin + .json)"
    )
    prep.add_argument(
        "inputs",
        nargs="*",
        type=Path,
        help="text files, .jsonl, .parquet, or a saved HF dataset directory",
    )
    prep.add_argument("--out", type=Path, required=True, help="the token file to write (.bin)")
    prep.add_argument(
        "--tokenizer",
        default="bytes",
        help="a tokenizer.json, a transformers tokenizer directory, or 'bytes' (default)",
    )
    prep.add_argument(
        "--files-from", type=Path, default=None, help="a file listing more inputs, one per line"
    )
    prep.add_argument(
        "--format",
        choices=["auto", "text", "jsonl", "hf"],
        default="auto",
        help="how to read the inputs (default: by file name)",
    )
    prep.add_argument(
        "--text-field",
        default="text",
        help="JSONL field / dataset column with the text (default: %(default)s)",
    )
    prep.add_argument(
        "--eos-id",
        default="auto",
        help="token appended after each document: auto (the tokenizer's), "
        "none, or an id (default: %(default)s)",
    )
    prep.add_argument(
        "--workers", type=int, default=1, help="tokenizing processes (default: %(default)s)"
    )
    prep.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    prep.set_defaults(func=_cmd_prepare)

    exp = sub.add_parser("export", help="write a run's checkpoint as safetensors or a HF model")
    exp.add_argument("run_dir", type=Path, help="the run directory")
    exp.add_argument(
        "--format",
        choices=["safetensors", "hf"],
        required=True,
        help="safetensors + model.json, or a from_pretrained directory",
    )
    exp.add_argument("--out", type=Path, required=True, help="output directory")
    exp.add_argument(
        "--checkpoint",
        type=int,
        default=None,
        metavar="STEP",
        help="the checkpoint written at this step (default: the newest)",
    )
    exp.set_defaults(func=_cmd_export)


def _cmd_demo(args: argparse.Namespace) -> int:
    from importlib.resources import files

    config = Path(str(files("stagetrain.recipes") / "parity_demo.yaml"))
    print(
        "stagetrain demo: sparse parity (d=50, k=5). Curriculum = 1,000 steps on biased bits, "
        "then 4,000 on uniform bits; baseline = 5,000 steps on uniform bits, same LR, "
        f"same budget. {args.seeds} seeds per arm, {args.jobs} at a time."
    )
    args.config, args.arms, args.metric = config, "curriculum,baseline", "test.accuracy"
    args.vary = "init,data"
    args.target = 0.95  # "steps to 95 % test accuracy", as in the parity literature
    args.out = args.out or Path("runs") / "demo"
    return _cmd_compare(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="stagetrain", description="Two-stage and multi-stage curriculum training for PyTorch."
    )
    sub = parser.add_subparsers(dest="command", required=True)

    plan = sub.add_parser("plan", help="print a curriculum's timeline without training")
    plan.add_argument("config", type=Path, help="curriculum file (.yaml or .toml)")
    plan.set_defaults(func=_cmd_plan)

    run = sub.add_parser("run", help="train through a curriculum")
    run.add_argument("config", type=Path, help="curriculum file (.yaml or .toml)")
    run.add_argument(
        "--run-dir", type=Path, default=None, help="run directory (default runs/NAME-TIME)"
    )
    run.add_argument(
        "--resume", action="store_true", help="continue from the newest checkpoint in --run-dir"
    )
    run.add_argument(
        "--on-change",
        choices=["refuse", "keep-position", "restart-stage"],
        default="refuse",
        help="what to do when resuming a changed curriculum (default: refuse and list changes)",
    )
    run.add_argument(
        "--auto-resume",
        action="store_true",
        help="resume when --run-dir holds a checkpoint, else start "
        "(implied after a torchrun restart)",
    )
    run.add_argument(
        "--overwrite",
        action="store_true",
        help="start again in a used --run-dir, moving its files into .replaced-<time>/",
    )
    run.add_argument("--seed", type=int, default=None, help="override the config's seed")
    run.add_argument(
        "--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)"
    )
    run.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    run.add_argument(
        "--engine",
        choices=["torch", "accelerate"],
        default="torch",
        help="torch: DDP under torchrun (default); accelerate: under `accelerate launch`",
    )
    run.add_argument(
        "--parallel",
        choices=["ddp", "fsdp"],
        default=None,
        help="override the config's parallel.kind: ddp (replicas) or fsdp (FSDP2, sharded "
        "checkpoints)",
    )
    run.set_defaults(func=_cmd_run)

    cmp = sub.add_parser("compare", help="run the curriculum against control arms over seeds")
    cmp.add_argument("config", type=Path, help="curriculum file (.yaml or .toml)")
    cmp.add_argument(
        "--arms",
        default="curriculum,baseline",
        help="comma-separated: curriculum, baseline, union, anti, easy-only, random-order "
        "(default: %(default)s)",
    )
    cmp.add_argument("--seeds", type=int, default=10, help="seeds per arm (default: %(default)s)")
    cmp.add_argument(
        "--jobs", type=int, default=1, help="runs in parallel, in worker processes "
        "(default: %(default)s)",
    )  # fmt: skip
    cmp.add_argument(
        "--vary",
        default="init,data",
        help="what the seeds vary: init (weights, batch order), data (the seed data "
        "factories receive) or both (default: %(default)s)",
    )
    cmp.add_argument("--metric", default=None, help="target metric EVAL.KEY, e.g. test.accuracy")
    cmp.add_argument(
        "--target",
        type=float,
        default=None,
        help="time-to-target threshold (default: baseline median final)",
    )
    cmp.add_argument(
        "--out", type=Path, default=None, help="comparison directory (default runs/compare-NAME)"
    )
    cmp.set_defaults(func=_cmd_compare)

    rep = sub.add_parser(
        "report", help="plots, HTML and a summary table for a comparison directory"
    )
    rep.add_argument("run_dir", type=Path, help="the directory compare wrote")
    rep.add_argument(
        "--target", type=float, default=None,
        help="time-to-target threshold (files get their own names unless --out is given)",
    )  # fmt: skip
    rep.add_argument(
        "--metric", default=None, help="EVAL.KEY to report (default: the compared metric)"
    )
    rep.add_argument(
        "--out", type=Path, default=None, help="directory for the report (default: run_dir)"
    )
    rep.set_defaults(func=_cmd_report)

    ext = sub.add_parser(
        "extract", help="write a standalone submodel of an elastic run for one budget"
    )
    ext.add_argument("run_dir", type=Path, help="the elastic run's directory")
    ext.add_argument("--budget", required=True, help="budget name, e.g. small")
    ext.add_argument("--out", type=Path, required=True, help="output directory")
    ext.add_argument(
        "--format",
        choices=["stagetrain", "hf"],
        default="stagetrain",
        help="stagetrain: model.safetensors + model.json (any configuration); hf: a "
        "directory AutoModelForCausalLM.from_pretrained loads, with the run's tokenizer "
        "(default: %(default)s)",
    )
    ext.add_argument(
        "--tolerance",
        type=float,
        default=0.05,
        help="refuse a budget whose parameters miss its target by more (default: %(default)s)",
    )
    ext.add_argument(
        "--allow-off-target",
        action="store_true",
        help="write a budget beyond the tolerance anyway, with a warning",
    )
    ext.add_argument(
        "--project",
        action="store_true",
        help="first pin every budget to the nearest configuration within the tolerance",
    )
    ext.add_argument(
        "--check-batches",
        type=int,
        default=4,
        help="random batches compared against the masked parent (default: %(default)s)",
    )
    ext.set_defaults(func=_cmd_extract)

    demo = sub.add_parser(
        "demo", help="two-stage sparse parity against its baseline, with a report"
    )
    demo.add_argument("--seeds", type=int, default=8, help="seeds per arm (default: %(default)s)")
    demo.add_argument("--jobs", type=int, default=2, help="runs in parallel (default: %(default)s)")
    demo.add_argument("--out", type=Path, default=None, help="output directory (default runs/demo)")
    demo.set_defaults(func=_cmd_demo)
    _add_data_commands(sub)
    _add_lr_find(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``stagetrain`` command; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    console.set_up()
    if args.command == "run" and args.resume and args.run_dir is None:
        parser.error("--resume needs --run-dir")
    try:
        return int(args.func(args))
    except StageTrainError as exc:
        print(f"stagetrain: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("stagetrain: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
