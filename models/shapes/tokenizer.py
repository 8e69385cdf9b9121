"""A small CLIP BPE vocabulary of our own, written as vocab.json + merges.txt for ``CLIPTokenizer``.

CLIP's tokenizer is byte-level BPE: text is lower-cased, split into words, each word's last symbol
gets a ``</w>`` suffix, and merges join adjacent symbols. We build merges that join each vocabulary
word, left to right, into a single token, so every known word is one token and unknown text still
tokenizes (as characters) instead of failing.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

BOS, EOS = "<|startoftext|>", "<|endoftext|>"


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible byte -> printable unicode map."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, [chr(c) for c in cs], strict=True))


def build_vocab(words: Iterable[str]) -> tuple[dict[str, int], list[tuple[str, str]]]:
    symbols = list(bytes_to_unicode().values())
    vocab: dict[str, int] = {}
    for s in symbols + [s + "</w>" for s in symbols]:
        vocab.setdefault(s, len(vocab))
    merges: list[tuple[str, str]] = []
    for word in sorted({w.lower() for w in words if w}):
        parts = list(word[:-1]) + [word[-1] + "</w>"]
        while len(parts) > 1:
            pair = (parts[0], parts[1])
            joined = parts[0] + parts[1]
            if pair not in merges:
                merges.append(pair)
            vocab.setdefault(joined, len(vocab))
            parts = [joined] + parts[2:]
    vocab[BOS] = len(vocab)
    vocab[EOS] = len(vocab)
    return vocab, merges


def write_clip_tokenizer(directory: str | Path, words: Iterable[str], model_max_length: int = 77) -> Path:
    """Write a CLIPTokenizer directory (vocab.json, merges.txt, configs) that knows ``words``."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    vocab, merges = build_vocab(words)
    (d / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    (d / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    config = {
        "tokenizer_class": "CLIPTokenizer",
        "model_max_length": model_max_length,
        "bos_token": BOS,
        "eos_token": EOS,
        "unk_token": EOS,
        "pad_token": EOS,
        "do_lower_case": True,
    }
    (d / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    (d / "special_tokens_map.json").write_text(
        json.dumps({"bos_token": BOS, "eos_token": EOS, "unk_token": EOS, "pad_token": EOS}, indent=2)
    )
    return d
