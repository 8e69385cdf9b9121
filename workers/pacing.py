"""Latency-aware batch cap: how many samples can share a denoising step and keep it under a time budget.

Continuous batching raises throughput by growing the batch, but on a CPU (and on a GPU past its saturation
point) a step's time grows with the batch, so every admitted job slows down as load rises. With a step
budget (``--max-step-ms``) the worker admits samples only while the measured cost model says the next step
stays within it; the excess waits in the queue, where the API's bound turns it into a quick 429. Off by
default: the default favours throughput (full batches).

The model is a least-squares line ``t(b) = a + c * b`` over the recent (batch size, step seconds) pairs;
until two sizes have been seen it assumes a step's time is proportional to its batch, and probes one size
up so that a second size is seen. It counts samples, not pixels: meant for a worker serving one resolution
(mixed sizes make it approximate, and the cap, which counts every running sample while a step runs one
resolution group, conservative).
"""

from __future__ import annotations

from collections import deque


class StepCost:
    def __init__(self, window: int = 256) -> None:
        self.samples: deque[tuple[int, float]] = deque(maxlen=window)
        # (mean batch, mean seconds, slope, only one batch size seen); None: stale
        self._fit: tuple[float, float, float, bool] | None = None

    def observe(self, batch: int, seconds: float) -> None:
        if batch > 0 and seconds > 0:
            self.samples.append((batch, seconds))
            self._fit = None  # refitted when next asked (once a step at most, and never while the cap is off)

    def _line(self) -> tuple[float, float, float, bool]:
        if self._fit is None:
            n = len(self.samples)
            mb = sum(b for b, _ in self.samples) / n
            mt = sum(t for _, t in self.samples) / n
            var = sum((b - mb) ** 2 for b, _ in self.samples)
            # one size seen so far: proportional (slope through the origin); noise never makes it negative
            slope = mt / mb if var == 0 else max(sum((b - mb) * (t - mt) for b, t in self.samples) / var, 0.0)
            self._fit = (mb, mt, slope, var == 0)
        return self._fit

    def predict(self, batch: int) -> float | None:
        """Expected seconds for one step of ``batch`` samples; None before any observation."""
        if not self.samples:
            return None
        mb, mt, slope, _ = self._line()
        return max(mt + slope * (batch - mb), 1e-6)

    def cap(self, budget_s: float, max_batch: int) -> int:
        """The largest batch (1..max_batch) whose predicted step time fits the budget: 1 until a step has
        been measured (the first step teaches the model), and at least 1 so that work always progresses.

        While a single batch size has been seen, the proportional guess ignores a step's fixed cost and so
        overstates every larger batch; trusted alone, it can keep the cap at that size for good (a 20 ms step
        of one sample predicts 40 ms for two, over a 30 ms budget, so two never run and the guess is never
        corrected). So one size larger is allowed whenever the seen size fits: its measured step then gives
        the line a second point."""
        if not self.samples:
            return 1
        best = max((b for b in range(1, max_batch + 1) if self.predict(b) <= budget_s), default=1)
        seen, seen_s, _, one_size = self._line()  # with one size seen, its mean step time
        if one_size and seen_s <= budget_s:
            best = max(best, min(int(seen) + 1, max_batch))
        return best
