"""Lost processes: kill one process of a 2-process run at a random moment, again and again.

Each trial starts `launch.py` as two processes (gloo on 127.0.0.1, 2 CPU devices each, digits_mlp),
SIGKILLs one of them (chosen at random) after a random delay, times how long the survivor takes to
stop and keeps its last line, then reruns the same two commands, which resume from the newest complete
checkpoint, and compares the final parameters with an uninterrupted run's, bit for bit. Prints a table.

    python benchmarks/lost_process.py --trials=10      # ~15 minutes on 2 cores

Expected (2026-11-30): every survivor stops within 60 s (process 1 lost: the watchdog's line after ~30 s;
process 0 lost: jax.distributed's own abort within a second) and every rerun ends bitwise equal.
"""

import argparse
import os
import random
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

FLAGS = [
    "--config",
    "experiments/digits_mlp.py",
    "--config.num_steps=1500",
    "--config.log_every=50",
    "--config.eval_every=0",
    "--config.checkpoint.every_steps=100",
]


def start(workdir: Path, port: int) -> list[subprocess.Popen]:
    environment = os.environ | {"JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
    processes = []
    for index in range(2):
        command = [
            sys.executable,
            "launch.py",
            *FLAGS,
            f"--workdir={workdir}",
            f"--coordinator_address=127.0.0.1:{port}",
        ]
        command += ["--num_processes=2", f"--process_id={index}"]
        log = open(workdir.with_name(f"{workdir.name}.process{index}.log"), "w")
        processes.append(subprocess.Popen(command, cwd=ROOT, env=environment, stdout=log, stderr=subprocess.STDOUT))
    return processes


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def run_to_end(workdir: Path) -> list[int]:
    return [process.wait() for process in start(workdir, free_port())]


def final_params(workdir: Path) -> list[np.ndarray]:
    import jax

    from research import trained_run

    return [np.asarray(leaf) for leaf in jax.tree.leaves(trained_run.load_params(workdir, 1500)[0])]


def last_line(path: Path) -> str:
    lines = [line for line in path.read_text(errors="replace").splitlines() if line.strip()]
    return lines[-1] if lines else ""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    arguments = parser.parse_args()
    chooser = random.Random(arguments.seed)
    base = Path(tempfile.mkdtemp(prefix="lost_process_"))
    assert run_to_end(base / "reference") == [0, 0], "the uninterrupted run failed"
    reference = final_params(base / "reference")
    rows = []
    for trial in range(arguments.trials):
        workdir, victim, delay = base / f"trial{trial}", chooser.randrange(2), chooser.uniform(8.0, 20.0)
        workdir.mkdir()
        processes = start(workdir, free_port())
        time.sleep(delay)
        processes[victim].kill()
        killed = time.monotonic()
        survivor = processes[1 - victim]
        code = survivor.wait(timeout=300)
        seconds = time.monotonic() - killed
        said = last_line(workdir.with_name(f"{workdir.name}.process{1 - victim}.log"))
        rerun = run_to_end(workdir)
        equal = rerun == [0, 0] and all(np.array_equal(a, b) for a, b in zip(final_params(workdir), reference))
        rows.append((trial, victim, delay, code, seconds, equal, said))
        print(
            f"trial {trial}: killed process {victim} at {delay:.1f} s; survivor exit {code} after {seconds:.1f} s; "
            f"rerun bitwise equal: {equal}; said: {said[:160]}",
            flush=True,
        )
        shutil.rmtree(workdir)
    print("\n| trial | killed | at s | survivor exit | stopped after s | rerun = uninterrupted (bitwise) |")
    print("| ---: | ---: | ---: | ---: | ---: | --- |")
    for trial, victim, delay, code, seconds, equal, _ in rows:
        print(f"| {trial} | process {victim} | {delay:.1f} | {code} | {seconds:.1f} | {'yes' if equal else 'NO'} |")
    within, equal = sum(row[4] <= 60 for row in rows), sum(row[5] for row in rows)
    print(f"\nsurvivor stopped within 60 s: {within}/{len(rows)}; reruns bitwise equal: {equal}/{len(rows)}")


if __name__ == "__main__":
    main()
