"""Sweeps: expansion, names, command lines, override checks, and the runner's skip/resume/parallel behaviour."""

import json
import os
import sys
import textwrap
from pathlib import Path

import pytest

from conftest import ROOT, launch, python
from experiments import mnist_mlp
from research.errors import ConfigError
from research.tools import sweep


def test_a_grid_is_the_cartesian_product_in_order():
    runs = sweep.expand({"optimizer.name": ["adam", "sgd"], "seed": [0, 1, 2], "num_steps": 10})
    assert len(runs) == 6
    assert runs[0] == {"optimizer.name": "adam", "seed": 0, "num_steps": 10}
    assert runs[5] == {"optimizer.name": "sgd", "seed": 2, "num_steps": 10}


def test_a_list_of_grids_is_their_union_without_duplicates_and_tuples_are_single_values():
    runs = sweep.expand(
        [
            {"optimizer.name": "adam", "optimizer.learning_rate": [1e-3, 3e-4]},
            {"optimizer.name": "adam", "optimizer.learning_rate": 1e-3},  # a duplicate: dropped
            {"model.features": (128, 10)},
        ]
    )
    assert runs == [
        {"optimizer.name": "adam", "optimizer.learning_rate": 1e-3},
        {"optimizer.name": "adam", "optimizer.learning_rate": 3e-4},
        {"model.features": (128, 10)},
    ]


def test_the_shipped_adam_sweep_has_four_optimizers_four_rates_two_seeds():
    runs = sweep.load_sweep(ROOT / "sweeps" / "adam_paper_mnist.py")
    assert len(runs) == 32
    assert {dict(run.overrides)["optimizer.name"] for run in runs} == {"nesterov", "adagrad", "rmsprop", "adam"}
    assert len({run.name for run in runs}) == 32


@pytest.mark.parametrize(
    "spec, message",
    [
        ({"seed": []}, "sweep key 'seed' has an empty list of values"),
        ([{}], "a sweep is a dict of config overrides or a list of them"),
        ({"data.name": ["a/b", "a_b"]}, "two runs of the sweep would share the workdir 'name=a_b'"),
    ],
)
def test_bad_sweeps_are_one_line_errors(spec, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        sweep.make_runs(spec)


def test_run_names_are_sorted_short_and_stable():
    assert (
        sweep.run_name({"seed": 1, "optimizer.name": "adam", "optimizer.learning_rate": 0.001})
        == "learning_rate=0.001,name=adam,seed=1"
    )
    assert sweep.run_name({"optimizer.learning_rate": 0.1, "optimizer.name": "adam"}) == sweep.run_name(
        {"optimizer.name": "adam", "optimizer.learning_rate": 0.1}
    )
    # two keys ending alike keep their full paths; slashes cannot make subdirectories
    assert sweep.run_name({"data.name": "a/b", "optimizer.name": "sgd"}) == "data.name=a_b,optimizer.name=sgd"
    assert sweep.run_name({"model.features": (128, 10)}) == "features=(128,10)"
    assert sweep.run_name({}) == "base"


def test_command_line_of_a_run():
    run = sweep.Run(
        "learning_rate=0.001,seed=1", (("optimizer.learning_rate", 1e-3), ("seed", 1), ("model.features", (64,)))
    )
    argv = sweep.command(run, "experiments/mnist_mlp.py:cpu", "runs/s", "launch.py", extra=["--config.num_steps=5"])
    assert argv == [
        sys.executable,
        "launch.py",
        "--config=experiments/mnist_mlp.py:cpu",
        "--workdir=runs/s/learning_rate=0.001,seed=1",
        "--config.num_steps=5",
        "--config.optimizer.learning_rate=0.001",
        "--config.seed=1",
        "--config.model.features=(64,)",
    ]


def test_overrides_are_checked_against_the_config_before_anything_runs():
    config = mnist_mlp.get_config("smoke")
    good = sweep.make_runs({"optimizer.learning_rate": [0.1, 0.01], "optimizer.kwargs.momentum": 0.8})
    sweep.check_overrides(config, good)  # optimizer.kwargs is open: no error
    with pytest.raises(
        ConfigError, match="sweep: unknown config key 'optimizer.learning_rat'; did you mean 'optimizer.learning_rate'"
    ):
        sweep.check_overrides(config, sweep.make_runs({"optimizer.learning_rat": 0.1}))
    with pytest.raises(ConfigError, match="sweep run num_steps=many"):
        sweep.check_overrides(config, sweep.make_runs({"num_steps": "many"}))


def test_core_slots_and_child_threads():
    assert sweep.core_slots(2, [0, 1, 2, 3, 5]) == [{0, 1}, {2, 3}]
    assert sweep.core_slots(1, [3]) == [{3}]
    with pytest.raises(ConfigError, match="--sweep_parallel 3 exceeds the 2 cores"):
        sweep.core_slots(3, [0, 1])
    environment = sweep.child_environment(1)
    assert "intra_op_parallelism_threads=1" in environment["XLA_FLAGS"] and environment["OMP_NUM_THREADS"] == "1"


def finished_run(workdir: Path, num_steps: int, step: int, stopped_early: bool = False) -> None:
    """A workdir as launch.py leaves it (only the files the runner reads)."""
    workdir.mkdir(parents=True)
    (workdir / "config.json").write_text(json.dumps({"experiment": "x", "config": {"num_steps": num_steps}}))
    (workdir / "results.json").write_text(
        json.dumps({"step": step} | ({"stopped_early": True} if stopped_early else {}))
    )


def test_finished_runs_are_skipped_and_others_emitted(tmp_path):
    runs = sweep.make_runs({"seed": [0, 1, 2, 3]})
    finished_run(tmp_path / "seed=0", num_steps=10, step=10)
    finished_run(tmp_path / "seed=1", num_steps=10, step=4, stopped_early=True)
    finished_run(tmp_path / "seed=2", num_steps=10, step=5)  # results of an earlier, shorter run: not finished
    lines = sweep.emit(runs, "experiments/x.py", tmp_path, "launch.py")
    assert [line.split("--workdir=")[1].split()[0].rsplit("/", 1)[1] for line in lines] == ["seed=2", "seed=3"]


FAKE_LAUNCH = textwrap.dedent("""
    # Stands in for launch.py: records its arguments and cores, writes results; seed 3 fails,
    # seed 4 stops early without results (as a preempted run does: exit 0, a checkpoint).
    import json, os, sys
    args = dict(arg[2:].split("=", 1) for arg in sys.argv[1:])
    workdir = args["workdir"]
    os.makedirs(workdir, exist_ok=True)
    json.dump({"experiment": "x", "config": {"num_steps": 7}}, open(os.path.join(workdir, "config.json"), "w"))
    if args["config.seed"] not in ("3", "4"):
        json.dump({"step": 7}, open(os.path.join(workdir, "results.json"), "w"))
    with open(os.path.join(workdir, "calls.txt"), "a") as calls:
        calls.write(json.dumps({"seed": args["config.seed"], "cores": sorted(os.sched_getaffinity(0)),
                                "xla": os.environ.get("XLA_FLAGS", "")}) + "\\n")
    sys.exit(5 if args["config.seed"] == "3" else 0)
""")


def test_runner_runs_unfinished_runs_in_parallel_and_skips_finished_ones(tmp_path):
    launch = tmp_path / "fake_launch.py"
    launch.write_text(FAKE_LAUNCH)
    root = tmp_path / "sweep"
    finished_run(root / "seed=0", num_steps=7, step=7)
    runs = sweep.make_runs({"seed": [0, 1, 2, 3, 4]})
    parallel = 2 if len(os.sched_getaffinity(0)) >= 2 else 1
    messages = []
    codes = sweep.run_sweep(runs, "experiments/x.py", root, parallel=parallel, launch=launch, echo=messages.append)
    assert codes == {"seed=1": 0, "seed=2": 0, "seed=3": 5, "seed=4": 0}
    assert messages[0] == f"sweep: 5 runs in {root}, 1 finished already, 4 to run, {parallel} at a time"
    assert any("seed=3: FAILED (exit 5" in message for message in messages)
    assert any("seed=4: stopped, resumable in " in message and "(CPU " in message for message in messages)
    assert not (root / "seed=0" / "calls.txt").exists()
    call = json.loads((root / "seed=1" / "calls.txt").read_text())
    if parallel == 2:  # each run pinned to its own core, single-threaded
        assert len(call["cores"]) == len(os.sched_getaffinity(0)) // 2
        assert "intra_op_parallelism_threads=" in call["xla"]
    manifest = json.loads((root / sweep.MANIFEST).read_text())
    assert [run["name"] for run in manifest["runs"]] == ["seed=0", "seed=1", "seed=2", "seed=3", "seed=4"]
    # again: the three that finished are skipped, the failed and the stopped one run again
    codes = sweep.run_sweep(runs, "experiments/x.py", root, parallel=1, launch=launch, echo=messages.append)
    assert codes == {"seed=3": 5, "seed=4": 0}
    assert len((root / "seed=1" / "calls.txt").read_text().splitlines()) == 1


@pytest.mark.slow  # three launch.py processes: ~30 s on a quiet 2-core CPU, minutes on a busy one
def test_launch_sweep_end_to_end_resumes_and_skips(tmp_path):
    """Two real runs through launch.py; one is cut short (a checkpoint, no results), the sweep finishes it
    from its checkpoint, then a third invocation skips both."""
    spec = tmp_path / "two_seeds.py"
    spec.write_text("def get_sweep():\n    return {'seed': [0, 1], 'num_steps': 40}\n")
    config, runs = "experiments/linear_regression.py:smoke", str(tmp_path / "runs")
    base = ["--config", config, "--sweep", str(spec), "--workdir", runs, "--config.checkpoint.every_steps=20"]
    # seed 0 alone, stopped at step 20 as a preemption would: its checkpoint is there, its results not
    partial = python("-c", PARTIAL_RUN, str(tmp_path / "runs" / "num_steps=40,seed=0"))
    assert partial.returncode == 0, partial.stderr
    first = launch(*base, "--config.log_every=10")
    assert first.returncode == 0, first.stdout + first.stderr
    assert "2 runs in" in first.stdout and "0 finished already, 2 to run" in first.stdout
    log = (tmp_path / "runs" / "num_steps=40,seed=0" / sweep.LOG_FILE).read_text()
    assert "resuming from the checkpoint at step 20" in log
    records = [
        json.loads(line)
        for line in (tmp_path / "runs" / "num_steps=40,seed=0" / "metrics.jsonl").read_text().splitlines()
    ]
    assert [record["step"] for record in records if "train/loss" in record] == [10, 20, 30, 40]
    again = launch(*base, "--config.log_every=10")
    assert again.returncode == 0 and "2 finished already, 0 to run" in again.stdout


# Trains seed 0's run to step 20 of 40 in-process and stops there, saving a checkpoint.
PARTIAL_RUN = textwrap.dedent("""
    import sys
    from experiments import linear_regression
    from research import experiment, train
    config = linear_regression.get_config("smoke")
    config.update_from_flattened_dict({"seed": 0, "num_steps": 40, "checkpoint.every_steps": 20, "log_every": 10})
    experiment.claim_workdir(sys.argv[1], "linear_regression", config)
    train.train_and_evaluate(config, linear_regression, sys.argv[1], stop_at_step=20)
""")
