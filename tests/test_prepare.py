"""`stagetrain prepare`: text / JSONL / a saved HF dataset -> token file + sidecar."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from helpers_sources import TEXTS, encode, train_tokenizer, write_jsonl

from stagetrain.cli import main
from stagetrain.errors import DataError
from stagetrain.sources import prepare as prep
from stagetrain.sources.tokens import tokens_source

pytest.importorskip("tokenizers")  # the 'hf' extra (setup.sh checks it is installed)


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return train_tokenizer(tmp_path_factory.mktemp("tok") / "tokenizer.json")


def test_text_files_as_bytes(tmp_path: Path) -> None:
    a, b = tmp_path / "a.py", tmp_path / "b.txt"
    a.write_bytes(b"x = 1\n")
    b.write_bytes("caf\u00e9\n".encode() + b"\xff")  # not UTF-8 at the end: kept byte for byte
    out = tmp_path / "out" / "bytes.bin"
    result = prep.prepare([a, b], out, tokenizer="bytes", progress=False)
    assert not result.skipped
    assert np.fromfile(out, dtype=np.uint8).tobytes() == a.read_bytes() + b.read_bytes()
    side = json.loads(out.with_suffix(".json").read_text())
    assert side["dtype"] == "uint8" and side["vocab_size"] == 256 and side["eos_id"] is None
    assert side["num_documents"] == 2 and side["num_tokens"] == out.stat().st_size
    assert [Path(i["path"]).name for i in side["inputs"]] == ["a.py", "b.txt"]
    assert all(len(i["sha256"]) == 64 for i in side["inputs"])
    assert side["tokenizer"]["spec"] == "bytes"


def test_token_files_get_the_same_mode_as_their_sidecar(tmp_path: Path) -> None:
    """Token files were private (0600, from mkstemp) beside 0644 sidecars: unreadable to
    the other users of a shared file system."""
    import os

    (tmp_path / "a.txt").write_text("some text\n")
    old = os.umask(0o022)
    try:
        out = tmp_path / "t.bin"
        prep.prepare([tmp_path / "a.txt"], out, tokenizer="bytes", progress=False)
    finally:
        os.umask(old)
    assert out.stat().st_mode & 0o777 == 0o644
    assert out.with_suffix(".json").stat().st_mode & 0o777 == 0o644


def test_jsonl_with_a_trained_tokenizer(tmp_path: Path, tokenizer: Path) -> None:
    data = write_jsonl(tmp_path / "docs.jsonl", TEXTS)
    out = tmp_path / "docs.bin"
    prep.prepare([data], out, tokenizer=str(tokenizer), progress=False)
    side = json.loads(out.with_suffix(".json").read_text())
    eos = side["eos_id"]
    assert eos == 0  # <|endoftext|> is the tokenizer's first special token
    expected = [t for ids in encode(tokenizer, TEXTS) for t in [*ids, eos]]
    assert side["dtype"] == "uint16"  # vocabulary 300 > 256
    assert np.fromfile(out, dtype=np.uint16).tolist() == expected
    assert side["num_documents"] == len(TEXTS) and side["num_tokens"] == len(expected)
    assert side["max_token_id"] == max(expected) and side["text_field"] == "text"
    assert len(side["tokenizer"]["sha256"]) == 64
    # the token file feeds the tokens source with nothing but its path
    windows = tokens_source(files=str(out), seq_len=4, mode="sequential", document_aware=True)
    assert windows.eos_id == eos and len(windows) > 0


def test_saved_hf_dataset_gives_the_same_tokens_as_jsonl(tmp_path: Path, tokenizer: Path) -> None:
    import datasets

    saved = tmp_path / "saved"
    datasets.Dataset.from_dict({"body": TEXTS}).save_to_disk(str(saved))
    from_hf = prep.prepare([saved], tmp_path / "hf.bin", tokenizer=str(tokenizer),
                           text_field="body", progress=False)  # fmt: skip
    from_jsonl = prep.prepare([write_jsonl(tmp_path / "d.jsonl", TEXTS, "body")],
                              tmp_path / "j.bin", tokenizer=str(tokenizer), text_field="body",
                              progress=False)  # fmt: skip
    assert (tmp_path / "hf.bin").read_bytes() == (tmp_path / "j.bin").read_bytes()
    assert from_hf.sidecar["inputs"][0]["sha256"].startswith("hf-fingerprint:")
    assert from_jsonl.sidecar["num_documents"] == len(TEXTS)


def test_output_is_the_same_for_any_number_of_workers(
    tmp_path: Path, tokenizer: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(prep, "CHUNK_DOCS", 2)  # many chunks, spread over the workers
    data = write_jsonl(tmp_path / "docs.jsonl", TEXTS * 3)
    one = prep.prepare([data], tmp_path / "one.bin", tokenizer=str(tokenizer), progress=False)
    two = prep.prepare([data], tmp_path / "two.bin", tokenizer=str(tokenizer), workers=2,
                       progress=False)  # fmt: skip
    assert (tmp_path / "one.bin").read_bytes() == (tmp_path / "two.bin").read_bytes()
    assert one.sidecar["num_tokens"] == two.sidecar["num_tokens"]


def test_rerun_skips_finished_work_and_redoes_changed_inputs(
    tmp_path: Path, tokenizer: Path
) -> None:
    data = write_jsonl(tmp_path / "docs.jsonl", TEXTS)
    out = tmp_path / "docs.bin"
    prep.prepare([data], out, tokenizer=str(tokenizer), progress=False)
    stamp = out.stat().st_mtime_ns
    again = prep.prepare([data], out, tokenizer=str(tokenizer), progress=False)
    assert again.skipped and out.stat().st_mtime_ns == stamp
    write_jsonl(data, TEXTS[:4])  # the input changed: its hash no longer matches
    changed = prep.prepare([data], out, tokenizer=str(tokenizer), progress=False)
    assert not changed.skipped and changed.sidecar["num_documents"] == 4
    other = prep.prepare([data], out, tokenizer=str(tokenizer), eos_id="none", progress=False)
    assert not other.skipped and other.sidecar["eos_id"] is None


def test_a_failure_leaves_no_partial_output(tmp_path: Path, tokenizer: Path) -> None:
    data = tmp_path / "docs.jsonl"
    lines = [json.dumps({"text": t}) for t in TEXTS * 40] + ["{not json"]
    data.write_text("\n".join(lines) + "\n")
    out = tmp_path / "out" / "docs.bin"
    with pytest.raises(DataError, match=r"docs.jsonl:721: not valid JSON"):
        prep.prepare([data], out, tokenizer=str(tokenizer), progress=False)
    assert sorted(p.name for p in out.parent.iterdir()) == []  # no .bin, no sidecar, no temp


def test_cli_prepare_and_its_errors(
    tmp_path: Path, tokenizer: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    files = []
    for i, text in enumerate(TEXTS[:3]):
        files.append(tmp_path / f"f{i}.py")
        files[-1].write_text(text)
    listing = tmp_path / "list.txt"
    listing.write_text("\n".join(str(f) for f in files[1:]) + "\n")
    out = tmp_path / "t.bin"
    argv = ["prepare", str(files[0]), "--files-from", str(listing), "--out", str(out),
            "--tokenizer", str(tokenizer), "--workers", "2", "--no-progress"]  # fmt: skip
    assert main(argv) == 0
    assert capsys.readouterr().out.startswith(f"wrote {out}: ")
    assert json.loads(out.with_suffix(".json").read_text())["num_documents"] == 3
    assert main(argv) == 0
    assert capsys.readouterr().out.startswith(f"up to date {out}: ")

    def error(*args: str) -> str:
        assert main(["prepare", *args, "--no-progress"]) == 2
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1
        return lines[0]

    assert error(str(tmp_path / "missing.txt"), "--out", str(out)) == (
        f"stagetrain: error: inputs: {tmp_path / 'missing.txt'} not found"
    )
    broken = tmp_path / "broken.json"
    broken.write_text("{ nope")
    assert error(str(files[0]), "--out", str(out), "--tokenizer", str(broken)).startswith(
        f"stagetrain: error: --tokenizer: cannot load the tokenizer '{broken}' ("
    )
    assert "--tokenizer: " in error(str(files[0]), "--out", str(out), "--tokenizer", "nowhere.json")
    assert error(str(files[0]), "--out", str(tmp_path / "t.npy")).endswith(
        "--out: the token file's name must end in .bin, got " + repr(str(tmp_path / "t.npy"))
    )
    jsonl = write_jsonl(tmp_path / "d.jsonl", TEXTS[:2])
    assert error(str(jsonl), "--out", str(out), "--text-field", "body") == (
        f"stagetrain: error: --text-field: {jsonl}:1 has no field 'body' (has ['id', 'text'])"
    )
    assert "--eos-id: 999 is outside the tokenizer's 256 ids" in error(
        str(files[0]), "--out", str(out), "--eos-id", "999"
    )
