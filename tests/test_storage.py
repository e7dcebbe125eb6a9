"""Failed writes: a checkpoint written into a full filesystem stops the run with one line naming the newest
complete checkpoint, which stays restorable; freeing space and rerunning the command resumes from it."""

import os
import re
import subprocess
import sys
import types
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from research import checkpoint, train, trained_run
from research.errors import StorageError
from research.experiment import load
from research.resilience import storage

ROOT = Path(__file__).resolve().parents[1]
COMMAND = [
    sys.executable,
    str(ROOT / "launch.py"),
    "--config",
    "experiments/linear_regression.py",
    "--config.num_steps=100",
    "--config.log_every=10",
    "--config.checkpoint.every_steps=10",
    "--config.checkpoint.keep=3",
]


def launch(workdir: Path) -> subprocess.CompletedProcess:
    environment = os.environ | {"JAX_PLATFORMS": "cpu"}
    return subprocess.run(
        [*COMMAND, f"--workdir={workdir}"], cwd=ROOT, capture_output=True, text=True, env=environment, timeout=300
    )


@pytest.fixture
def small_disk(tmp_path):
    """A 400 KiB tmpfs (root mounts it; elsewhere the test is skipped), 150 KiB of it taken by a filler file:
    room for three of linear_regression's ~100 KiB checkpoints and its logs, not a fourth."""
    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=400k", "tmpfs", str(disk)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({mounted.stderr.decode().strip()[:80]}): needs root")
    (disk / "filler").write_bytes(bytes(150 * 1024))
    try:
        yield disk
    finally:
        subprocess.run(["umount", str(disk)], check=True)


@pytest.mark.slow
def test_a_full_disk_keeps_the_previous_checkpoint_and_the_rerun_resumes_to_the_same_result(small_disk, tmp_path):
    failed = launch(small_disk / "run")
    last_line = failed.stderr.strip().splitlines()[-1]
    assert failed.returncode == 4, failed.stderr[-2000:]
    found = re.fullmatch(
        r"error: OSError: No space left on device(?:: \S+)?; the run stopped and "
        r"the newest complete checkpoint is step (\d+) in \S+/checkpoints: "
        r"free space or fix the permissions, then rerun the same command to resume",
        last_line,
    )
    assert found, last_line
    step = int(found.group(1))
    assert 10 <= step < 100
    kept = trained_run.load_params(small_disk / "run", step)[0]  # the newest complete step restores, and is finite
    assert all(np.isfinite(leaf).all() for leaf in jax.tree.leaves(kept))

    (small_disk / "filler").unlink()
    resumed = launch(small_disk / "run")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"resuming from the checkpoint at step {step}" in resumed.stdout
    clean = launch(tmp_path / "clean")
    assert clean.returncode == 0
    for ours, reference in zip(
        jax.tree.leaves(trained_run.load_params(small_disk / "run", 100)[0]),
        jax.tree.leaves(trained_run.load_params(tmp_path / "clean", 100)[0]),
    ):
        np.testing.assert_array_equal(ours, reference)


def test_tensorstore_s_status_for_a_full_disk_reads_as_the_os_error():
    """Which error orbax raises first depends on its threads: an OSError, or tensorstore's status as ValueError."""
    status = ValueError(
        'RESOURCE_EXHAUSTED: Error writing local file "/runs/x/checkpoints/40.orbax-checkpoint-tmp/d/0a": '
        "Failed to write 398 bytes to file 11: No space left on device [os_error_code='28']"
    )
    assert storage.is_storage_failure(status)
    line = storage.storage_failure(status, types.SimpleNamespace(directory="/nowhere"))
    assert line == (
        "OSError: No space left on device: /runs/x/checkpoints/40.orbax-checkpoint-tmp/d/0a; the run stopped and "
        "no checkpoint was completed: free space or fix the permissions, then rerun the same command to resume"
    )


def test_a_failed_save_is_one_error_naming_the_newest_complete_checkpoint(tmp_path, monkeypatch):
    """Where no tmpfs can be mounted: the save of step 30 fails as a full disk would."""
    module = load("experiments/linear_regression.py")
    config = module.get_config()
    config.update_from_flattened_dict(
        {
            "num_steps": 50,
            "log_every": 10,
            "eval_every": 0,
            "checkpoint.every_steps": 10,
            "checkpoint.asynchronous": False,
        }
    )
    original = ocp.CheckpointManager.save

    def save(self, step, *args, **kwargs):
        if step == 30:
            raise OSError(28, "No space left on device", str(self.directory / "30.orbax-checkpoint-tmp"))
        return original(self, step, *args, **kwargs)

    monkeypatch.setattr(ocp.CheckpointManager, "save", save)
    with pytest.raises(
        StorageError,
        match=r"No space left on device: \S+30.orbax-checkpoint-tmp; the run stopped and "
        r"the newest complete checkpoint is step 20 in",
    ):
        train.train_and_evaluate(config, module, tmp_path)
    monkeypatch.setattr(ocp.CheckpointManager, "save", original)
    assert train.train_and_evaluate(config, module, tmp_path)["test/mse"] < 0.02  # resumed from step 20
    assert checkpoint.complete_steps(tmp_path / checkpoint.CHECKPOINT_DIR)[-1] == 50
