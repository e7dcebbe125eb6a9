"""A real launch.py process killed (SIGKILL) or preempted (SIGTERM) resumes to the uninterrupted result."""

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import orbax.checkpoint as ocp
import pytest

from conftest import ROOT, assert_trees_close
from research import checkpoint

NUM_STEPS = 300
COMMAND = [
    sys.executable,
    "launch.py",
    "--config",
    "experiments/linear_regression.py:smoke",
    f"--config.num_steps={NUM_STEPS}",
    "--config.log_every=1",
    "--config.eval_every=0",
    "--config.checkpoint.every_steps=25",
]
pytestmark = pytest.mark.slow


def start(workdir: Path) -> subprocess.Popen:
    """Runs launch.py with its output going to files (a full pipe would block the run)."""
    environment = {key: value for key, value in os.environ.items() if key != "XLA_FLAGS"}
    workdir.mkdir(parents=True, exist_ok=True)
    with (
        open(workdir.parent / f"{workdir.name}.out", "a") as out,
        open(workdir.parent / f"{workdir.name}.err", "a") as err,
    ):
        return subprocess.Popen(
            [*COMMAND, f"--workdir={workdir}"], cwd=ROOT, env=environment, stdout=out, stderr=err, text=True
        )


def finish(process: subprocess.Popen, workdir: Path) -> str:
    """Waits for a successful exit; returns what the run printed to stdout."""
    code = process.wait(timeout=300)
    assert code == 0, (workdir.parent / f"{workdir.name}.err").read_text()[-2000:]
    return (workdir.parent / f"{workdir.name}.out").read_text()


def wait_for_step(workdir: Path, process: subprocess.Popen, step: int) -> None:
    deadline = time.time() + 120
    metrics = workdir / "metrics.jsonl"
    while time.time() < deadline and process.poll() is None:
        if metrics.exists():
            lines = metrics.read_text().splitlines()
            if lines and lines[-1].endswith("}") and json.loads(lines[-1])["step"] >= step:
                return
        time.sleep(0.01)
    raise AssertionError(f"the run never reached step {step}")


def final_state(workdir: Path):
    with ocp.CheckpointManager(
        workdir / checkpoint.CHECKPOINT_DIR, options=ocp.CheckpointManagerOptions(read_only=True)
    ) as manager:
        assert manager.latest_step() == NUM_STEPS
        return manager.restore(NUM_STEPS, args=ocp.args.Composite(state=ocp.args.StandardRestore()))["state"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("uninterrupted")
    finish(start(workdir), workdir)
    return final_state(workdir)


@pytest.mark.parametrize("trial", range(3))
def test_sigkill_at_a_random_step_then_resume_matches(reference, tmp_path, trial):
    kill_step = random.Random(trial).randrange(50, NUM_STEPS - 80)
    process = start(tmp_path)
    wait_for_step(tmp_path, process, kill_step)
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=60)
    finish(start(tmp_path), tmp_path)
    assert_trees_close(final_state(tmp_path), reference, atol=0.0)


def test_sigterm_saves_at_the_step_boundary_and_exits(reference, tmp_path):
    process = start(tmp_path)
    wait_for_step(tmp_path, process, 100)
    process.send_signal(signal.SIGTERM)
    output = finish(process, tmp_path)
    stopped = int(output.split("stopped at step ")[1].split(" ")[0])
    assert "SIGTERM received" in output and 100 <= stopped < NUM_STEPS
    assert (tmp_path / checkpoint.CHECKPOINT_DIR / str(stopped)).is_dir()
    output = finish(start(tmp_path), tmp_path)
    assert f"resuming from the checkpoint at step {stopped}" in output
    assert_trees_close(final_state(tmp_path), reference, atol=0.0)
