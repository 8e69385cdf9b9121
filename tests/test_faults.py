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
