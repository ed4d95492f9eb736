"""Small corpora and a BPE tokenizer trained on the fly, for the data-source tests."""

from __future__ import annotations

from pathlib import Path

TEXTS = [
    "def add(a, b):\n    return a + b\n",
    "The quick brown fox jumps over the lazy dog.",
    "class Stack:\n    def push(self, x):\n        self.items.append(x)\n",
    "Curricula order data from easy to hard; stages change the data mixture.",
    "import os\nprint(os.getcwd())\n",
    "A token file holds ids; a window of seq_len + 1 tokens gives inputs and targets.",
] * 3


def train_tokenizer(path: Path, texts: list[str] | None = None, vocab_size: int = 300) -> Path:
    """A byte-level BPE tokenizer with an <|endoftext|> token, saved as tokenizer.json."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts or TEXTS, trainer)
    path.parent.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(path))
    return path


def encode(path: Path, texts: list[str]) -> list[list[int]]:
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(path))
    return [e.ids for e in tokenizer.encode_batch(texts, add_special_tokens=False)]


def write_jsonl(path: Path, texts: list[str], field: str = "text") -> Path:
    import json

    path.write_text("".join(json.dumps({field: t, "id": i}) + "\n" for i, t in enumerate(texts)))
    return path


def tied_lm(*, vocab: int = 32, width: int = 8) -> object:
    """A tiny LM whose output layer shares the embedding's weight (tied weights)."""
    import torch

    class TiedLM(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = torch.nn.Embedding(vocab, width)
            self.head = torch.nn.Linear(width, vocab, bias=False)
            self.head.weight = self.embed.weight

        def forward(self, tokens: torch.Tensor) -> torch.Tensor:
            return self.head(torch.tanh(self.embed(tokens)))

    return TiedLM()


def token_file(path: Path, n: int = 4000, vocab: int = 32, seed: int = 0) -> str:
    """A .bin of ``n`` uint16 tokens below ``vocab`` with a learnable pattern."""
    import numpy as np

    rng = np.random.default_rng(seed)
    base = np.arange(n) % vocab
    noise = rng.integers(0, vocab, n)
    tokens = np.where(rng.random(n) < 0.8, base, noise).astype(np.uint16)
    tokens.tofile(path)
    return str(path)


def recording_lm(*, out_dir: str, vocab: int = 32, width: int = 8) -> object:
    """A tiny LM that appends the token rows of every training forward to
    ``out_dir/rank{RANK}.jsonl`` (a way to see which windows each rank trained on)."""
    import json
    import os

    import torch

    class RecordingLM(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = torch.nn.Embedding(vocab, width)
            self.head = torch.nn.Linear(width, vocab)

        def forward(self, tokens: torch.Tensor) -> torch.Tensor:
            if self.training:
                rank = os.environ.get("RANK", "0")
                with open(os.path.join(out_dir, f"rank{rank}.jsonl"), "a") as f:
                    f.write(json.dumps(tokens.tolist()) + "\n")
            return self.head(self.embed(tokens))

    return RecordingLM()
