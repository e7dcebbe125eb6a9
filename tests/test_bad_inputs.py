"""Bad input, as a new user gives it: every case prints one line in all (stdout and stderr), which says what was
wrong and what to do, within 10 seconds (1-3 s each on 2 cores: the table below), exit status 2, and changes
nothing in an existing workdir.

Cases across configs, data, checkpoints, optimizers and flags; each runs launch.py or predict.py in a
fresh process. `python tests/test_bad_inputs.py` prints the table (case, seconds, the line)."""

import hashlib
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DIGITS = ["--config", "experiments/digits_mlp.py:smoke", "--workdir=TMP/new"]  # a run that never starts
REGRESSION = ["--config", "experiments/linear_regression.py:smoke"]

# (case, entry point, arguments with WORKDIR / TMP placeholders, the line's start)
CASES = [
    # configs
    ("unknown key", "launch", [*DIGITS, "--config.optimzer.lr=1"], "error: unknown config key 'optimzer.lr'"),
    ("not a number", "launch", [*DIGITS, "--config.num_steps=many"], "error: flag --config.num_steps=many"),
    ("batch of 0", "launch", [*DIGITS, "--config.batch_size=0"], "error: batch_size is 0: it must be >= 1"),
    ("negative batch", "launch", [*DIGITS, "--config.batch_size=-4"], "error: batch_size is -4"),
    ("negative steps", "launch", [*DIGITS, "--config.num_steps=-1"], "error: num_steps is -1: it must be >= 0"),
    ("log_every 0", "launch", [*DIGITS, "--config.log_every=0"], "error: log_every is 0: it must be >= 1"),
    ("nonfinite mode", "launch", [*DIGITS, "--config.nonfinite=ignore"], "error: nonfinite must be 'stop'"),
    ("rollback attempts", "launch", [*DIGITS, "--config.rollback.attempts=-1"], "error: rollback.attempts is -1"),
    ("unknown schedule", "launch", [*DIGITS, "--config.optimizer.schedule.name=cosin"], "error: unknown schedule"),
    ("mesh too big", "launch", [*DIGITS, "--config.mesh.data=3"], "error: mesh"),
    ("bad freeze regex", "launch", [*DIGITS, "--config.freeze=(["], "error: freeze '([' is not a regular expression"),
    (
        "config variant",
        "launch",
        [*DIGITS[2:], "--config", "experiments/digits_mlp.py:smok"],
        "error: unknown config variant",
    ),
    ("no experiment file", "launch", ["--config", "experiments/nope.py"], "error: no experiment file"),
    (
        "unknown expert dispatch",
        "launch",
        ["--config", "experiments/lm.py:smoke-mixtral", "--workdir=TMP/new", "--config.model.moe_dispatch=sparse"],
        "error: model.moe_dispatch 'sparse': use one of dropless, capacity",
    ),
    # data
    (
        "dataset not on this machine",
        "launch",
        ["--config", "experiments/cifar10_resnet.py", "--workdir=TMP/new", "--config.data_dir=TMP/no_data"],
        "error: dataset 'cifar10' is not available offline",
    ),
    ("bad split", "launch", [*DIGITS, "--config.data.splits.train=train[:300%]"], "error: split 'train[:300%]'"),
    (
        "missing prepared corpus",
        "launch",
        ["--config", "experiments/lm.py:smoke", "--workdir=TMP/new", "--config.data.prepared=TMP/none"],
        "error: TMP/none: no manifest.json",
    ),
    # checkpoints
    (
        "init_from nowhere",
        "launch",
        [*DIGITS, "--config.init_from.workdir=TMP/nowhere"],
        "error: init_from: no checkpoints",
    ),
    (
        "fine-tune from nowhere",
        "launch",
        ["--config", "experiments/lm.py:from=TMP/nowhere", "--workdir=TMP/new"],
        "error: TMP/nowhere: no config.json, so not a run to continue from",
    ),
    (
        "distill teacher nowhere",
        "launch",
        [*DIGITS, "--config.distill.teacher=TMP/nowhere"],
        "error: distill.teacher: no config.json in",
    ),
    ("changed config", "launch", [*REGRESSION, "--config.optimizer.learning_rate=0.5"], "error: the config differs"),
    ("predict without checkpoints", "predict", ["--workdir=TMP/claimed", "--evaluate=test"], "error: no checkpoints"),
    ("another experiment's workdir", "launch", ["--config", "experiments/digits_mlp.py:smoke"], "error: workdir"),
    ("predict best without metric", "predict", ["--checkpoint=best", "--evaluate=test"], "error: --checkpoint best"),
    ("predict unknown step", "predict", ["--checkpoint=7", "--evaluate=test"], "error: no checkpoint '7'"),
    # optimizers
    ("unknown optimizer", "launch", [*DIGITS, "--config.optimizer.name=adm"], "error: unknown optimizer 'adm'"),
    ("optimizer file missing", "launch", [*DIGITS, "--config.optimizer.name=TMP/opt.py:make"], "error: optimizer file"),
    (
        "optax name missing",
        "launch",
        [*DIGITS, "--config.optimizer.name=optax:adamm"],
        "error: optimizer optax: no function 'adamm'",
    ),
    (
        "unknown optimizer kwarg",
        "launch",
        [*DIGITS, "--config.optimizer.kwargs.b9=0.1"],
        "error: optimizer 'adam': got an unexpected keyword argument 'b9'",
    ),
    (
        "switched optimizer, an argument it does not take",
        "launch",
        [*DIGITS, "--config.optimizer.name=muon", "--config.optimizer.kwargs.b9=0.1"],
        "error: optimizer 'muon': got an unexpected keyword argument 'b9'",
    ),
    (
        "unknown static kwarg",
        "launch",
        [*DIGITS, "--config.optimizer.static_kwargs=nope"],
        "error: optimizer.static_kwargs names ['nope']",
    ),
    # flags
    ("workdir is a file", "launch", [*DIGITS[:2], "--workdir=TMP/afile"], "error: --workdir"),
    ("empty workdir", "launch", [*DIGITS[:2], "--workdir="], "error: pass --config"),
    ("sweep file missing", "launch", [*DIGITS, "--sweep=TMP/nope.py"], "error: no sweep file"),
    (
        "sweep key unknown",
        "launch",
        [*DIGITS, "--sweep=TMP/bad_sweep.py"],
        "error: sweep: unknown config key 'optimizer.learnin_rate'",
    ),
    (
        "compare without a workload",
        "launch",
        ["--config", "experiments/mnist_logreg.py", "--compare_optimizers=adamw,muon", "--workdir=TMP/new"],
        "error: experiments/mnist_logreg.py declares no BENCHMARK workload",
    ),
    ("reproduce unknown", "launch", ["--reproduce=nope", "--workdir=TMP/new"], "error: --reproduce: no experiment"),
    ("coordinator alone", "launch", [*DIGITS, "--coordinator_address=127.0.0.1:1234"], "error: --coordinator_address"),
    ("predict workdir missing", "predict", ["--workdir=TMP/nowhere", "--evaluate=test"], "error: no config.json in"),
]


def prepare(tmp: Path) -> Path:
    """TMP's files for the cases, and WORKDIR: a finished linear_regression :smoke run (its files must not change)."""
    (tmp / "afile").write_text("not a directory\n")
    (tmp / "bad_sweep.py").write_text("def get_sweep():\n    return {'optimizer.learnin_rate': [0.1]}\n")
    workdir = tmp / "run"
    (tmp / "claimed").mkdir()
    done = subprocess.run(
        [sys.executable, "launch.py", *REGRESSION, f"--workdir={workdir}", "--config.checkpoint.every_steps=50"],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    shutil.copy(workdir / "config.json", tmp / "claimed" / "config.json")  # a run that never saved a step
    return workdir


def fingerprint(directory: Path) -> dict[str, str]:
    return {
        str(path.relative_to(directory)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(directory.rglob("*"))
        if path.is_file()
    }


def run_case(entry: str, arguments: list[str], tmp: Path, workdir: Path) -> tuple[subprocess.CompletedProcess, float]:
    fresh = f"new_{len(list(tmp.glob('new_*')))}"  # each case its own new workdir
    arguments = [argument.replace("TMP/new", f"TMP/{fresh}").replace("TMP", str(tmp)) for argument in arguments]
    if not any(argument.startswith("--workdir") for argument in arguments):
        arguments.append(f"--workdir={workdir}")
    start = time.perf_counter()
    result = subprocess.run([sys.executable, f"{entry}.py", *arguments], cwd=ROOT, capture_output=True, text=True)
    return result, time.perf_counter() - start


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("bad_inputs")
    return tmp, prepare(tmp)


@pytest.mark.parametrize("case, entry, arguments, start", CASES, ids=[case[0] for case in CASES])
def test_bad_input_is_one_line_within_10_seconds_and_loses_nothing(case, entry, arguments, start, finished_run):
    tmp, workdir = finished_run
    before = fingerprint(workdir)
    result, seconds = run_case(entry, arguments, tmp, workdir)
    lines = (result.stdout + result.stderr).strip().splitlines()
    assert result.returncode == 2, result.stderr[-2000:]
    assert len(lines) == 1 and lines[0].startswith(start.replace("TMP", str(tmp))), lines
    assert seconds < 10.0  # 1.0-2.9 s each in the table (python tests/test_bad_inputs.py); slack for a loaded CI
    assert fingerprint(workdir) == before


def run_capped(arguments: list[str]) -> tuple[subprocess.CompletedProcess, list[str]]:
    """`python ARGUMENTS` with its address space capped at 12 GB (set in the child, which then execs: no
    preexec_fn, so no fork of this multithreaded process): the process's memory, as a device's would be."""
    capped = "import os, resource, sys; resource.setrlimit(resource.RLIMIT_AS, (12 * 10**9,) * 2); "
    capped += "os.execv(sys.executable, [sys.executable, *sys.argv[1:]])"
    result = subprocess.run([sys.executable, "-c", capped, *arguments], cwd=ROOT, capture_output=True, text=True)
    return result, result.stderr.strip().splitlines()


@pytest.mark.slow  # 17 s: keeps the quick suite within its 6 minutes
def test_a_device_out_of_memory_is_one_line_with_what_to_change(tmp_path):
    """A step larger than the device's memory (here the CPU's, capped; a GPU's pool or a TPU's HBM alike):
    XLA's error becomes one line with what to change, exit status 6; for predict.py exit status 2, and the
    trained run it reads is unchanged."""
    hidden = "--config.model.features=(65536,65536,10)"  # a 65,536 x 65,536 float32 kernel: 16 GiB
    result, lines = run_capped(["launch.py", *DIGITS[:2], f"--workdir={tmp_path / 'big'}", hidden])
    assert result.returncode == 6, result.stderr[-2000:]
    assert lines[-1].startswith("error: out of memory on cpu: Out of memory allocating 17179869184 bytes; try a")
    assert "launch.py --dry_run --target" in lines[-1] and "Traceback" not in result.stderr

    trained = subprocess.run([sys.executable, "launch.py", *DIGITS[:2], f"--workdir={tmp_path / 'run'}"], cwd=ROOT)
    assert trained.returncode == 0
    before = fingerprint(tmp_path / "run")
    explain = ["--explain=test", "--num_examples=16", "--explain_steps=50000000"]  # 410 GB of interpolated inputs
    result, lines = run_capped(["predict.py", f"--workdir={tmp_path / 'run'}", *explain])
    assert result.returncode == 2, result.stderr[-2000:]
    assert (
        lines[-1].startswith("error: out of memory on cpu: Out of memory allocating") and "--explain_steps" in lines[-1]
    )
    assert "Traceback" not in result.stderr and fingerprint(tmp_path / "run") == before


if __name__ == "__main__":
    tmp = Path(sys.argv[1] if len(sys.argv) > 1 else "/tmp/bad_inputs")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    workdir = prepare(tmp)
    before, good = fingerprint(workdir), 0
    for case, entry, arguments, start in CASES:
        result, seconds = run_case(entry, arguments, tmp, workdir)
        lines = (result.stdout + result.stderr).strip().splitlines() or [""]
        ok = (
            result.returncode == 2
            and len(lines) == 1
            and lines[0].startswith(start.replace("TMP", str(tmp)))
            and seconds < 10
            and fingerprint(workdir) == before
        )
        good += ok
        print(
            f"{'ok ' if ok else 'BAD'} {case:28s} {seconds:4.1f}s rc={result.returncode} {lines[-1][:150]}", flush=True
        )
    print(f"{good}/{len(CASES)} one-line errors")
