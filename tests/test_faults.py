"""The fault suite's CI-sized run (bench/faults.py --quick): real processes, real kills, real Redis restarts.

Each scenario starts its own deployment (a private redis-server, ``diffuserve serve`` with two supervised
workers on the tiny model). CI asserts every correctness goal (no job lost, exactly one final state, valid
images, poison failed with its reason, AOF survival, 503 not 500, reconnection, no failures on SIGTERM, no job
started after its deadline, the queue bound); the speed goals (redelivery time, throughput, latency ratios)
are printed by the harness's full run and recorded in docs/faults.md, not asserted on this shared machine.
"""

from __future__ import annotations

import pytest

from bench.faults import make_model, run, table

SCENARIOS = ["kills", "poison", "redis", "overload", "sigterm", "inject", "soak"]


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return make_model(tmp_path_factory.mktemp("faults"), adapters=12)


@pytest.mark.timeout(600)
@pytest.mark.parametrize("scenario", SCENARIOS)
def test_fault_scenario(scenario, model, tmp_path):
    rows = run((scenario,), quick=True, model=model[0], lora_dir=model[1], workdir=tmp_path)
    print(table(rows))
    assert rows
    broken = [r for r in rows if r.ok is False and not r.timing]
    assert not broken, table(broken)


def test_bucket_quantile_of_what_was_observed_between_two_reads():
    from bench.fault_cluster import bucket_quantile

    before = {0.01: 5, 0.1: 5, 0.5: 5, float("inf"): 5}  # five earlier answers, all fast
    after = {0.01: 95, 0.1: 104, 0.5: 105, float("inf"): 105}  # then 90 <= 10 ms, 9 <= 100 ms, 1 <= 500 ms
    assert bucket_quantile(before, after, 0.5) == (0.01, 100)
    assert bucket_quantile(before, after, 0.99) == (0.1, 100)
    assert bucket_quantile(before, after, 1.0) == (0.5, 100)
    assert bucket_quantile(after, after, 0.99)[1] == 0  # nothing observed in between
