"""Two text domains found on every Python installation, for the two-stage LLM recipe.

* **code** (general text, stage 1): the ``*.py`` files of CPython's standard library,
  chosen and split as in :mod:`stagetrain.recipes.pystdlib` (a file goes to validation
  when ``crc32(relative path) % 10 == 0``), without ``pydoc_data`` (the docs below) and
  with every docstring replaced by ``...``, so that the two domains share no text.
* **docs** (the "high-quality" domain, stage 2): English documentation prose: the
  docstrings of those same files (module, classes, functions; one document per file,
  same split) and the Python Language Reference topics that ship as
  ``pydoc_data.topics`` (one document per topic, split by ``crc32(topic) % 10``).

``python -m stagetrain.recipes.llm_corpus OUT`` writes ``OUT/{code,docs}-{train,val}.jsonl``
(one ``{"text": ...}`` per document) and ``OUT/tokenizer.json``: a byte-level BPE
tokenizer with an ``<|endoftext|>`` token, trained on the two training splits with
``tokenizers``. ``examples/llm_prepare.sh`` then turns each JSONL into a token file with
``stagetrain prepare``. ``--fraction`` keeps every k-th file (a quick corpus for CI).
"""

from __future__ import annotations

import argparse
import ast
import json
import sysconfig
import zlib
from collections.abc import Iterator
from pathlib import Path

from stagetrain.recipes.pystdlib import EXCLUDED_PARTS

SPLITS = ("train", "val")
EOS = "<|endoftext|>"


def _split_of(name: str) -> str:
    return "val" if zlib.crc32(name.encode()) % 10 == 0 else "train"


def stdlib_files(every: int = 1) -> Iterator[tuple[Path, str]]:
    """``(path, split)`` of the standard library's ``*.py`` files in sorted order."""
    root = Path(sysconfig.get_paths()["stdlib"])
    kept = 0
    for path in sorted(root.rglob("*.py")):
        relative = path.relative_to(root)
        if EXCLUDED_PARTS & set(relative.parts) or relative.parts[0] == "pydoc_data":
            continue
        if kept % every == 0:
            yield path, _split_of(str(relative))
        kept += 1


def split_docstrings(source: str) -> tuple[str, list[str]]:
    """``source`` with each docstring replaced by ``...`` (same indentation), and the
    docstrings themselves; unparsable source is returned whole, with no docstrings."""
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError):
        return source, []
    lines = source.splitlines(keepends=True)
    spans: list[tuple[int, int, int]] = []
    docs: list[str] = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
            continue
        body = node.body
        if not body or not isinstance(body[0], ast.Expr):
            continue
        value = body[0].value
        if isinstance(value, ast.Constant) and isinstance(value.value, str):
            first, last = body[0].lineno, body[0].end_lineno or body[0].lineno
            spans.append((first, last, body[0].col_offset))
            docs.append(ast.get_docstring(node, clean=True) or "")
    for first, last, column in sorted(spans, reverse=True):
        lines[first - 1 : last] = [" " * column + "...\n"]
    return "".join(lines), [d for d in docs if d.strip()]


def documents(every: int = 1) -> dict[str, list[str]]:
    """The corpora: ``{"code-train": [...], "code-val": [...], "docs-train": ..., ...}``."""
    out: dict[str, list[str]] = {f"{d}-{s}": [] for d in ("code", "docs") for s in SPLITS}
    for path, split in stdlib_files(every):
        code, docstrings = split_docstrings(path.read_text(encoding="utf-8", errors="replace"))
        out[f"code-{split}"].append(code)
        if docstrings:
            out[f"docs-{split}"].append("\n\n".join(docstrings))
    from pydoc_data.topics import topics

    for position, name in enumerate(sorted(topics)):
        if position % every == 0:
            out[f"docs-{_split_of(name)}"].append(topics[name].strip())
    return out


def train_tokenizer(texts: list[str], vocab_size: int, path: Path) -> None:
    """A byte-level BPE tokenizer (GPT-2 style) with ``<|endoftext|>`` as id 0."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer)
    tokenizer.save(str(path))


def write_corpus(out: Path, *, vocab_size: int = 2048, every: int = 1) -> dict[str, int]:
    """Write the JSONL corpora and ``tokenizer.json`` into ``out``; returns documents per file."""
    out.mkdir(parents=True, exist_ok=True)
    corpora = documents(every)
    for name, docs in corpora.items():
        with (out / f"{name}.jsonl").open("w", encoding="utf-8") as f:
            for doc in docs:
                f.write(json.dumps({"text": doc}) + "\n")
    # Retrained every time: training is deterministic, so the same corpus gives the same
    # file, and `stagetrain prepare` (which hashes it) still skips finished token files.
    train_tokenizer(corpora["code-train"] + corpora["docs-train"], vocab_size,
                    out / "tokenizer.json")  # fmt: skip
    return {name: len(docs) for name, docs in corpora.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("out", type=Path, help="output directory")
    parser.add_argument("--vocab-size", type=int, default=2048)
    parser.add_argument("--every", type=int, default=1, help="keep every k-th file (quick corpus)")
    args = parser.parse_args()
    counts = write_corpus(args.out, vocab_size=args.vocab_size, every=args.every)
    for name, n in counts.items():
        print(f"{args.out / name}.jsonl: {n:,} documents")


if __name__ == "__main__":
    main()
