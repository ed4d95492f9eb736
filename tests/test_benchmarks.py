"""The benchmark scripts still fit the library's API: each imports, and the LLM comparison
builds its arms, its comparison description and its tables (nothing is trained)."""

from __future__ import annotations

import importlib.util
import inspect
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import yaml

from stagetrain.compare import CompareSpec, run_all
from stagetrain.config import CurriculumConfig
from stagetrain.time import Duration

ROOT = Path(__file__).resolve().parent.parent
BENCHMARKS = ROOT / "benchmarks"
SCRIPTS = sorted(p.stem for p in BENCHMARKS.glob("*.py"))


def load(stem: str) -> ModuleType:
    """Import ``benchmarks/<stem>.py`` as a module without running its ``main``."""
    path = BENCHMARKS / f"{stem}.py"
    spec = importlib.util.spec_from_file_location(f"benchmark_{stem.replace('-', '_')}", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    # Registered while it runs, as an import would: dataclasses look their module up there.
    sys.modules[spec.name] = module
    saved = list(sys.path)  # recipes.py puts benchmarks/ on the path to import tables.py
    try:
        spec.loader.exec_module(module)
    finally:
        sys.path[:] = saved
    return module


def test_every_benchmark_script_is_found() -> None:
    assert {"llm", "recipes", "tables", "compare_overhead"} <= set(SCRIPTS)


@pytest.mark.parametrize("stem", SCRIPTS)
def test_benchmark_script_imports(stem: str) -> None:
    module = load(stem)
    # tables.py and dev_tasks.py are imported by the others; every other script runs.
    assert callable(getattr(module, "main", None)) or stem in ("tables", "dev_tasks"), stem


def quick_arms() -> tuple[ModuleType, dict[str, CurriculumConfig]]:
    llm = load("llm")
    config = yaml.safe_load((ROOT / "examples" / "llm_two_stage_quick.yaml").read_text())
    return llm, llm.arm_configs(config)


def test_llm_arms_from_the_quick_recipe() -> None:
    _, arms = quick_arms()
    assert list(arms) == ["curriculum", "long-only", "mix", "same-steps"]
    curriculum, long_only, mix, same_steps = arms.values()
    assert [s.seq_len for s in curriculum.stages] == [64, 256]
    assert [s.seq_len for s in long_only.stages] == [256, 256]
    # long-only changes the context only: the same stages, lengths and optimizers
    for ours, theirs in zip(curriculum.stages, long_only.stages, strict=True):
        assert (ours.name, ours.duration, ours.optimizer) == (
            theirs.name,
            theirs.duration,
            theirs.optimizer,
        )
    # same-steps: long-only with stage 1's batch cut to a quarter, so that stage 1 takes
    # the curriculum's optimizer steps (32 x 64 = 8 x 256 tokens per step)
    assert [s.seq_len for s in same_steps.stages] == [256, 256]
    assert same_steps.stages[0].batch_size == 8 and same_steps.stages[1].batch_size is None
    steps = [
        Duration.parse(s.duration).value / ((s.batch_size or arm.batch_size) * (s.seq_len or 0))
        for arm in (curriculum, same_steps)
        for s in arm.stages[:1]
    ]
    assert steps[0] == steps[1]
    assert same_steps.stages[0].optimizer == curriculum.stages[0].optimizer
    (stage,) = mix.stages
    assert stage.seq_len == 256 and stage.optimizer is not None
    assert stage.optimizer.schedule is not None and stage.optimizer.schedule.kind == "wsd"
    # the mixture's code share is the curriculum's overall one: (T1 + 0.3 T2) / (T1 + T2)
    weights = {s.name: s.weight for s in stage.data.sources}
    assert all(isinstance(w, float) for w in weights.values())
    t1, t2 = 1.2e5, 4.0e4
    assert weights["code"] == pytest.approx((t1 + 0.3 * t2) / (t1 + t2))
    assert weights["docs"] == pytest.approx(0.7 * t2 / (t1 + t2))


def test_llm_comparison_description_fits_run_all() -> None:
    llm, arms = quick_arms()
    spec = llm.build_spec(arms, 3)
    assert isinstance(spec, CompareSpec)
    assert spec.arms == ["curriculum", "long-only", "mix", "same-steps"]
    assert spec.seeds == spec.init_seeds == [0, 1, 2] and spec.data_seeds == [0, 1, 2]
    assert {"val_docs.loss", "val_code.loss"} <= set(spec.metrics)
    # another arm definition is another comparison
    other = dict(arms, mix=arms["long-only"])
    assert llm.build_spec(other, 3).fingerprint != spec.fingerprint
    # the call main() makes, checked against run_all's signature without running it
    inspect.signature(run_all).bind(
        Path("out"), spec, arms, jobs=1, threads=1, echo=lambda line: None
    )


def test_llm_comparison_directory_takes_more_seeds_of_the_same_arms(tmp_path: Path) -> None:
    llm, arms = quick_arms()
    llm.write_comparison(tmp_path, arms, llm.build_spec(arms, 5))
    # more seeds of the same arms: seeds 0-4 are the same runs, so the directory is reused
    llm.write_comparison(tmp_path, arms, llm.build_spec(arms, 8))
    assert CompareSpec.from_file(tmp_path / "compare.json").seeds == list(range(8))
    llm.write_comparison(tmp_path, arms, llm.build_spec(arms, 3))
    other = dict(arms, mix=arms["long-only"])
    with pytest.raises(SystemExit, match="holds another comparison"):
        llm.write_comparison(tmp_path, other, llm.build_spec(other, 3))


def test_llm_comparison_directory_takes_a_new_arm_beside_the_same_ones(tmp_path: Path) -> None:
    llm, arms = quick_arms()
    fewer = {k: v for k, v in arms.items() if k != "same-steps"}
    llm.write_comparison(tmp_path, fewer, llm.build_spec(fewer, 5))
    # the three arms' runs stay valid: a fourth arm is added beside them
    llm.write_comparison(tmp_path, arms, llm.build_spec(arms, 5))
    assert CompareSpec.from_file(tmp_path / "compare.json").arms == list(arms)
    assert (tmp_path / "arms" / "same-steps.yaml").exists()
    # but an arm of the same name with another definition is another comparison
    changed = dict(arms, **{"same-steps": arms["long-only"]})
    with pytest.raises(SystemExit, match="arm same-steps"):
        llm.write_comparison(tmp_path, changed, llm.build_spec(changed, 5))


def test_llm_tables_from_per_seed_values() -> None:
    llm = load("llm")
    seeds = [0, 1, 2, 3, 4]

    def arm(finals: list[float]) -> dict[str, Any]:
        # one evaluation halfway at loss + 1, then the final value at 100 tokens
        return {"final": finals, "curve": [[[50, v + 1.0], [100, v]] for v in finals]}

    losses = {
        "curriculum": arm([5.0, 5.1, 5.2, 5.0, 5.1]),
        "long-only": arm([5.5, 5.6, 5.4, 5.5, 5.7]),
        "mix": arm([5.0, 5.2, 5.1, 5.1, 5.0]),
    }
    data = {
        "seeds": seeds,
        "data_seeds": seeds,
        "metrics": {"val_docs.loss": losses},
        "wall_s": {a: [1.0] * 5 for a in losses},
        "eval_every": "50tok",
        "quick": True,
        "command": "python benchmarks/llm.py --quick",
        "machine": "test",
        "config": "examples/llm_two_stage_quick.yaml",
        "elapsed_s": 60.0,
    }
    text = llm.render(data)
    # the comparison rows (the per-arm summary rows come first and have no "seeds)")
    rows = {
        line.split(" | ")[0]: line
        for line in text.splitlines()
        if line.startswith("| ") and "seeds)" in line
    }
    assert "better on 5/5 seeds" in rows["| long-only"]
    # 5 seeds: the exact test's smallest p is 2/32, so nothing is significant
    assert "no significant difference (p = 0.0625)" in rows["| long-only"]
    assert "smallest possible p is 0.0625" in text
    # the curriculum reaches long-only's median final (5.5) at its last evaluation on
    # every seed, long-only itself on 3 of 5
    assert "5/5 [0.48, 1.00], median 100" in rows["| long-only"]
    assert "3/5 [0.15, 0.95], median 100" in rows["| long-only"]
