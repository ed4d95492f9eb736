"""The real-data sources wired into the curriculum and fit: windows follow each stage's
seq_len (replay included), token-share mixtures, and the vocabulary check before step 0."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
from helpers_sources import token_file

from stagetrain import Curriculum, DataError, fit, parse_config


def two_stages(tmp_path: Path, **data: Any) -> dict[str, Any]:
    path = token_file(tmp_path / "t.bin")

    def tokens() -> dict[str, Any]:  # a fresh dict each time: stages are edited apart
        return {"builtin": "tokens", "args": {"files": path, "dtype": "uint16"}}

    return {
        "batch_size": 4,
        "model": {"builtin": "gpt", "args": {"vocab": 32, "context": 32, "width": 16, "layers": 1, "heads": 2}},
        "stages": [
            {"name": "short", "duration": "3ba", "seq_len": 8, "data": {**tokens(), "name": "text"}},
            {"name": "long", "duration": "3ba", "seq_len": 32,
             "data": {"sources": [{**tokens(), "name": "more"}], **data}},
        ],
    }  # fmt: skip


def test_windows_follow_each_stage_and_replay_reads_at_the_new_length(tmp_path: Path) -> None:
    curriculum = Curriculum(parse_config(two_stages(tmp_path, replay=0.5)), progress=False)
    short, long = curriculum.stages
    assert short.batch(0)[0].shape == (4, 8)
    inputs, targets = long.batch(0)
    assert inputs.shape == (4, 32) and not (targets == -100).any()  # replay read, not padded
    replayed = long.data.datasets[1]
    assert replayed.seq_len == 32 and short.data.datasets[0].seq_len == 8


def test_token_shares_become_sample_shares(tmp_path: Path) -> None:
    config = two_stages(tmp_path)
    sources = config["stages"][1]["data"]["sources"]
    sources[0]["weight"] = 0.5
    sources.append(
        {"builtin": "tokens", "name": "half", "weight": 0.5,
         "args": {"files": token_file(tmp_path / "u.bin"), "dtype": "uint16", "seq_len": 16}}
    )  # fmt: skip
    config["stages"][1]["seq_len"] = None  # each source keeps its own window length
    sources[0]["args"]["seq_len"] = 32
    config["stages"][1]["data"]["weight_unit"] = "tokens"
    stage = Curriculum(parse_config(config), progress=False).stages[1]
    shares = [s.share for s in stage.sources]
    # 32-token windows next to 16-token ones: equal token shares need twice the short samples.
    assert shares == pytest.approx([1 / 3, 2 / 3])


def test_token_ids_past_the_vocabulary_are_refused_before_step_0(tmp_path: Path) -> None:
    config = two_stages(tmp_path)
    bad = np.full(200, 40, dtype=np.uint16)
    bad.tofile(tmp_path / "bad.bin")
    config["stages"][1]["data"]["sources"][0]["args"]["files"] = str(tmp_path / "bad.bin")
    curriculum = Curriculum(parse_config(config), progress=False)
    with pytest.raises(DataError, match=r"stages\[1\]\.data\.sources\[0\]: .*bad\.bin.*vocabulary"):
        fit(curriculum.build_model(), curriculum, run_dir=tmp_path / "r", progress=False)
    assert not (tmp_path / "r" / "metrics.jsonl").exists()


def test_train_records_count_each_sources_tokens(tmp_path: Path) -> None:
    from stagetrain.logs import read_records

    config = two_stages(tmp_path)
    sources = config["stages"][1]["data"]["sources"]
    sources[0]["weight"] = 0.7
    sources.append({"builtin": "tokens", "name": "replayed", "weight": 0.3,
                    "args": {"files": token_file(tmp_path / "u.bin"), "dtype": "uint16"}})  # fmt: skip
    config["stages"][1]["duration"] = "40ba"
    config["log_every"] = 10
    curriculum = Curriculum(parse_config(config), progress=False)
    fit(curriculum.build_model(), curriculum, run_dir=tmp_path / "r", progress=False)
    last = [r for r in read_records(tmp_path / "r" / "metrics.jsonl") if r["type"] == "train"][-1]
    more, replayed = last["source_tokens/more"], last["source_tokens/replayed"]
    assert more + replayed == 40 * 4 * 32  # every token of the stage, by source
    assert more / (more + replayed) == pytest.approx(0.7, abs=0.01)


def test_plan_counts_passes_over_a_token_file_in_tokens(tmp_path: Path) -> None:
    from stagetrain import make_plan

    config = two_stages(tmp_path)
    config["stages"][1]["duration"] = "10ba"
    plan = make_plan(Curriculum(parse_config(config), progress=False))
    (_, share, passes) = plan.stages[1].sources[0]
    # 10 steps x 4 windows x 32 tokens over a 4,000-token file, whatever the stride
    assert passes == pytest.approx(10 * 4 * 32 / 4000, rel=0.02) and share == 1.0
