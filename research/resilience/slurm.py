"""SLURM: a preempted job requeues itself, and a sweep is one job array.

A job submitted with `#SBATCH --signal=B:USR1@120 --requeue` gets SIGUSR1 two minutes before its time
limit or preemption. The training loop treats it as it treats SIGTERM (research/resilience/preemption.py
PreemptionWatcher: save at the end of the step, stop) and then asks SLURM to put the job back in the
queue (`scontrol requeue $SLURM_JOB_ID`, process 0 only); the requeued job runs the same script, which
resumes from the checkpoint. SIGTERM alone (scancel, a hard preemption) saves and stops without a requeue.
`array_script` writes a sweep's unfinished runs as one `sbatch --array` script (launch.py --sweep_slurm);
docs/cluster.md has both templates.
"""

import os
import shlex
import subprocess
from collections.abc import Sequence

REQUEUE_SIGNAL = "SIGUSR1"


def job_id() -> str | None:
    """This job's id under SLURM (an array task's own id), else None."""
    return os.environ.get("SLURM_JOB_ID")


def requeue_after(signal_name: str | None) -> str:
    """After a save that `signal_name` asked for: requeues the job when it is SLURM's warning signal; returns
    the line to print ('' when nothing was done). Process 0 asks; a failed request is reported, not raised."""
    import jax  # here: launch.py --sweep_slurm writes scripts without starting JAX

    if signal_name != REQUEUE_SIGNAL or job_id() is None or jax.process_index() != 0:
        return ""
    try:
        done = subprocess.run(["scontrol", "requeue", job_id()], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as error:
        return f"could not requeue SLURM job {job_id()} ({error}): resubmit the same script to resume"
    if done.returncode:
        reason = (done.stderr or done.stdout).strip().splitlines()[:1]
        return f"scontrol requeue {job_id()} failed ({reason[0] if reason else done.returncode}): resubmit to resume"
    return f"requeued SLURM job {job_id()}: it resumes from this checkpoint when it runs again"


def array_script(commands: Sequence[Sequence[str]], *, job_name: str, log_dir: str, options: Sequence[str] = ()) -> str:
    """An sbatch script running `commands` as one job array, one task per command, each requeued after SLURM's
    preemption warning; `options` are further #SBATCH lines' arguments (e.g. '--time=4:00:00')."""
    if not commands:
        raise ValueError("no commands for the job array")
    header = [
        f"--job-name={job_name}",
        f"--array=0-{len(commands) - 1}",
        f"--output={log_dir}/%A_%a.log",
        "--open-mode=append",  # a requeued task appends to its log
        "--requeue",
        "--signal=B:USR1@120",  # SIGUSR1 to the batch shell, which `exec` made launch.py, 2 minutes before the end
        *options,
    ]
    lines = ["#!/bin/bash", *(f"#SBATCH {option}" for option in header), "", "COMMANDS=("]
    lines += [f"  {shlex.quote(shlex.join(command))}" for command in commands]
    lines += [")", 'eval "exec ${COMMANDS[$SLURM_ARRAY_TASK_ID]}"', ""]
    return "\n".join(lines)
