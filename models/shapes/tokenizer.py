"""A small CLIP BPE vocabulary of our own, written as vocab.json + merges.txt for ``CLIPTokenizer``.

CLIP's tokenizer is byte-level BPE: text is lower-cased, split into words, each word's last symbol
gets a ``</w>`` suffix, and merges join adjacent symbols. We learn merges until each vocabulary word
is a single token, so every known word is one token and unknown text still tokenizes (as characters and
known pieces) instead of failing.
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
    """Byte-level symbols, then BPE merges learned the standard way (most frequent adjacent pair first)
    until every word is a single token. Learning in frequency order, rather than joining each word left
    to right, matters: the tokenizer applies merges by rank, so ad-hoc merges of one word can split another."""
    symbols = list(bytes_to_unicode().values())
    vocab: dict[str, int] = {}
    for s in symbols + [s + "</w>" for s in symbols]:
        vocab.setdefault(s, len(vocab))
    merges: list[tuple[str, str]] = []
    segs = [list(w[:-1]) + [w[-1] + "</w>"] for w in sorted({w.lower() for w in words if w})]
    while True:
        counts: dict[tuple[str, str], int] = {}
        for seg in segs:
            for pair in zip(seg, seg[1:], strict=False):
                counts[pair] = counts.get(pair, 0) + 1
        if not counts:
            break
        best = min(counts, key=lambda p: (-counts[p], p))  # most frequent; ties broken deterministically
        merges.append(best)
        vocab.setdefault(best[0] + best[1], len(vocab))
        for k, seg in enumerate(segs):
            out, i = [], 0
            while i < len(seg):
                if i + 1 < len(seg) and (seg[i], seg[i + 1]) == best:
                    out.append(seg[i] + seg[i + 1])
                    i += 2
                else:
                    out.append(seg[i])
                    i += 1
            segs[k] = out
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
