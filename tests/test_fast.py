"""The fast mode's static-shape buckets: batching arithmetic, and a compiled engine against the exact one."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from models.fast import BUCKETS, buckets_for, chunks, cpu_has_native_bf16, run_bucketed, warm_buckets


@pytest.mark.parametrize("rows", range(1, 70))
def test_chunks_cover_every_row_in_known_buckets(rows):
    pieces = chunks(rows)
    assert sum(size for size, _ in pieces) == rows
    for size, bucket in pieces:
        assert bucket in BUCKETS and 0 < size <= bucket
        assert bucket - size <= bucket // 4  # never more than a quarter padding


def test_chunks_pad_or_split():
    assert chunks(3) == [(3, 4)]
    assert chunks(5) == [(4, 4), (1, 1)]  # padding to 8 would waste 3 of 8
    assert chunks(20) == [(16, 16), (4, 4)]
    assert chunks(24) == [(24, 32)]
    assert chunks(40) == [(32, 32), (8, 8)]
    assert warm_buckets(32) == list(BUCKETS)
    assert warm_buckets(4) == [1, 2, 4]


def test_run_bucketed_is_the_whole_batch_call():
    x, t = torch.randn(23, 3), torch.arange(23.0)
    shapes = []

    def fn(a, b):
        shapes.append(a.shape[0])
        return a * 2 + b[:, None]

    out = run_bucketed(fn, [x, t])
    assert torch.equal(out, x * 2 + t[:, None])
    assert shapes == [16, 8]  # 7 real rows padded to 8


def test_dynamic_batch_on_cuda_is_one_call():
    assert buckets_for(torch.device("cpu")) == BUCKETS and buckets_for(torch.device("cuda")) == ()
    shapes = []
    out = run_bucketed(lambda a: shapes.append(a.shape[0]) or a + 1, [torch.zeros(23, 2)], ())
    assert shapes == [23] and torch.equal(out, torch.ones(23, 2))
    assert warm_buckets(32, ()) == [1, 2, 32] and warm_buckets(1, ()) == [1]


def test_fast_engine_matches_exact_and_warmup_leaves_nothing_to_compile(tiny_model_dir):
    """Warm-up compiles the buckets of a batch of one (UNet rows 1 and 2, decode 1); then generation at the
    native size runs compiled with no new compile, at another size eager; both give exact mode's image
    (to bf16's rounding where the CPU has native bf16)."""
    from torch._dynamo.utils import counters

    from models.engine import Engine, GenerationRequest
    from models.loading import load_pipeline

    exact = Engine(load_pipeline(tiny_model_dir), mode="exact")
    fast = Engine(load_pipeline(tiny_model_dir), mode="fast")
    assert exact.warmup(1) == 0.0
    graphs = counters["stats"]["unique_graphs"]
    assert fast.warmup(1) > 0 and counters["stats"]["unique_graphs"] >= graphs + 3
    graphs = counters["stats"]["unique_graphs"]
    # On CPUs with native bf16 (AVX512-BF16 / AMX) fast mode autocasts to bf16, whose 8-bit mantissa moves
    # a random model's pixels a few levels (measured on a Xeon with AMX: max 3-5, mean 0.5-0.7 of 255);
    # without it, fast is fp32 and must match exact to 2/255.
    bf16 = cpu_has_native_bf16()
    assert fast.autocast == (torch.bfloat16 if bf16 else None)
    most, mean = (8, 1.5) if bf16 else (2, 2.0)
    w, h = fast.model.native_size
    for size in ((w, h), (w + 8, h)):
        req = GenerationRequest("a red circle", steps=3, guidance=5.0, seed=7, sampler="euler", width=size[0],
                                height=size[1])
        a, b = exact.generate([req])[0].images[0], fast.generate([req])[0].images[0]
        assert counters["stats"]["unique_graphs"] == graphs  # nothing compiled inside a request
        assert a.shape == b.shape == (size[1], size[0], 3)
        diff = np.abs(a.astype(int) - b.astype(int))
        assert int(diff.max()) <= most and diff.mean() <= mean, (size, int(diff.max()), diff.mean())
