"""The ``stagetrain`` command line: plan, run (and compare, report, demo)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from stagetrain.errors import StageTrainError


def _cmd_plan(args: argparse.Namespace) -> int:
    from stagetrain.config import load_config
    from stagetrain.curriculum import Curriculum
    from stagetrain.plan import make_plan

    config = load_config(args.config)
    print(make_plan(Curriculum(config)).format())
    return 0


def _cmd_run(args: argparse.Namespace) -> int:
    from stagetrain.config import load_config
    from stagetrain.curriculum import Curriculum
    from stagetrain.loop import fit

    config = load_config(args.config)
    if args.seed is not None:
        config = config.model_copy(update={"seed": args.seed})
    curriculum = Curriculum(config)
    model = curriculum.build_model()
    result = fit(
        model,
        curriculum,
        run_dir=args.run_dir,
        resume=args.resume,
        on_change=args.on_change,
        device=args.device,
        progress=not args.no_progress,
    )
    for name, metrics in result.metrics.items():
        shown = ", ".join(f"{k} {v:.4f}" for k, v in metrics.items())
        print(f"{name}: {shown}")
    print(f"run directory: {result.run_dir}")
    return 0


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
    run.add_argument("--seed", type=int, default=None, help="override the config's seed")
    run.add_argument(
        "--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)"
    )
    run.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    run.set_defaults(func=_cmd_run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``stagetrain`` command; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
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
