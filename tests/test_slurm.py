"""SLURM's preemption path with the signals SLURM sends (research/resilience/slurm.py): SIGUSR1 -> saved -> `scontrol
requeue` -> the rerun resumes to the uninterrupted run's parameters; a sweep's job array script runs a task.

Without SLURM (CI is offline and has none) `scontrol` is a stand-in script on PATH that records its arguments,
and the job array's script is run by bash with SLURM_ARRAY_TASK_ID set, as sbatch would. Where SLURM is
installed (as root: apt install slurm-wlm) the last test starts munged, slurmctld and slurmd on this machine
and runs the whole path through them."""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from conftest import ROOT
from research import trained_run
from research.resilience import slurm

STEPS = 5000
FLAGS = [
    "--config",
    "experiments/linear_regression.py",
    f"--config.num_steps={STEPS}",
    "--config.log_every=10",
    "--config.eval_every=0",
    "--config.checkpoint.every_steps=0",
]


def environment(tmp_path: Path) -> dict[str, str]:
    """SLURM_JOB_ID set and a stand-in `scontrol` that writes its arguments to tmp_path/scontrol.log."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    scontrol = bin_dir / "scontrol"
    scontrol.write_text(f'#!/bin/sh\necho "$@" >> {tmp_path / "scontrol.log"}\n')
    scontrol.chmod(0o755)
    return os.environ | {"SLURM_JOB_ID": "4242", "PATH": f"{bin_dir}:{os.environ['PATH']}", "JAX_PLATFORMS": "cpu"}


def final_params(workdir: Path) -> list[np.ndarray]:
    return jax.tree.leaves(trained_run.load_params(workdir, STEPS)[0])


def logged_step(workdir: Path) -> int:
    path = workdir / "metrics.jsonl"
    lines = path.read_text().splitlines() if path.exists() else []
    return json.loads(lines[-1])["step"] if lines else 0


@pytest.mark.slow
def test_the_preemption_warning_saves_requeues_and_the_requeued_job_resumes_to_the_same_parameters(tmp_path):
    env, workdir = environment(tmp_path), tmp_path / "run"
    command = [sys.executable, "launch.py", *FLAGS, f"--workdir={workdir}"]
    job = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    while logged_step(workdir) < 100 and job.poll() is None:  # training, its first steps logged
        time.sleep(0.05)
    job.send_signal(signal.SIGUSR1)  # what --signal=B:USR1@120 sends
    output, errors = job.communicate(timeout=300)
    assert job.returncode == 0, errors[-2000:]
    assert "SIGUSR1 received: saving a checkpoint" in output
    stopped = int(output.split("stopped at step ")[1].split(" ")[0])
    assert 100 <= stopped < STEPS
    assert "requeued SLURM job 4242" in output
    assert (tmp_path / "scontrol.log").read_text().split() == ["requeue", "4242"]

    rerun = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)  # the requeued job
    assert f"resuming from the checkpoint at step {stopped}" in rerun.stdout, rerun.stderr[-2000:]
    reference = tmp_path / "uninterrupted"
    subprocess.run([*command[:-1], f"--workdir={reference}"], cwd=ROOT, env=env, check=True, capture_output=True)
    for ours, theirs in zip(final_params(workdir), final_params(reference)):
        np.testing.assert_array_equal(ours, theirs)


def test_sigterm_saves_without_a_requeue_and_no_slurm_means_no_requeue(monkeypatch):
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    assert slurm.requeue_after("SIGTERM") == ""  # scancel or a hard preemption: the job ends
    monkeypatch.delenv("SLURM_JOB_ID")
    assert slurm.requeue_after("SIGUSR1") == ""  # not under SLURM


@pytest.mark.slow
def test_a_sweep_becomes_a_job_array_whose_tasks_run_their_runs(tmp_path):
    sweep_file = tmp_path / "sweep.py"
    sweep_file.write_text("def get_sweep():\n    return {'optimizer.learning_rate': [0.05, 0.1]}\n")
    script, root = tmp_path / "array.sbatch", tmp_path / "sweep"
    written = subprocess.run(
        [sys.executable, "launch.py", "--config", "experiments/linear_regression.py:smoke", f"--sweep={sweep_file}"]
        + [f"--workdir={root}", f"--sweep_slurm={script}", "--config.eval_every=0"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env=os.environ | {"JAX_PLATFORMS": "cpu"},
    )
    assert written.returncode == 0, written.stderr[-2000:]
    text = script.read_text()
    assert "#SBATCH --array=0-1" in text and "#SBATCH --signal=B:USR1@120" in text and "#SBATCH --requeue" in text
    task = subprocess.run(
        ["bash", str(script)],
        env=os.environ | {"SLURM_ARRAY_TASK_ID": "1", "JAX_PLATFORMS": "cpu"},
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert task.returncode == 0, task.stderr[-2000:]
    finished = sorted(path.parent.name for path in root.glob("*/results.json"))
    assert finished == ["learning_rate=0.1"]
    assert json.loads((root / finished[0] / "results.json").read_text())["step"] == 100


SLURM_CONF = """ClusterName=local
SlurmctldHost={host}
AuthType=auth/munge
AuthInfo=socket={dir}/munge.sock
CredType=cred/munge
SlurmUser=root
SlurmdUser=root
StateSaveLocation={dir}/state
SlurmdSpoolDir={dir}/spool
SlurmctldPidFile={dir}/slurmctld.pid
SlurmdPidFile={dir}/slurmd.pid
SlurmctldPort={port}
SlurmdPort={port2}
SlurmctldLogFile={dir}/slurmctld.log
SlurmdLogFile={dir}/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
JobRequeue=1
ReturnToService=2
MpiDefault=none
NodeName={host} CPUs={cpus} RealMemory=1000 State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
"""


@pytest.fixture
def slurm_cluster(tmp_path):
    """munged, slurmctld and slurmd on this machine, started here (root and the Debian packages slurm-wlm and
    munge needed: `apt install slurm-wlm`); yields the environment for sbatch/squeue/scancel."""
    if os.geteuid() != 0 or not all(shutil.which(name) for name in ("slurmctld", "slurmd", "munged", "mungekey")):
        pytest.skip("no SLURM here: as root, apt install slurm-wlm (CI has none; the issue note has a run)")
    directory = tmp_path / "slurm"
    (directory / "state").mkdir(parents=True)
    (directory / "spool").mkdir()
    port = 20000 + os.getpid() % 20000
    host = socket.gethostname().split(".")[0]
    conf = directory / "slurm.conf"
    conf.write_text(SLURM_CONF.format(host=host, dir=directory, port=port, port2=port + 1, cpus=os.cpu_count()))
    key = directory / "munge.key"
    subprocess.run(["mungekey", "-c", "-f", "-k", str(key)], check=True, capture_output=True)
    files = {name: str(directory / name) for name in ("munge.sock", "munged.pid", "munged.log", "munged.seed")}
    munge = [
        "munged",
        "-f",
        f"--key-file={key}",
        f"--socket={files['munge.sock']}",
        f"--pid-file={files['munged.pid']}",
    ]
    subprocess.run([*munge, f"--log-file={files['munged.log']}", f"--seed-file={files['munged.seed']}"], check=True)
    env = os.environ | {"SLURM_CONF": str(conf), "JAX_PLATFORMS": "cpu"}
    daemons = [subprocess.Popen([daemon, "-D", "-f", str(conf)], env=env) for daemon in ("slurmctld", "slurmd")]
    try:
        for _ in range(100):
            if "idle" in subprocess.run(["sinfo", "-h"], env=env, capture_output=True, text=True).stdout:
                break
            time.sleep(0.2)
        yield env
    finally:
        for daemon in daemons:
            daemon.terminate()
            daemon.wait(timeout=30)
        subprocess.run(["munged", f"--socket={files['munge.sock']}", "--stop"], capture_output=True)


@pytest.mark.slow
def test_a_real_slurm_job_warned_saves_requeues_itself_and_resumes_to_the_same_parameters(slurm_cluster, tmp_path):
    """A one-task job array from array_script; SLURM sends the warning (scancel --signal=USR1 --batch, what
    --signal=B:USR1@120 sends at its time); the job saves, runs `scontrol requeue`, SLURM starts it again
    (after its requeue delay) and it resumes to the end."""
    workdir, logs = tmp_path / "run", tmp_path / "logs"
    logs.mkdir()
    command = [sys.executable, str(ROOT / "launch.py"), f"--config={ROOT}/experiments/linear_regression.py"]
    command += [f"--workdir={workdir}", *FLAGS[2:]]
    script = tmp_path / "job.sbatch"
    script.write_text(slurm.array_script([command], job_name="requeue", log_dir=str(logs)))
    submitted = subprocess.run(["sbatch", "--parsable", str(script)], env=slurm_cluster, capture_output=True, text=True)
    job = f"{submitted.stdout.strip()}_0"
    while logged_step(workdir) < 100:
        time.sleep(0.05)
    subprocess.run(["scancel", "--signal=USR1", "--batch", job], env=slurm_cluster, check=True)
    for _ in range(600):  # the requeued job waits for its begin time (~1-2 minutes), then runs to the end
        if not subprocess.run(["squeue", "-h"], env=slurm_cluster, capture_output=True, text=True).stdout.strip():
            break
        time.sleep(0.5)
    log = "\n".join(path.read_text() for path in logs.iterdir())
    stopped = int(log.split("stopped at step ")[1].split(" ")[0])
    assert "requeued SLURM job" in log and f"resuming from the checkpoint at step {stopped}" in log, log[-3000:]
    reference = tmp_path / "uninterrupted"
    subprocess.run(
        [*command[:3], f"--workdir={reference}", *FLAGS[2:]], env=slurm_cluster, check=True, capture_output=True
    )
    for ours, theirs in zip(final_params(workdir), final_params(reference)):
        np.testing.assert_array_equal(ours, theirs)
