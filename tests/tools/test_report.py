"""research/tools/report.py on fabricated runs: exact table values, grouping, ranking, CSV and the PNG figures."""

import csv
import json
import math
from pathlib import Path

import matplotlib.image
import numpy as np
import pytest

from research.tools import report

# (optimizer, seed): train losses at steps 10/20/30, examples per second per window, eval (loss, accuracy) at 20/30
RUNS = {
    ("adam", 0): ([1.0, 0.5, 0.4], [50.0, 100.0, 100.0], [(0.6, 0.80), (0.7, 0.85)]),
    ("adam", 1): ([0.8, 0.3, 0.2], [25.0, 100.0, 50.0], [(0.5, 0.90), (0.4, 0.88)]),
    ("sgd", 0): ([2.0, 1.5, 1.2], [100.0, 100.0, 100.0], [(1.4, 0.60), (1.3, 0.65)]),
}
BATCH = 10


def fabricate(root: Path) -> Path:
    """Workdirs as launch.py leaves them: config.json and metrics.jsonl (train and eval records)."""
    for (name, seed), (losses, speeds, evals) in RUNS.items():
        workdir = root / f"name={name},seed={seed}"
        workdir.mkdir(parents=True)
        config = {
            "seed": seed,
            "batch_size": BATCH,
            "optimizer": {"name": name, "learning_rate": 0.1},
            "model": {"features": [4, 2]},
        }
        (workdir / "config.json").write_text(json.dumps({"experiment": "x", "config": config}))
        records = []
        for index, step in enumerate((10, 20, 30)):
            records.append({"step": step, "train/loss": losses[index], "perf/examples_per_second": speeds[index]})
            if step >= 20:
                loss, accuracy = evals[step // 10 - 2]
                records.append({"step": step, "eval/loss": loss, "eval/accuracy": accuracy})
        records.append({"step": 30, "test/accuracy": evals[-1][1] - 0.01})
        (workdir / "metrics.jsonl").write_text("".join(json.dumps(record) + "\n" for record in records))
    (root / "not_a_run").mkdir()  # ignored: no metrics
    return root


@pytest.fixture
def runs(tmp_path):
    return report.collect(fabricate(tmp_path / "sweep"))


def test_collect_and_group_by_the_varying_keys_except_seed(runs):
    assert [run.name for run in runs] == ["name=adam,seed=0", "name=adam,seed=1", "name=sgd,seed=0"]
    assert report.varying_keys(runs) == ["optimizer.name", "seed"]
    groups = report.group_runs(runs)
    assert list(groups) == [(("optimizer.name", "adam"),), (("optimizer.name", "sgd"),)]
    assert report.label((("optimizer.name", "adam"),)) == "name=adam"
    assert runs[0].steps == 30


def test_wall_time_from_the_logged_throughput(runs):
    # windows of 10 steps x 10 examples: 100/50 + 100/100 + 100/100 s
    assert runs[0].wall_seconds == pytest.approx(4.0)
    assert runs[1].wall_seconds == pytest.approx(4.0 + 1.0 + 2.0)
    steps, seconds = runs[1].elapsed()
    assert steps.tolist() == [10, 20, 30] and seconds.tolist() == pytest.approx([4.0, 5.0, 7.0])


def test_group_rows_hold_exact_means_and_sample_stds(runs):
    rows = {
        row["group"]: row
        for row in report.summarize(report.group_runs(runs), ["train/loss", "eval/loss", "eval/accuracy"])
    }
    adam, sgd = rows["name=adam"], rows["name=sgd"]
    assert adam["runs"] == 2 and adam["steps"] == 30
    assert adam["train/loss final"] == pytest.approx(0.3) and adam["train/loss final_std"] == pytest.approx(
        math.sqrt(0.02)
    )
    assert adam["train/loss best"] == pytest.approx(0.3)  # the minimum is the last value in both runs
    assert adam["eval/loss final"] == pytest.approx(0.55) and adam["eval/loss final_std"] == pytest.approx(
        0.15 * math.sqrt(2)
    )
    assert adam["eval/loss best"] == pytest.approx((0.6 + 0.4) / 2)  # each run's minimum
    assert adam["eval/accuracy best"] == pytest.approx((0.85 + 0.90) / 2)  # each run's maximum
    assert adam["eval/accuracy final"] == pytest.approx((0.85 + 0.88) / 2)
    assert adam["wall_s"] == pytest.approx(5.5) and adam["wall_s_std"] == pytest.approx(1.5 * math.sqrt(2))
    assert sgd["runs"] == 1 and sgd["eval/loss final"] == pytest.approx(1.3) and sgd["eval/loss final_std"] == 0.0


def test_rank_best_per_and_markdown(runs):
    rows = report.summarize(report.group_runs(runs), ["eval/loss", "eval/accuracy", "test/accuracy"])
    assert [row["group"] for row in report.rank(rows, "eval/loss")] == ["name=adam", "name=sgd"]
    assert [row["group"] for row in report.rank(rows, "eval/accuracy")] == ["name=adam", "name=sgd"]
    assert len(report.best_per(rows, "optimizer.name", "eval/loss")) == 2
    table = report.format_markdown(report.rank(rows, "eval/loss"), ["eval/loss", "test/accuracy"])
    lines = table.splitlines()
    assert (
        lines[0] == "| group | seeds | steps | wall time (s) | eval/loss final | eval/loss best | test/accuracy final |"
    )
    assert lines[2] == "| name=adam | 2 | 30 | 5.5 ± 2.1 | 0.55 ± 0.21 | 0.5 ± 0.14 | 0.855 ± 0.021 |"
    assert lines[3] == "| name=sgd | 1 | 30 | 3 | 1.3 | 1.3 | 0.64 |"


def test_seed_curves_average_over_seeds_with_a_band(runs):
    curve = report.seed_curves(runs[:2], "eval/loss")
    assert curve["steps"].tolist() == [20, 30]
    assert curve["mean"].tolist() == pytest.approx([0.55, 0.55])
    assert curve["low"].tolist() == pytest.approx([0.5, 0.4]) and curve["high"].tolist() == pytest.approx([0.6, 0.7])
    assert curve["seconds"].tolist() == pytest.approx([(3.0 + 5.0) / 2, (4.0 + 7.0) / 2])
    assert report.seed_curves(runs, "eval/f1") is None


def test_report_writes_tables_csvs_and_pngs(tmp_path, capsys):
    root = fabricate(tmp_path / "sweep")
    report.main([str(root), "--metric", "eval/accuracy", "--best_per", "optimizer.name"])
    printed = capsys.readouterr().out
    assert printed.startswith("# sweep: 3 runs in 2 groups, ranked by final eval/accuracy")
    assert "## Best name by final eval/accuracy" in printed and "![train/loss](train_loss.png)" in printed
    assert (root / "report.md").read_text() == printed
    with open(root / "groups.csv") as handle:
        groups = list(csv.DictReader(handle))
    assert [row["group"] for row in groups] == ["name=adam", "name=sgd"]
    assert float(groups[0]["eval/accuracy final"]) == pytest.approx(0.865)
    assert float(groups[0]["eval/accuracy final_std"]) == pytest.approx(0.015 * math.sqrt(2))
    with open(root / "runs.csv") as handle:
        per_run = list(csv.DictReader(handle))
    assert [row["run"] for row in per_run] == ["name=adam,seed=0", "name=adam,seed=1", "name=sgd,seed=0"]
    assert float(per_run[1]["wall_s"]) == pytest.approx(7.0) and float(per_run[2]["train/loss best"]) == pytest.approx(
        1.2
    )
    for name in ("train_loss.png", "eval_loss.png", "eval_accuracy.png"):
        assert (root / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        image = matplotlib.image.imread(root / name)
        assert image.shape[:2] == (504, 1320)  # 11 x 4.2 inches at 120 dpi
        assert np.std(image[..., :3]) > 0.05  # something was drawn


def test_report_errors_are_one_line(tmp_path):
    with pytest.raises(SystemExit, match="no runs"):
        report.report(tmp_path)
    root = fabricate(tmp_path / "sweep")
    with pytest.raises(
        SystemExit, match=r"--metric 'eval/f1' was never logged; choose one of \['train/loss', 'eval/accuracy'"
    ):
        report.report(root, metric="eval/f1")


def test_a_final_metric_against_a_swept_key(tmp_path):
    root = tmp_path / "pruning"
    for sparsity, accuracy in ((0.0, 0.95), (0.5, 0.94), (0.9, 0.90)):
        workdir = root / f"sparsity={sparsity}"
        workdir.mkdir(parents=True)
        config = {"seed": 0, "batch_size": BATCH, "pruning": {"sparsity": sparsity}}
        (workdir / "config.json").write_text(json.dumps({"experiment": "x", "config": config}))
        records = [{"step": 10, "train/loss": 1.0, "perf/examples_per_second": 10.0}]
        records.append({"step": 10, "test/accuracy": accuracy})
        (workdir / "metrics.jsonl").write_text("".join(json.dumps(record) + "\n" for record in records))
    text = report.report(root, metric="test/accuracy", against="pruning.sparsity")
    assert "![test/accuracy against pruning.sparsity](test_accuracy_against_pruning.sparsity.png)" in text
    image = matplotlib.image.imread(root / "test_accuracy_against_pruning.sparsity.png")
    assert image.shape[:2] == (504, 720) and np.std(image[..., :3]) > 0.05  # 6 x 4.2 inches at 120 dpi
    with pytest.raises(SystemExit, match=r"--against 'seed' does not vary across the runs"):
        report.report(root, metric="test/accuracy", against="seed")
