"""Latency-aware batch cap: how many samples can share a denoising step and keep it under a time budget.

Continuous batching raises throughput by growing the batch, but on a CPU (and on a GPU past its saturation
point) a step's time grows with the batch, so every admitted job slows down as load rises. With a step
budget (``--max-step-ms``) the worker admits samples only while the measured cost model says the next step
stays within it; the excess waits in the queue, where the API's bound turns it into a quick 429. Off by
default: the default favours throughput (full batches).

The model is a least-squares line ``t(b) = a + c * b`` over the recent (batch size, step seconds) pairs;
until two sizes have been seen it assumes a step's time is proportional to its batch. It counts samples,
not pixels: meant for a worker serving one resolution (mixed sizes make it approximate, and the cap, which
counts every running sample while a step runs one resolution group, conservative).
"""

from __future__ import annotations

from collections import deque


class StepCost:
    def __init__(self, window: int = 256) -> None:
        self.samples: deque[tuple[int, float]] = deque(maxlen=window)

    def observe(self, batch: int, seconds: float) -> None:
        if batch > 0 and seconds > 0:
            self.samples.append((batch, seconds))

    def predict(self, batch: int) -> float | None:
        """Expected seconds for one step of ``batch`` samples; None before any observation."""
        if not self.samples:
            return None
        n = len(self.samples)
        mb = sum(b for b, _ in self.samples) / n
        mt = sum(t for _, t in self.samples) / n
        var = sum((b - mb) ** 2 for b, _ in self.samples)
        if var == 0:  # one size seen so far: proportional
            return mt * batch / mb
        slope = sum((b - mb) * (t - mt) for b, t in self.samples) / var
        slope = max(slope, 0.0)
        return max(mt + slope * (batch - mb), 1e-6)

    def cap(self, budget_s: float, max_batch: int) -> int:
        """The largest batch (1..max_batch) whose predicted step time fits the budget: 1 until a step has
        been measured (the first step teaches the model), and at least 1 so that work always progresses."""
        if self.predict(1) is None:
            return 1
        best = 1
        for b in range(1, max_batch + 1):
            t = self.predict(b)
            if t is not None and t <= budget_s:
                best = b
        return best
