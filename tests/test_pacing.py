"""The latency-aware batch cap's cost model (workers/pacing.py)."""

from __future__ import annotations

import pytest

from workers.pacing import StepCost


def test_cold_start_admits_one_then_learns_proportionally():
    c = StepCost()
    assert c.predict(4) is None and c.cap(0.1, 16) == 1
    c.observe(1, 0.02)
    assert c.predict(4) == pytest.approx(0.08)
    assert c.cap(0.1, 16) == 5 and c.cap(1.0, 16) == 16 and c.cap(0.001, 16) == 1


def test_one_size_seen_probes_the_next_size_and_learns_the_fixed_cost():
    """20 ms for one sample: proportionally two would take 40 ms, over a 30 ms budget. The real cost is
    16 ms fixed + 4 ms a sample, so up to 3 fit; the cap probes 2, sees 24 ms, and the line finds 3."""
    c = StepCost()
    c.observe(1, 0.020)
    assert c.predict(2) == pytest.approx(0.040) and c.cap(0.030, 16) == 2  # probe one size up
    assert c.cap(0.015, 16) == 1  # the seen size itself is over budget: no probe
    assert c.cap(0.030, 1) == 1  # never past max_batch
    c.observe(2, 0.024)
    assert c.cap(0.030, 16) == 3 and c.cap(0.0241, 16) == 2


def test_line_fit_with_a_fixed_overhead():
    c = StepCost()
    for b in (1, 2, 4, 8, 8, 4):
        c.observe(b, 0.05 + 0.01 * b)  # 50 ms fixed, 10 ms a sample
    assert c.predict(16) == pytest.approx(0.21)
    assert c.cap(0.13, 16) == 8 and c.cap(0.129, 16) == 7


def test_noise_never_gives_a_negative_slope_or_a_window_overflow():
    c = StepCost(window=4)
    for b, t in ((2, 0.3), (8, 0.1), (2, 0.3), (8, 0.1), (8, 0.1)):
        c.observe(b, t)
    assert len(c.samples) == 4
    assert c.predict(16) >= c.predict(1) > 0
    c.observe(0, 1.0)
    c.observe(3, 0.0)  # ignored: nothing to learn from
    assert len(c.samples) == 4
