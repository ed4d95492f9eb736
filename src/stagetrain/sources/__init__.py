"""Real data on disk: token files, Hugging Face ``datasets``, tokenization and export.

============== ==========================================================================
module         job
============== ==========================================================================
``tokens``     the ``tokens`` source: token files memory-mapped and read as windows
``tokenfiles`` a token file (``.bin`` + dtype or sidecar, ``.npy``): mapped, read, scanned
``windows``    window layouts: the files or documents windows stay in, their starts
``token_ids``  any dataset's token ids against the model's vocabulary
``tokenizer``  local tokenizers (``tokenizer.json``, a transformers directory, raw bytes)
``prepare``    text / JSONL / HF dataset -> token file + ``.json`` sidecar, multiprocess
``hf``         a Hugging Face dataset (saved or local files): columns, packing, padding
``mixture``    token shares -> sample shares; tokens per source of a batch
``export``     a run's checkpoint -> safetensors, or a ``from_pretrained`` directory
``preflight``  every source's token ids against the model's vocabulary, before step 0
``hashing``    content hashes used by the caches and sidecars
============== ==========================================================================

Everything here reads local files only; nothing is downloaded.
"""

from stagetrain.sources.mixture import (
    mean_tokens_per_sample,
    sample_shares_from_token_shares,
    token_weight_schedules,
    tokens_by_source,
)
from stagetrain.sources.preflight import check_vocab, model_vocab_size
from stagetrain.sources.tokens import TokenWindows, check_token_ids, tokens_source

__all__ = [
    "TokenWindows",
    "check_token_ids",
    "check_vocab",
    "mean_tokens_per_sample",
    "model_vocab_size",
    "sample_shares_from_token_shares",
    "token_weight_schedules",
    "tokens_by_source",
    "tokens_source",
]
