"""The `tokens` source: memory-mapped token files read as windows of seq_len + 1 tokens."""

from __future__ import annotations

import contextlib
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from stagetrain import Curriculum, DataError, parse_config
from stagetrain.plan import make_plan
from stagetrain.sources.tokens import TokenWindows, check_token_ids, tokens_source


def write_bin(path: Path, tokens: list[int] | np.ndarray, dtype: str = "uint16") -> str:
    np.asarray(tokens, dtype=dtype).tofile(path)
    return str(path)


def test_sequential_windows_tile_the_file(tmp_path: Path) -> None:
    path = write_bin(tmp_path / "t.bin", range(100, 111))  # 11 tokens
    data = tokens_source(files=path, dtype="uint16", seq_len=4, mode="sequential")
    assert len(data) == 2  # windows [0..4], [4..8]; [8..12] would run past the end
    inputs, targets = data.get_batch(np.array([1, 0]))
    assert inputs.tolist() == [[104, 105, 106, 107], [100, 101, 102, 103]]
    assert targets.tolist() == [[105, 106, 107, 108], [101, 102, 103, 104]]
    assert inputs.dtype == torch.int64
    assert data.num_tokens == 11 and data.describe()["unread_tokens"] == 2


def test_random_mode_has_a_window_at_every_start(tmp_path: Path) -> None:
    path = write_bin(tmp_path / "t.bin", range(10))
    data = tokens_source(files=path, dtype="uint16", seq_len=3)
    assert len(data) == 10 - 4 + 1
    assert data.windows(np.arange(len(data)))[:, 0].tolist() == list(range(7))
    strided = tokens_source(files=path, dtype="uint16", seq_len=3, stride=3)
    assert strided.windows(np.arange(len(strided))).tolist() == [
        [0, 1, 2, 3],
        [3, 4, 5, 6],
        [6, 7, 8, 9],
    ]


def test_windows_never_cross_files_and_npy_is_read_from_its_header(tmp_path: Path) -> None:
    first = write_bin(tmp_path / "a.bin", range(0, 6), "uint32")
    second = tmp_path / "b.npy"
    np.save(second, np.arange(50, 56, dtype=np.uint32))
    data = tokens_source(files=[first, str(second)], dtype="uint32", seq_len=2, mode="sequential")
    windows = data.windows(np.arange(len(data))).tolist()
    assert windows == [[0, 1, 2], [2, 3, 4], [50, 51, 52], [52, 53, 54]]


def test_glob_pattern_expands_sorted(tmp_path: Path) -> None:
    for i in (2, 1):
        write_bin(tmp_path / f"shard{i}.bin", [i] * 5, "uint8")
    data = tokens_source(files=str(tmp_path / "shard*.bin"), dtype="uint8", seq_len=4)
    assert [Path(f.path).name for f in data.files] == ["shard1.bin", "shard2.bin"]


def test_document_aware_windows_stay_inside_documents(tmp_path: Path) -> None:
    eos = 0
    # documents (each ending with its EOS): [5 6 0] [7 8 9 10 0] [1 0] [3 4] (no final EOS)
    path = write_bin(tmp_path / "d.bin", [5, 6, 0, 7, 8, 9, 10, 0, 1, 0, 3, 4])
    data = tokens_source(files=path, dtype="uint16", seq_len=2, mode="sequential",
                         eos_id=eos, document_aware=True)  # fmt: skip
    assert data.windows(np.arange(len(data))).tolist() == [[5, 6, 0], [7, 8, 9], [9, 10, 0]]
    randoms = tokens_source(files=path, dtype="uint16", seq_len=3, eos_id=eos, document_aware=True)
    assert randoms.windows(np.arange(len(randoms))).tolist() == [[7, 8, 9, 10], [8, 9, 10, 0]]
    for row in data.windows(np.arange(len(data))):
        assert eos not in row[:-1]  # an EOS only ever closes a window
    plain = tokens_source(files=path, dtype="uint16", seq_len=2, mode="sequential", eos_id=eos)
    assert plain.windows(np.arange(len(plain))).tolist()[1] == [0, 7, 8]  # crosses a boundary


def test_with_seq_len_is_a_view_over_the_same_file(tmp_path: Path) -> None:
    path = write_bin(tmp_path / "t.bin", range(1000))
    short = tokens_source(files=path, dtype="uint16", seq_len=8, mode="sequential")
    long = short.with_seq_len(32)
    assert isinstance(long, TokenWindows) and long.files == short.files
    assert (len(short), len(long)) == (999 // 8, 999 // 32)
    assert long[3][0].tolist() == list(range(96, 128))
    assert short.with_seq_len(8) is short
    assert short[3][0].tolist() == list(range(24, 32))  # the original is unchanged
    unset = tokens_source(files=path, dtype="uint16")
    with pytest.raises(DataError, match="seq_len: the window length is not set"):
        len(unset)
    assert len(unset.with_seq_len(8)) == len(tokens_source(files=path, dtype="uint16", seq_len=8))


def test_same_indices_same_windows_across_builds_and_pickling(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    path = write_bin(tmp_path / "t.bin", rng.integers(0, 5000, 20_000))
    a = tokens_source(files=path, dtype="uint16", seq_len=64)
    b = pickle.loads(pickle.dumps(tokens_source(files=path, dtype="uint16", seq_len=64)))
    idx = rng.integers(0, len(a), 256)
    for x, y in zip(a.get_batch(idx), b.get_batch(idx), strict=True):
        assert torch.equal(x, y)
    tokens = np.fromfile(path, dtype=np.uint16).astype(np.int64)
    inputs, targets = a.get_batch(idx)
    for row, start in enumerate(idx):  # random mode, stride 1: window i starts at token i
        assert inputs[row].tolist() == tokens[start : start + 64].tolist()
        assert targets[row].tolist() == tokens[start + 1 : start + 65].tolist()


def test_sidecar_gives_dtype_and_eos(tmp_path: Path) -> None:
    import json

    path = write_bin(tmp_path / "t.bin", [1, 2, 9, 3, 4, 5, 9], "uint8")
    (tmp_path / "t.json").write_text(json.dumps(
        {"format": "stagetrain-tokens", "dtype": "uint8", "eos_id": 9, "num_tokens": 7, "max_token_id": 9}
    ))  # fmt: skip
    data = tokens_source(files=path, seq_len=2, mode="sequential", document_aware=True)
    assert data.eos_id == 9
    assert data.windows(np.arange(len(data))).tolist() == [[1, 2, 9], [3, 4, 5]]
    with pytest.raises(
        DataError, match=r"args.dtype: 'uint16', but the sidecar of .* says 'uint8'"
    ):
        tokens_source(files=path, dtype="uint16", seq_len=2)


# --- bad input: one line naming the field and the file -------------------------------------


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(
        DataError, match=r"^tokens: args.files\[0\]: token file '.*nope.bin' not found$"
    ):
        tokens_source(files=str(tmp_path / "nope.bin"), dtype="uint16", seq_len=4)


def test_wrong_dtype_is_caught_by_the_file_size(tmp_path: Path) -> None:
    path = write_bin(tmp_path / "odd.bin", range(7), "uint8")  # 7 bytes
    with pytest.raises(
        DataError,
        match=r"^tokens: args.dtype: '.*odd.bin' has 7 bytes, not a multiple of 2 \(uint16 items\): wrong dtype\?$",
    ):
        tokens_source(files=path, dtype="uint16", seq_len=2)
    with pytest.raises(DataError, match=r"args.dtype: .*raw token file without a .json sidecar"):
        tokens_source(files=path, seq_len=2)
    with pytest.raises(DataError, match=r"args.dtype: 'float32' is not an integer dtype"):
        tokens_source(files=path, dtype="float32", seq_len=2)


def test_token_id_outside_the_vocabulary(tmp_path: Path) -> None:
    path = write_bin(tmp_path / "t.bin", [1, 2, 3, 300, 4, 5])
    with pytest.raises(
        DataError,
        match=r"^tokens: args.vocab_size: '.*t.bin' holds token id 300 at position 3, but the model's vocabulary has 256 ids \(0..255\)$",
    ):
        tokens_source(files=path, dtype="uint16", seq_len=2, vocab_size=256)
    data = tokens_source(files=path, dtype="uint16", seq_len=2)
    check_token_ids(data, 301)  # fits
    with pytest.raises(DataError, match=r"my.field: .* holds token id 300"):
        check_token_ids(data, 300, field="my.field")


def test_check_token_ids_on_any_dataset() -> None:
    from stagetrain.data import TensorPairDataset

    ids = torch.tensor([[1, 2, 3], [4, 5, 70]])
    data = TensorPairDataset(ids, ids.roll(-1, dims=1))
    check_token_ids(data, 71)
    with pytest.raises(
        DataError, match=r"stages\[0\].data: inputs of sampled items hold token id 70"
    ):
        check_token_ids(data, 70, field="stages[0].data")
    labels = TensorPairDataset(torch.zeros(4, 3, dtype=torch.long), torch.tensor([0, 1, 9, 2]))
    check_token_ids(labels, 2)  # class labels are not token ids


def test_seq_len_longer_than_every_document(tmp_path: Path) -> None:
    path = write_bin(tmp_path / "d.bin", [5, 6, 0, 7, 8, 9, 0, 1, 0])
    with pytest.raises(
        DataError,
        match=r"^tokens: seq_len: 4 is longer than every document in '.*d.bin' \(the longest has 4 tokens with its EOS; document_aware windows need seq_len \+ 1 = 5 tokens inside one document\)$",
    ):
        tokens_source(files=path, dtype="uint16", seq_len=4, eos_id=0, document_aware=True)
    data = tokens_source(files=path, dtype="uint16", seq_len=2, eos_id=0, document_aware=True)
    with pytest.raises(DataError, match="seq_len: 8 is longer than every document"):
        data.with_seq_len(8)
    with pytest.raises(DataError, match="document_aware: needs an eos_id"):
        tokens_source(files=path, dtype="uint16", seq_len=2, document_aware=True)


def test_bad_arguments(tmp_path: Path) -> None:
    path = write_bin(tmp_path / "t.bin", range(10))
    with pytest.raises(DataError, match=r"args.mode: expected 'random' or 'sequential'"):
        tokens_source(files=path, dtype="uint16", seq_len=2, mode="shuffled")  # type: ignore[arg-type]
    with pytest.raises(DataError, match=r"args.stride: only for mode 'random'"):
        tokens_source(files=path, dtype="uint16", seq_len=2, mode="sequential", stride=2)
    with pytest.raises(DataError, match="seq_len: 20 needs 21 tokens per window"):
        tokens_source(files=path, dtype="uint16", seq_len=20)


def test_memory_stays_bounded_when_reading_many_windows(tmp_path: Path) -> None:
    """Mappings are replaced after REMAP_BYTES, so touched pages do not pile up in the RSS
    (one mapping kept for the whole run grows towards the file's size)."""
    import psutil

    from stagetrain.sources.tokens import REMAP_BYTES

    path = tmp_path / "big.bin"
    with path.open("wb") as f:
        f.truncate(2 * 100_000_000)  # 1e8 uint16 tokens, sparse: 200 MB
    data = tokens_source(files=str(path), dtype="uint16", seq_len=128, mode="sequential")
    rng = np.random.default_rng(0)
    draws = [rng.integers(0, len(data), 512) for _ in range(201)]
    process = psutil.Process()

    def growth(read: object) -> int:
        read(draws[0])  # type: ignore[operator]
        before = process.memory_info().rss
        for idx in draws[1:]:  # 1e5 windows: most of the file's pages if all stayed mapped
            read(idx)  # type: ignore[operator]
        return process.memory_info().rss - before

    shipped = growth(data.get_batch)
    kept = data.files[0].mapped()
    view = np.lib.stride_tricks.sliding_window_view(kept, 129)
    forever = growth(lambda idx: np.array(view[data.window_starts(idx)[1]]))
    bound = REMAP_BYTES + 16 * 2**20  # the live mapping, plus slack for the allocator
    assert shipped < bound, shipped
    assert forever > 2 * bound, forever  # the test can tell the difference


# --- through a curriculum -----------------------------------------------------------------


def tokens_config(path: str, **stage_overrides: object) -> dict[str, object]:
    stage: dict[str, object] = {
        "name": "lm",
        "duration": "4ba",
        "seq_len": 8,
        "data": {"builtin": "tokens", "args": {"files": path, "dtype": "uint16", "seq_len": 8,
                                                "mode": "sequential"}},
    }  # fmt: skip
    stage.update(stage_overrides)
    return {"name": "tok", "seed": 1, "batch_size": 4, "stages": [stage]}


def test_curriculum_draws_windows_of_the_file(tmp_path: Path) -> None:
    path = write_bin(tmp_path / "t.bin", np.arange(1000) % 997)
    curriculum = Curriculum(parse_config(tokens_config(path)))
    stage = curriculum.stages[0]
    tokens = np.fromfile(path, dtype=np.uint16)
    for step in range(stage.steps):
        inputs, targets = stage.batch(step)
        for row, index in zip(inputs.tolist(), stage.indices(step).tolist(), strict=True):
            assert row == tokens[index * 8 : index * 8 + 8].tolist()
        assert torch.equal(targets[:, :-1], inputs[:, 1:])
    again = Curriculum(parse_config(tokens_config(path)))  # a fresh process would see the same
    assert torch.equal(again.stages[0].batch(3)[0], stage.batch(3)[0])
    assert stage.context.tokens_per_sample == 8


def test_plan_counts_passes_over_the_windows(tmp_path: Path) -> None:
    path = write_bin(tmp_path / "t.bin", range(801))  # 100 sequential windows of 8
    config = tokens_config(path, duration="1600tok")  # 200 samples: 2 passes over the tokens
    plan = make_plan(Curriculum(parse_config(config)))
    ((_label, share, passes),) = plan.stages[0].sources
    data = Curriculum(parse_config(config)).stages[0].data.datasets[0]
    # A pass is counted in tokens: tokens drawn / tokens in the file (801: the last one is
    # only ever a target), a little under two sequential passes over the 100 windows.
    assert share == 1.0 and passes == pytest.approx(200 * 8 / data.num_tokens)
    assert passes == pytest.approx(2.0, rel=0.01) and passes < 2.0
    randoms = tokens_source(files=path, dtype="uint16", seq_len=8)
    assert len(randoms) == 801 - 8  # a window per start: a sampler epoch is 8 passes
    assert randoms.samples_per_pass == data.samples_per_pass == pytest.approx(100.125)


def test_preflight_vocab_check_names_the_source_field(tmp_path: Path) -> None:
    pytest.importorskip("transformers")
    from helpers_sources import tied_lm

    from stagetrain.recipes.hf_models import gpt2_lm
    from stagetrain.sources.preflight import check_vocab, model_vocab_size

    good = write_bin(tmp_path / "good.bin", np.arange(400) % 32)
    bad = write_bin(tmp_path / "bad.bin", np.arange(400) % 41)
    config = tokens_config(good)
    config["stages"].append(  # type: ignore[attr-defined]
        {"name": "two", "duration": "2ba", "seq_len": 8,
         "data": {"sources": [{"builtin": "tokens", "name": "ok", "args": {"files": good, "dtype": "uint16", "seq_len": 8}},
                              {"builtin": "tokens", "name": "big", "args": {"files": bad, "dtype": "uint16", "seq_len": 8}}]}}
    )  # fmt: skip
    curriculum = Curriculum(parse_config(config))
    assert (
        model_vocab_size(gpt2_lm(vocab_size=50, n_positions=8, n_embd=8, n_layer=1, n_head=1)) == 50
    )
    assert check_vocab(curriculum, tied_lm(vocab=41)) == 41  # type: ignore[arg-type]
    with pytest.raises(
        DataError,
        match=r"^stages\[1\].data.sources\[1\]: '.*bad.bin' holds token id 40 at position 40, but the model's vocabulary has 32 ids \(0..31\)$",
    ):
        check_vocab(curriculum, tied_lm(vocab=32))  # type: ignore[arg-type]
    assert check_vocab(curriculum, torch.nn.Linear(2, 2)) is None  # no token embedding


class _StopAt:
    """A callback that interrupts the run after global step ``at`` (a crash, in effect)."""

    def __init__(self, at: int) -> None:
        self.at = at

    def on_step_end(self, run: object) -> None:
        if run.state.step == self.at:  # type: ignore[attr-defined]
            raise KeyboardInterrupt


def test_resume_continues_with_the_same_windows(tmp_path: Path) -> None:
    import json

    import stagetrain

    path = write_bin(tmp_path / "t.bin", np.arange(3000) % 32)

    def run(name: str, stop_at: int | None = None, resume: bool = False) -> list[list[list[int]]]:
        record = tmp_path / name
        record.mkdir(exist_ok=True)
        config = tokens_config(path, duration="10ba")
        config.update(checkpoint={"every": "5ba"}, model={
            "factory": "helpers_sources:recording_lm", "args": {"out_dir": str(record)}})  # fmt: skip
        curriculum = Curriculum(parse_config(config))
        callbacks = [_StopAt(stop_at)] if stop_at is not None else []
        with contextlib.suppress(KeyboardInterrupt):
            stagetrain.fit(curriculum.build_model(), curriculum, run_dir=tmp_path / f"run-{name}",
                           resume=resume, progress=False, tensorboard=False, callbacks=callbacks)  # fmt: skip
        return [json.loads(x) for x in (record / "rank0.jsonl").read_text().splitlines()]

    whole = run("whole")
    assert len(whole) == 10
    interrupted = run("cut", stop_at=7)
    assert interrupted == whole[:7]
    resumed = run("cut", resume=True)[7:]  # the same record file, appended after the resume
    assert resumed == whole[5:]  # back from the checkpoint at step 5, the same windows


def test_an_evaluation_that_follows_each_stages_context_is_warned_about(tmp_path: Path) -> None:
    """Short-then-long stages and a validation set without its own seq_len: the curve's
    stage-1 points measured 8-token context, its stage-2 points 16 (found by a user)."""
    import warnings

    from stagetrain.train.preflight import warn_eval_context

    path = write_bin(tmp_path / "t.bin", np.arange(1000) % 997)
    config = tokens_config(path)
    long = dict(config["stages"][0], name="long", seq_len=16)  # type: ignore[index]
    config["stages"] = [config["stages"][0], long]  # type: ignore[index]
    config["evals"] = [{"name": "val", "data": long["data"]}]
    with pytest.warns(UserWarning, match=r"evals\[0\] \('val'\) has no seq_len.*\(8, 16\)"):
        warn_eval_context(Curriculum(parse_config(config)))
    config["evals"][0]["seq_len"] = 16  # type: ignore[index]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        warn_eval_context(Curriculum(parse_config(config)))
