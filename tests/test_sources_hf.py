"""The `hf` source: local Hugging Face datasets, columns, tokenization (cached), pack and pad."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers_sources import TEXTS, encode, train_tokenizer, write_jsonl

from stagetrain import Curriculum, DataError, parse_config
from stagetrain.sources import tokenizer as tokenizer_module
from stagetrain.sources.hf import ColumnDataset, PaddedDocuments, hf_source
from stagetrain.sources.tokenizer import load_tokenizer
from stagetrain.sources.tokens import TokenWindows

datasets = pytest.importorskip("datasets")


@pytest.fixture(autouse=True)
def _hf_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """datasets' own Arrow cache in the test's directory, never in ~/.cache."""
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf-cache"))
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-cache")


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return train_tokenizer(tmp_path_factory.mktemp("tok") / "tokenizer.json")


def expected_stream(tokenizer: Path, texts: list[str], eos: int = 0) -> list[int]:
    return [t for ids in encode(tokenizer, texts) for t in [*ids, eos]]


def test_columns_to_pairs_from_parquet(tmp_path: Path) -> None:
    table = datasets.Dataset.from_dict({"x": [[1, 2], [3, 4], [5, 6]], "y": [0, 1, 0]})
    table.to_parquet(str(tmp_path / "d.parquet"))
    data = hf_source(
        data_files=str(tmp_path / "d.parquet"), columns={"inputs": "x", "targets": "y"}
    )
    assert isinstance(data, ColumnDataset) and len(data) == 3
    inputs, targets = data.get_batch(np.array([2, 0]))
    assert inputs.tolist() == [[5, 6], [1, 2]] and targets.tolist() == [0, 0]
    assert data[1][0].tolist() == [3, 4]


def test_columns_to_dict_batches_from_a_saved_dataset(tmp_path: Path) -> None:
    saved = tmp_path / "saved"
    datasets.DatasetDict({
        "train": datasets.Dataset.from_dict({"ids": [[1, 2, 3], [4, 5, 6]], "lab": [[2, 3, 4], [5, 6, 7]]}),
        "validation": datasets.Dataset.from_dict({"ids": [[9, 9, 9]], "lab": [[9, 9, 9]]}),
    }).save_to_disk(str(saved))  # fmt: skip
    data = hf_source(path=str(saved), split="train", columns={"input_ids": "ids", "labels": "lab"})
    batch = data.get_batch(np.array([1]))
    assert set(batch) == {"input_ids", "labels"} and batch["labels"].tolist() == [[5, 6, 7]]
    val = hf_source(path=str(saved), split="validation", columns={"input_ids": "ids"})
    assert len(val) == 1
    with pytest.raises(
        DataError,
        match=r"^hf: args.split: '.*saved' has no split 'test' \(splits: \['train', 'validation'\]\)$",
    ):
        hf_source(path=str(saved), split="test", columns={"input_ids": "ids"})


def test_pack_from_jsonl_gives_windows_of_the_token_stream(tmp_path: Path, tokenizer: Path) -> None:
    data = hf_source(data_files=str(write_jsonl(tmp_path / "d.jsonl", TEXTS)), tokenizer=str(tokenizer),
                     seq_len=8, cache_dir=str(tmp_path / "cache"), progress=False)  # fmt: skip
    assert isinstance(data, TokenWindows) and data.mode == "sequential"
    stream = expected_stream(tokenizer, TEXTS)
    assert len(data) == (len(stream) - 1) // 8
    inputs, targets = data.get_batch(np.array([0, 3]))
    assert inputs[1].tolist() == stream[24:32] and targets[1].tolist() == stream[25:33]
    assert data.with_seq_len(16)[1][0].tolist() == stream[16:32]


def test_pad_layout_gives_padded_dicts(tmp_path: Path, tokenizer: Path) -> None:
    data = hf_source(data_files=str(write_jsonl(tmp_path / "d.jsonl", TEXTS)), tokenizer=str(tokenizer),
                     layout="pad", seq_len=32, pad_id=1, cache_dir=str(tmp_path / "cache"),
                     progress=False)  # fmt: skip
    assert isinstance(data, PaddedDocuments) and len(data) == len(TEXTS)
    docs = [[*ids, 0] for ids in encode(tokenizer, TEXTS)]
    order = np.arange(len(docs))[::-1]
    batch = data.get_batch(order)
    for row, index in enumerate(order):
        doc = docs[index]
        n = min(len(doc), 32)
        assert batch["input_ids"][row, :n].tolist() == doc[:n]
        assert batch["input_ids"][row, n:].tolist() == [1] * (32 - n)
        assert batch["attention_mask"][row].tolist() == [1] * n + [0] * (32 - n)
        assert batch["labels"][row].tolist() == doc[:n] + [-100] * (32 - n)
    lengths = [len(d) for d in docs]
    assert min(lengths) < 32 < max(lengths)  # some documents padded, some cut
    wide = data.with_seq_len(64)
    assert wide.get_batch(np.array([0]))["input_ids"].shape == (1, 64)
    assert wide.tokens_per_sample() == pytest.approx(np.mean([len(d) for d in docs]))


def test_tokenization_is_cached_and_the_tokenizer_not_called_again(
    tmp_path: Path, tokenizer: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = {"n": 0}
    original = tokenizer_module.JsonTokenizer.encode_batch

    def counting(self: tokenizer_module.JsonTokenizer, texts: list[str]) -> list[list[int]]:
        calls["n"] += 1
        return original(self, texts)

    monkeypatch.setattr(tokenizer_module.JsonTokenizer, "encode_batch", counting)
    files = str(write_jsonl(tmp_path / "d.jsonl", TEXTS))
    args = {"data_files": files, "tokenizer": str(tokenizer), "seq_len": 8, "progress": False,
            "cache_dir": str(tmp_path / "cache")}  # fmt: skip
    first = hf_source(**args)
    assert calls["n"] >= 1
    calls["n"] = 0
    second = hf_source(**args)
    assert calls["n"] == 0  # read from the cache
    assert torch.equal(first.get_batch(np.arange(4))[0], second.get_batch(np.arange(4))[0])
    padded = hf_source(**args, layout="pad")  # the same cached tokens serve both layouts
    assert calls["n"] == 0 and len(padded) == len(TEXTS)
    (entry,) = (tmp_path / "cache").iterdir()
    assert sorted(p.name for p in entry.iterdir()) == [
        "tokens.bin",
        "tokens.docs.npy",
        "tokens.json",
    ]
    write_jsonl(Path(files), TEXTS[:5])  # new content: a new key, tokenized again
    changed = hf_source(**args, layout="pad")
    assert calls["n"] >= 1 and len(changed) == 5
    assert len(list((tmp_path / "cache").iterdir())) == 2


def test_default_cache_follows_stagetrain_cache(
    tmp_path: Path, tokenizer: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("STAGETRAIN_CACHE", str(tmp_path / "st"))
    hf_source(data_files=str(write_jsonl(tmp_path / "d.jsonl", TEXTS)), tokenizer=str(tokenizer),
              seq_len=8, progress=False)  # fmt: skip
    assert len(list((tmp_path / "st" / "tokenized").iterdir())) == 1


def test_transformers_tokenizer_directory(tmp_path: Path, tokenizer: Path) -> None:
    from transformers import PreTrainedTokenizerFast

    fast = PreTrainedTokenizerFast(tokenizer_file=str(tokenizer), eos_token="<|endoftext|>")
    fast.save_pretrained(str(tmp_path / "tok-dir"))
    loaded = load_tokenizer(str(tmp_path / "tok-dir"))
    assert type(loaded).__name__ == "TransformersTokenizer" and loaded.eos_id == 0
    assert loaded.encode_batch(TEXTS[:2]) == encode(tokenizer, TEXTS[:2])
    data = hf_source(data_files=str(write_jsonl(tmp_path / "d.jsonl", TEXTS)), tokenizer=str(tmp_path / "tok-dir"),
                     seq_len=8, cache_dir=str(tmp_path / "cache"), progress=False)  # fmt: skip
    assert data[0][0].tolist() == expected_stream(tokenizer, TEXTS)[:8]


def test_csv_and_text_files(tmp_path: Path, tokenizer: Path) -> None:
    (tmp_path / "d.csv").write_text("body,n\nhello world,1\nsecond row,2\n")
    data = hf_source(data_files=str(tmp_path / "d.csv"), tokenizer="bytes", text_column="body",
                     eos_id=10, seq_len=4, cache_dir=str(tmp_path / "c"), progress=False)  # fmt: skip
    assert data.windows(np.array([0])).tolist() == [list(b"hello")]
    (tmp_path / "d.txt").write_text("line one\nline two\n")
    lines = hf_source(data_files=str(tmp_path / "d.txt"), tokenizer="bytes", layout="pad",
                      seq_len=9, cache_dir=str(tmp_path / "c"), progress=False)  # fmt: skip
    assert len(lines) == 2 and lines[1]["input_ids"][:8].tolist() == list(b"line two")


def test_hf_source_in_a_curriculum(tmp_path: Path, tokenizer: Path) -> None:
    files = str(write_jsonl(tmp_path / "d.jsonl", TEXTS))
    config = {
        "name": "hf", "seed": 0, "batch_size": 4,
        "stages": [{"name": "s", "duration": "3ba", "seq_len": 8, "data": {
            "builtin": "hf", "args": {"data_files": files, "tokenizer": str(tokenizer), "seq_len": 8,
                                      "cache_dir": str(tmp_path / "cache"), "progress": False}}}],
    }  # fmt: skip
    stage = Curriculum(parse_config(config)).stages[0]
    stream = expected_stream(tokenizer, TEXTS)
    inputs, _ = stage.batch(0)
    for row, index in zip(inputs.tolist(), stage.indices(0).tolist(), strict=True):
        assert row == stream[index * 8 : index * 8 + 8]


# --- bad input ----------------------------------------------------------------------------


def test_missing_column(tmp_path: Path, tokenizer: Path) -> None:
    files = str(write_jsonl(tmp_path / "d.jsonl", TEXTS))
    with pytest.raises(
        DataError,
        match=r"^hf: args.text_column: no column 'body' in '.*d.jsonl' \(columns: \['text', 'id'\]\)$",
    ):
        hf_source(data_files=files, tokenizer=str(tokenizer), text_column="body", seq_len=4)
    with pytest.raises(DataError, match=r"^hf: args.columns.inputs: no column 'x' in '.*d.jsonl'"):
        hf_source(data_files=files, columns={"inputs": "x", "targets": "id"})


def test_ragged_column_without_tokenizer(tmp_path: Path) -> None:
    datasets.Dataset.from_dict({"x": [[1], [2, 3]], "y": [0, 1]}).to_parquet(
        str(tmp_path / "r.parquet")
    )
    data = hf_source(
        data_files=str(tmp_path / "r.parquet"), columns={"inputs": "x", "targets": "y"}
    )
    with pytest.raises(
        DataError, match=r"args.columns.inputs: column 'x' of .* holds rows of different lengths"
    ):
        data.get_batch(np.array([0, 1]))


def test_tokenizer_that_cannot_be_loaded(tmp_path: Path) -> None:
    files = str(write_jsonl(tmp_path / "d.jsonl", TEXTS))
    bad = tmp_path / "tokenizer.json"
    bad.write_text(json.dumps({"not": "a tokenizer"}))
    with pytest.raises(
        DataError, match=r"^hf: args.tokenizer: cannot load the tokenizer '.*tokenizer.json' \("
    ):
        hf_source(data_files=files, tokenizer=str(bad), seq_len=4)
    with pytest.raises(DataError, match=r"^hf: args.tokenizer: '.*nope' not found"):
        hf_source(data_files=files, tokenizer=str(tmp_path / "nope"), seq_len=4)


def test_missing_data_and_vocab_check(tmp_path: Path, tokenizer: Path) -> None:
    with pytest.raises(DataError, match=r"^hf: args.data_files\[0\]: '.*gone.jsonl' not found$"):
        hf_source(data_files=str(tmp_path / "gone.jsonl"), tokenizer="bytes")
    with pytest.raises(
        DataError, match=r"^hf: args.path: '.*nothing' is not a directory written by save_to_disk$"
    ):
        hf_source(path=str(tmp_path / "nothing"), columns={"inputs": "x"})
    with pytest.raises(DataError, match="give exactly one of 'path'"):
        hf_source(columns={"inputs": "x"})
    files = str(write_jsonl(tmp_path / "d.jsonl", TEXTS))
    with pytest.raises(
        DataError,
        match=r"^hf: args.vocab_size: .* holds token id \d+ \(per its sidecar\), but the model's vocabulary has 100 ids",
    ):
        hf_source(data_files=files, tokenizer=str(tokenizer), seq_len=4, vocab_size=100,
                  cache_dir=str(tmp_path / "c"), progress=False)  # fmt: skip
    with pytest.raises(
        DataError,
        match=r"args.vocab_size: the tokenized data .* holds token id \d+, but the model's vocabulary has 100 ids",
    ):
        hf_source(data_files=files, tokenizer=str(tokenizer), layout="pad", seq_len=4, vocab_size=100,
                  cache_dir=str(tmp_path / "c"), progress=False)  # fmt: skip
