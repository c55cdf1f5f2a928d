"""Everything ``examples/llmfoundry.yaml`` needs, made offline: a byte-level tokenizer and MDS text shards.

    python examples/llmfoundry_setup.py --data ./irdro-llmfoundry-data
    HF_HUB_OFFLINE=1 llmfoundry train examples/llmfoundry.yaml variables.data_local=./irdro-llmfoundry-data

The tokenizer (``examples/llmfoundry_tokenizer/``, committed) maps each UTF-8 byte to one token, plus
``<|endoftext|>`` (256) and ``<|pad|>`` (257): nothing is downloaded from a hub. The corpus is synthetic
text in a few "domains" of different difficulty plus a share of random-character noise documents, so
IR-DRO has something to reweight. ``--tokens`` writes pre-tokenised shards (a ``tokens`` column of int64
token ids, llm-foundry's other input format) instead of ``text``.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

import numpy as np

TOKENIZER_DIR = Path(__file__).resolve().parent / "llmfoundry_tokenizer"
_WORDS = ("the", "cat", "sat", "on", "a", "mat", "dog", "ran", "far", "sun", "rose", "over", "hill", "and")


def build_tokenizer(out_dir: str | os.PathLike = TOKENIZER_DIR) -> Any:
    """Build the byte-level tokenizer and ``save_pretrained`` it to ``out_dir``; returns it."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    from transformers.models.gpt2.tokenization_gpt2 import bytes_to_unicode

    byte_to_char = bytes_to_unicode()
    vocab = {byte_to_char[b]: b for b in range(256)}
    vocab.update({"<|endoftext|>": 256, "<|pad|>": 257})
    core = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core, eos_token="<|endoftext|>", bos_token="<|endoftext|>", unk_token="<|endoftext|>",
        pad_token="<|pad|>", model_input_names=["input_ids", "attention_mask"],
    )
    tok.save_pretrained(str(out_dir))
    return tok


def documents(num_docs: int, seed: int = 0, noise: float = 0.05) -> list[str]:
    """Synthetic documents: 'easy' (one repeated phrase), 'mixed' (random words) and noise (random chars)."""
    rng = np.random.default_rng(seed)
    docs = []
    for _ in range(num_docs):
        u = rng.random()
        if u < noise:
            docs.append("".join(chr(c) for c in rng.integers(33, 127, size=int(rng.integers(40, 120)))))
        elif u < 0.5:
            docs.append(" ".join(["the cat sat on a mat"] * int(rng.integers(2, 6))))
        else:
            docs.append(" ".join(rng.choice(_WORDS, size=int(rng.integers(8, 30)))))
    return docs


def write_corpus(out: str | os.PathLike, num_docs: int = 1000, seed: int = 0, tokens: bool = False,
                 max_seq_len: int = 64, docs_per_shard: int = 100) -> str:
    """Write ``out/train`` as MDS shards (``text``, or ``tokens`` int64 ids padded to ``max_seq_len``)."""
    from streaming import MDSWriter

    folder = os.path.join(str(out), "train")
    docs = documents(num_docs, seed)
    columns = {"tokens": "ndarray:int64"} if tokens else {"text": "str"}
    tok = build_tokenizer(os.path.join(str(out), "tokenizer")) if tokens else None
    # Small shards so that a round touches several of them, as real data does.
    size_limit = (max_seq_len * 8 + 64) * docs_per_shard if tokens else 200 * docs_per_shard
    with MDSWriter(out=folder, columns=columns, size_limit=size_limit) as writer:
        for doc in docs:
            if tok is None:
                writer.write({"text": doc})
            else:
                ids = tok(doc, truncation=True, padding="max_length", max_length=max_seq_len)["input_ids"]
                writer.write({"tokens": np.asarray(ids, dtype=np.int64)})
    return folder


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default="./irdro-llmfoundry-data", help="folder for the MDS shards (train split)")
    ap.add_argument("--docs", type=int, default=1000)
    ap.add_argument("--tokens", action="store_true", help="write pre-tokenised shards instead of text")
    ap.add_argument("--tokenizer", default=str(TOKENIZER_DIR), help="where to save the tokenizer")
    args = ap.parse_args(argv)
    build_tokenizer(args.tokenizer)
    print("tokenizer:", args.tokenizer)
    print("train shards:", write_corpus(args.data, args.docs, tokens=args.tokens))


if __name__ == "__main__":
    main()
