"""Downstream tasks during training (research/tools/evaluate/training.py) and Weights & Biases (research/logger.py):
a :smoke Llama on 8 fake devices with `config.evals.tasks` and an offline W&B run: the task metrics at each eval
step in metrics.jsonl, TensorBoard and W&B alike, the final ones equal to the evaluate tool's on the saved checkpoint
(one device, the state reloaded); W&B's record (read by wandb's own reader) holds every metric of metrics.jsonl,
the config and the final results. Bad settings are one line."""

import json
import math
import shutil
import struct
import subprocess

import pytest

from conftest import python, smoke_config
from research import experiment, logger
from research import train as train_lib
from research.data import eval_tasks
from research.errors import ConfigError

TASKS = "shakespeare_next_line,reverse_words,shakespeare_paragraphs"


def tensorboard_scalars(directory) -> dict[tuple[int, str], float]:
    """{(step, tag): value} from the TFRecord event files tensorboardX wrote (length, its CRC, the Event, its CRC)."""
    from tensorboardX.proto import event_pb2

    scalars = {}
    for path in directory.glob("events.out.tfevents.*"):
        data, offset = path.read_bytes(), 0
        while offset < len(data):
            (length,) = struct.unpack("<Q", data[offset : offset + 8])
            event = event_pb2.Event.FromString(data[offset + 12 : offset + 12 + length])
            offset += 12 + length + 4
            for value in event.summary.value:
                scalars[(event.step, value.tag)] = value.simple_value
    return scalars


def wandb_records(run_directory) -> list[dict]:
    """The records of an offline W&B run as wandb's own reader prints them (`wandb leet inspect --json`)."""
    command = [shutil.which("wandb") or "wandb", "leet", "inspect", "--json", str(run_directory)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]


@pytest.mark.slow
def test_task_metrics_in_every_sink_equal_the_evaluate_tool(data_dir, tmp_path):
    pytest.importorskip("lm_eval")
    pytest.importorskip("wandb")
    eval_tasks.make(tmp_path / "tasks", count=8)
    settings = {"evals.tasks": TASKS, "evals.include_path": str(tmp_path / "tasks"), "evals.every": 50}
    settings |= {"evals.batch_size": 8, "logging.wandb": True, "logging.wandb_mode": "offline"}
    settings |= {"mesh.data": 4, "mesh.fsdp": 2}
    module, config = smoke_config("lm", data_dir, **settings)
    workdir = tmp_path / "run"
    experiment.claim_workdir(workdir, "lm", config, overwrite=False)
    final = train_lib.train_and_evaluate(config, module, workdir)

    records = logger.read_jsonl(workdir / "metrics.jsonl")
    tasks = {record["step"]: record for record in records if "eval/shakespeare_paragraphs/word_perplexity" in record}
    assert sorted(tasks) == [50, 100, 150]
    perplexity = "eval/shakespeare_paragraphs/word_perplexity"
    assert tasks[150][perplexity] < tasks[50][perplexity]  # the tasks see the state as it trains
    assert {"eval/shakespeare_next_line/acc", "eval/reverse_words/exact_match", "perf/evals_seconds"} <= set(tasks[50])
    scalars = tensorboard_scalars(workdir / "tensorboard")
    for step, record in tasks.items():
        for name, value in record.items():
            if name != "step":
                assert scalars[(step, name)] == pytest.approx(value, rel=1e-6), (step, name)

    # the final metrics equal the evaluate tool's on the saved checkpoint: one device, the state reloaded
    tool = python("-m", "research.tools.evaluate", "--workdir", str(workdir), "--tasks", TASKS,
                  "--include_path", str(tmp_path / "tasks"), "--batch_size", "4")  # fmt: skip
    assert tool.returncode == 0, tool.stderr
    theirs = json.loads((workdir / "evals" / "results_150.json").read_text())["results"]
    for name, value in final.items():
        if name.count("/") >= 2:  # eval/TASK/METRIC
            _, task, metric = name.split("/", 2)
            assert value == pytest.approx(theirs[task][f"{metric},none"], rel=1e-4), name

    # W&B holds what metrics.jsonl holds, the config and the final results
    (run_directory,) = (workdir / "wandb").glob("offline-run-*")
    written = wandb_records(run_directory)
    history = [record["history"]["item"] for record in written if record["type"] == "history"]
    assert len(history) == len(records)
    for mine, theirs in zip(records, history):
        for name, value in mine.items():
            assert (value is None and math.isnan(theirs[name])) or theirs[name] == pytest.approx(value, rel=1e-6)
    (run,) = [record["run"] for record in written if record["type"] == "run"]
    assert run["config"]["update"]["evals"]["tasks"] == TASKS
    summary = {}
    for record in written:
        if record["type"] == "summary":
            summary |= record["summary"].get("update", {})
    assert all(summary[name] == pytest.approx(value, rel=1e-6) for name, value in final.items())


def test_bad_logging_and_eval_settings_are_one_line(data_dir, monkeypatch):
    module, config = smoke_config("lm", data_dir, **{"logging.wandb": True})
    monkeypatch.setattr(logger.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ConfigError, match="wandb is not installed"):
        logger.check_backends(config)
    monkeypatch.undo()
    config.logging.wandb_mode = "sometimes"
    with pytest.raises(ConfigError, match="wandb_mode 'sometimes'"):
        logger.check_backends(config)


@pytest.mark.slow
def test_bad_task_settings_are_one_line_before_the_header(tmp_path):
    pytest.importorskip("lm_eval")

    devices = {"XLA_FLAGS": "--xla_force_host_platform_device_count=8"}

    def fails(config, *overrides):
        workdir = tmp_path / str(len(list(tmp_path.iterdir())))
        arguments = ("launch.py", "--config", config, "--workdir", str(workdir), *overrides)
        result = python(*arguments, environment=devices)
        assert result.returncode != 0 and len(result.stderr.strip().splitlines()) == 1, result.stderr
        assert "experiment " not in result.stdout, result.stdout  # nothing before the error, not even the header
        return result.stderr

    assert "unknown task 'no_such_task'" in fails("experiments/lm.py:smoke", "--config.evals.tasks=no_such_task")
    assert "not a language model" in fails("experiments/digits_mlp.py:smoke", "--config.evals.tasks=arc_easy")
    batch = fails("experiments/lm.py:smoke", "--config.evals.tasks=arc_easy", "--config.evals.batch_size=3")
    assert "evals.batch_size 3 must be a multiple of the 8 batch shards" in batch
