"""Two processes x 4 devices (gloo on 127.0.0.1) train exactly like one process x 8 devices,
and their checkpoint resumes in one process."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import ROOT

pytestmark = pytest.mark.slow


def launch(workdir: Path, devices_per_process: int, *extra: str) -> subprocess.CompletedProcess:
    environment = dict(
        os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices_per_process}", JAX_PLATFORMS="cpu"
    )
    command = [
        sys.executable,
        "launch.py",
        "--config",
        "experiments/digits_mlp.py:smoke",
        f"--workdir={workdir}",
        "--config.log_every=1",
        "--config.eval_every=0",
        "--config.checkpoint.every_steps=3",
        *extra,
    ]
    result = subprocess.run(command, cwd=ROOT, env=environment, capture_output=True, text=True, timeout=400)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def losses(workdir: Path) -> dict[int, float]:
    records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    return {record["step"]: record["train/loss"] for record in records if "train/loss" in record}


def test_two_processes_match_one_and_their_checkpoint_resumes_in_one(tmp_path):
    two, one = tmp_path / "two_processes", tmp_path / "one_process"
    output = launch(two, 4, "--config.num_steps=6", "--local_processes=2").stdout
    assert "on 2 process(es), 8 device(s)" in output
    launch(one, 8, "--config.num_steps=9")
    reference = losses(one)
    np.testing.assert_allclose(
        [losses(two)[step] for step in range(1, 7)], [reference[step] for step in range(1, 7)], atol=1e-5
    )
    # The 2-process checkpoint at step 6 continues in a single process to step 9.
    output = launch(two, 8, "--config.num_steps=9", "--allow_config_change").stdout
    assert "resuming from the checkpoint at step 6" in output
    np.testing.assert_allclose(
        [losses(two)[step] for step in range(7, 10)], [reference[step] for step in range(7, 10)], atol=1e-5
    )
    results = [json.loads((workdir / "results.json").read_text()) for workdir in (two, one)]
    assert results[0].keys() == results[1].keys()
    for name in results[1]:
        assert results[0][name] == pytest.approx(results[1][name], abs=1e-5), name
