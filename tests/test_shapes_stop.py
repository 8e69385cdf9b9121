"""Stopping a training run: SIGINT or SIGTERM (Ctrl-C, `docker stop`, a pod's eviction) finishes the step in
progress, checkpoints it and exits, so that the same command resumes where it stopped."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from models.shapes.train_common import Stopped, loop


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_loop_checkpoints_and_stops_on_a_signal(sig):
    saved, done = [], []
    before = signal.getsignal(sig)

    def step_fn(step: int) -> float:
        done.append(step)
        if step == 3:
            os.kill(os.getpid(), sig)  # delivered at once: the handler runs before the step returns
        return 0.0

    with pytest.raises(Stopped) as err:
        loop("test", 100, step_fn, saved.append, 0, float("inf"), every_minutes=60)
    assert done == [0, 1, 2, 3]  # the step in progress finished, no later one started
    assert saved == [4]  # and was checkpointed
    assert (err.value.stage, err.value.step, err.value.signum) == ("test", 4, sig)
    assert signal.getsignal(sig) == before  # the process's own handler is back


def test_loop_without_a_signal_runs_to_the_end():
    saved = []
    assert loop("test", 5, lambda step: 0.0, saved.append, 2, float("inf"), every_minutes=60) is True
    assert saved == [5]


def test_train_command_stops_on_sigterm_and_resumes(tmp_path):
    """The real CLI: SIGTERM mid-stage exits 143 with a checkpoint and a message; the same command resumes
    from that step (and stops at once when its steps are done)."""
    run_dir = tmp_path / "run"
    cmd = [sys.executable, "-m", "workers.cli", "train", "shapes", "--stage", "vae", "--run-dir", str(run_dir),
           "--vae-steps", "100000", "--batch", "2", "--threads", "1"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    root = Path(__file__).resolve().parents[1]
    proc = subprocess.Popen(cmd, cwd=root, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    state = run_dir / "vae" / "state.json"
    chunks: list[str] = []  # the output so far, read by a thread (the progress bar writes no newlines)
    reader = threading.Thread(target=lambda: chunks.extend(iter(lambda: proc.stdout.read(1), "")), daemon=True)
    reader.start()
    try:
        # The step loop is running once its progress bar is drawn (it sets its signal handlers right after):
        # wait for the bar, not a fixed time, so that a slow start cannot make SIGTERM kill the process outright.
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline and proc.poll() is None and "/100000 [" not in "".join(chunks):
            time.sleep(0.2)
        time.sleep(3)  # a few steps
        assert proc.poll() is None, "".join(chunks)
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=120)
        reader.join(timeout=10)
    finally:
        proc.kill()
    out = "".join(chunks)
    assert proc.returncode == 128 + signal.SIGTERM, out
    assert "SIGTERM during stage vae: checkpointed at step" in out
    step = json.loads(state.read_text())["step"]
    assert 0 < step < 100000
    assert f"checkpointed at step {step};" in out
    # The same command with the step count reached resumes at that step and has nothing left to do.
    again = subprocess.run([*cmd[:cmd.index("--vae-steps") + 1], str(step), *cmd[cmd.index("--batch"):]], cwd=root,
                           env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr
    assert json.loads(state.read_text())["step"] == step
    assert "stage vae done" in again.stderr
