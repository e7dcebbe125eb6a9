"""launch.py as a user runs it: a subprocess, one-line errors, and a run that leaves its files."""

import json

import pytest

from conftest import ROOT, launch


def test_list_names_every_experiment_with_its_description():
    result = launch("--list")
    assert result.returncode == 0
    lines = dict(line.split(None, 1) for line in result.stdout.strip().splitlines())
    assert set(lines) == {path.stem for path in (ROOT / "experiments").glob("[!_]*.py")}
    assert lines["digits_mlp"].startswith("Handwritten digits")


@pytest.mark.parametrize(
    "args, message",
    [
        (
            ["--config.optimzer.lr=1"],
            "error: unknown config key 'optimzer.lr'; did you mean 'optimizer.learning_rate'?",
        ),
        (
            ["--config.optimizer.learning_rat=1"],
            "error: unknown config key 'optimizer.learning_rat'; did you mean 'optimizer.learning_rate'?",
        ),
        (["--config.num_steps=many"], "error: flag --config.num_steps=many: invalid literal for int()"),
        (["--config.optimizer.name=adm"], "error: unknown optimizer 'adm' (did you mean 'adam'?)"),
        (["--config.batch_size=0"], "error: batch_size is 0: it must be >= 1"),
        (["--config.batch_size=-4"], "error: batch_size is -4: it must be >= 1"),
    ],
)
def test_bad_overrides_fail_in_one_line(tmp_path, args, message):
    result = launch("--config", "experiments/digits_mlp.py", "--workdir", str(tmp_path), *args)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith(message)
    assert "Traceback" not in result.stderr


def test_missing_experiment_file(tmp_path):
    result = launch("--config", "experiments/nope.py", "--workdir", str(tmp_path))
    assert result.returncode == 2
    assert (
        result.stderr.strip().splitlines()[-1]
        == "error: no experiment file 'experiments/nope.py': pass --config experiments/NAME.py (see --list)"
    )


def test_bad_config_variant(tmp_path):
    result = launch("--config", "experiments/digits_mlp.py:smok", "--workdir", str(tmp_path))
    assert result.returncode == 2
    assert (
        result.stderr.strip().splitlines()[-1]
        == "error: unknown config variant 'smok': use no ':arg' or one of 'smoke'"
    )


def test_a_workdir_that_is_a_file_is_refused_and_kept(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("mine")
    result = launch("--config", "experiments/linear_regression.py:smoke", "--workdir", str(path))
    assert result.returncode == 2 and "Traceback" not in result.stderr and path.read_text() == "mine"
    assert (
        result.stderr.strip().splitlines()[-1]
        == f"error: --workdir '{path}' is a file: give a directory (a new one, or a run's)"
    )


def test_missing_workdir():
    result = launch("--config", "experiments/digits_mlp.py")
    assert result.returncode == 2 and "pass --config experiments/NAME.py[:arg] and --workdir DIR" in result.stderr


@pytest.mark.slow
def test_run_writes_its_files_then_guards_the_workdir(tmp_path):
    workdir = tmp_path / "run"
    result = launch(
        "--config", "experiments/linear_regression.py:smoke", "--workdir", str(workdir), "--config.num_steps=60"
    )
    assert result.returncode == 0, result.stderr
    shown = result.stdout.splitlines()
    assert shown[1] == "overrides: num_steps=60" and "num_steps: 60" not in shown  # the config is in config.json
    saved = json.loads((workdir / "config.json").read_text())
    assert saved["experiment"] == "linear_regression" and saved["config"]["num_steps"] == 60
    results = json.loads((workdir / "results.json").read_text())
    assert results["step"] == 60 and abs(results["test/slope"] - 3.0) < 0.2
    assert "test/slope" in (workdir / "metrics.jsonl").read_text().splitlines()[-1]

    other = launch("--config", "experiments/digits_mlp.py:smoke", "--workdir", str(workdir))
    assert other.returncode == 2
    assert other.stderr.strip().splitlines()[-1] == (
        f"error: workdir '{workdir}' holds a run of experiment 'linear_regression', not 'digits_mlp': "
        "choose another --workdir"
    )
