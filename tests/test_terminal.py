"""The newcomer's screen: with the test extras installed (the CUDA plugin and libtpu beside a CPU), a command
prints nothing of theirs, a run's first line is its header, and the resolved config stays in the workdir unless
asked for. Each command runs as a user runs it: a fresh process, JAX_PLATFORMS unset."""

import json
import subprocess
import sys

from conftest import ROOT, child_environment

# What the accelerator plugins print on a machine without their hardware when nothing keeps them quiet.
NOISE = ("Traceback", "cudart", "TPU_WORKER", "libtpu", "absl::InitializeLog", "Downloading and preparing")
AS_A_USER = {"JAX_PLATFORMS": None}


def run(*args: str, timeout: float = 300):
    """(result, its lines as a terminal shows them: stdout and stderr in one stream) of `python ARGS` run as a user
    runs it."""
    environment = child_environment(AS_A_USER)
    command = [sys.executable, *args]
    result = subprocess.run(
        command, cwd=ROOT, env=environment, timeout=timeout, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    result.stdout = result.stdout.decode()
    return result, result.stdout.splitlines()


def quiet(lines: list[str]) -> bool:
    return not [line for line in lines if any(word in line for word in NOISE)]


def test_a_healthy_run_starts_with_its_header_and_at_most_five_lines_before_its_first_step(data_dir, tmp_path):
    workdir = tmp_path / "run"
    arguments = ["--config", "experiments/digits_mlp.py:smoke", f"--workdir={workdir}", f"--config.data_dir={data_dir}"]
    result, lines = run("launch.py", *arguments, "--config.num_steps=50", "--config.optimizer.learning_rate=0.003")
    assert result.returncode == 0, lines[-20:]
    first_step = next(index for index, line in enumerate(lines) if line.startswith("step "))
    assert first_step <= 5 and quiet(lines), lines
    header, overrides = lines[:2]
    assert header.startswith("experiment digits_mlp on 1 process(es), 1 device(s), allocator ")
    assert header.endswith(f"config in {workdir}/config.json")
    assert overrides == f"overrides: data_dir={data_dir!r}  num_steps=50  optimizer.learning_rate=0.003"
    assert json.loads((workdir / "config.json").read_text())["config"]["num_steps"] == 50

    result, lines = run("launch.py", *arguments, "--config.num_steps=50", "--config.optimizer.learning_rate=0.003")
    assert result.returncode == 0 and quiet(lines) and len(lines) == 4, lines  # the finished run
    assert lines[2] == f"the run in {workdir} is finished; its results are in {workdir}/results.json"
    assert lines[3].startswith("final: eval/accuracy ")

    result, lines = run("predict.py", f"--workdir={workdir}", "--evaluate=test")
    assert result.returncode == 0 and quiet(lines) and lines[0] == "digits_mlp step 50, split test", lines


def test_print_config_prints_the_whole_config_under_the_header(data_dir, tmp_path):
    arguments = [f"--workdir={tmp_path / 'run'}", f"--config.data_dir={data_dir}", "--config.num_steps=1"]
    result, lines = run("launch.py", "--config", "experiments/linear_regression.py:smoke", *arguments, "--print_config")
    assert result.returncode == 0 and quiet(lines), lines
    assert lines[0].startswith("experiment linear_regression on") and "num_steps: 1" in lines


def test_a_bad_input_is_its_one_line_and_nothing_else(tmp_path):
    arguments = ["--config", "experiments/digits_mlp.py:smoke", f"--workdir={tmp_path}", "--config.optimizer.name=nope"]
    result, lines = run("launch.py", *arguments)
    assert result.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: unknown optimizer 'nope'")


def test_the_tools_print_nothing_of_the_accelerator_plugins():
    for arguments in (["--list"], ["--list_datasets"]):
        result, lines = run("launch.py", *arguments)
        assert result.returncode == 0 and lines and quiet(lines), (arguments, lines[:10])
