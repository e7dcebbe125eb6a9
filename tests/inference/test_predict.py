"""Prediction from a workdir, export and int8 quantization, end to end on digits_mlp's smoke run."""

import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from conftest import ROOT, train_as_launch
from research.errors import ConfigError
from research.inference import export, predict, quantize
from research.inference.generate import Sampling


@pytest.fixture(scope="module")
def trained(smoke_runs):
    """(workdir, final metrics) of digits_mlp :smoke, trained as launch.py would."""
    return smoke_runs["digits_mlp"]


@pytest.fixture(scope="module")
def run(trained):
    return predict.load_run(trained[0])


@pytest.fixture(scope="module")
def ranked(data_dir, tmp_path_factory):
    """The workdir of digits_mlp :smoke evaluated every 50 steps, keeping the checkpoint with the
    highest validation loss: that is step 50, never the newest, so "best" and "latest" differ."""
    workdir = tmp_path_factory.mktemp("ranked")
    train_as_launch(
        "digits_mlp",
        data_dir,
        workdir,
        {
            "eval_every": 50,
            "log_every": 50,
            "checkpoint.keep": 1,
            "checkpoint.best_metric": "eval/loss",
            "checkpoint.best_mode": "max",
        },
    )
    return workdir


def test_evaluate_reproduces_the_training_metrics_and_confusion(trained, run):
    results = predict.evaluate(run, "test")
    assert run.step == 200
    assert results["accuracy"] == pytest.approx(trained[1]["test/accuracy"], abs=1e-6)
    assert results["accuracy"] > 0.85
    matrix = results["confusion_matrix"]
    assert matrix.shape == (10, 10) and matrix.sum() == 1797  # every official test image once
    assert np.trace(matrix) / matrix.sum() == pytest.approx(results["accuracy"], abs=1e-6)
    table = predict.format_metrics(results)
    assert f"accuracy             {results['accuracy']:.4f}" in table and "confusion (rows true" in table


def test_classify_gives_sorted_probabilities_from_text_inputs(run):
    batch = next(iter(run.module.make_data(run.config, "test")))
    text = "\n".join(",".join(f"{value:.6f}" for value in row) for row in batch["inputs"][:50])
    top = predict.classify(run, predict.read_inputs("-", text), top=3)
    assert len(top) == 50 and all(len(classes) == 3 for classes in top)
    for classes in top:
        probabilities = [probability for _, probability in classes]
        assert probabilities == sorted(probabilities, reverse=True) and 0 < sum(probabilities) <= 1 + 1e-6
    expected = np.argmax(np.asarray(run.logits(batch["inputs"][:50])), axis=-1)
    assert [int(classes[0][0]) for classes in top] == expected.tolist()


def test_workdir_problems_are_one_line_errors(tmp_path, run):
    with pytest.raises(ConfigError, match="no config.json in .*: pass the --workdir of a run started with launch.py"):
        predict.load_run(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"experiment": "digits_mlp", "config": run.config.to_dict()}))
    with pytest.raises(ConfigError, match=r"no checkpoints in .*checkpoints: train first \(python launch.py"):
        predict.load_run(tmp_path)
    with pytest.raises(ConfigError, match="trains a MLP, which does not generate text"):
        predict.generate_text(run, "hello", 5, Sampling())


def test_checkpoint_best_loads_the_step_the_best_metric_ranks_first(ranked):
    records = [json.loads(line) for line in (ranked / "metrics.jsonl").read_text().splitlines()]
    losses = {record["step"]: record["eval/loss"] for record in records if "eval/loss" in record}
    assert sorted(path.name for path in (ranked / "checkpoints").iterdir()) == ["200", "50"]  # the newest and the best
    assert max(losses, key=losses.get) == 50 and losses[50] > losses[200]
    best, latest, chosen = (predict.load_run(ranked, which=which) for which in ("best", "latest", "50"))
    assert (best.step, latest.step, chosen.step) == (50, 200, 50)
    assert predict.evaluate(best, "validation")["loss"] == pytest.approx(losses[50], abs=1e-5)
    assert predict.evaluate(latest, "validation")["loss"] == pytest.approx(losses[200], abs=1e-5)


def test_checkpoint_choice_errors_name_the_steps_that_exist(trained):
    with pytest.raises(
        ConfigError,
        match=r"--checkpoint best needs a run trained with checkpoint.best_metric set \(this one was not\): "
        r"use latest or one of the steps \[200\]",
    ):
        predict.load_run(trained[0], which="best")
    for which in ("150", "last"):
        with pytest.raises(
            ConfigError,
            match=rf"no checkpoint '{which}' in .*checkpoints: use latest, best or one of the steps \[200\]",
        ):
            predict.load_run(trained[0], which=which)
    command = [sys.executable, "predict.py", f"--workdir={trained[0]}", "--checkpoint=150", "--evaluate=test"]
    result = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 2 and result.stderr.strip().splitlines()[-1].endswith(
        "use latest, best or one of the steps [200]"
    )


LOADER = textwrap.dedent("""
    import json, sys
    import jax, numpy as np
    directory = sys.argv[1]
    manifest = json.load(open(f"{directory}/manifest.json"))
    exported = jax.export.deserialize(open(f"{directory}/{manifest['artifact']}", "rb").read())
    inputs = np.load(f"{directory}/inputs.npy").astype(manifest["inputs"]["dtype"])
    np.save(f"{directory}/outputs.npy", np.asarray(exported.call(inputs)))
    print(sorted(name for name in ("flax", "optax", "orbax", "research") if name in sys.modules))
""")


@pytest.mark.parametrize("quantized", [False, True])
def test_exported_artifact_reproduces_outputs_in_a_process_with_only_jax(run, tmp_path, quantized):
    manifest = export.export_run(run, tmp_path, quantized=quantized)
    assert manifest["inputs"] == {"shape": ["batch", 64], "dtype": "float32"}
    assert manifest["class_names"] == [str(index) for index in range(10)]
    inputs = next(iter(run.module.make_data(run.config, "test")))["inputs"][:37]  # any batch size
    np.save(tmp_path / "inputs.npy", inputs)
    loaded = subprocess.run([sys.executable, "-c", LOADER, str(tmp_path)], capture_output=True, text=True, check=True)
    assert loaded.stdout.strip() == "[]"  # none of this codebase's dependencies
    params = quantize.dequantize(quantize.quantize(run.params)) if quantized else run.params
    expected = np.asarray(run.logits(inputs, {"params": params}))
    np.testing.assert_allclose(np.load(tmp_path / "outputs.npy"), expected, atol=1e-5, rtol=0)


def test_int8_quantization_keeps_accuracy_and_shrinks_kernels_four_times(run):
    result = quantize.report(run, "test")
    before, after = result["metrics"]["accuracy"]
    assert before - after < 0.005
    float_bytes, int8_bytes = result["kernel_bytes"]
    assert float_bytes == 4 * (64 * 64 + 64 * 32 + 32 * 10)
    assert int8_bytes == float_bytes // 4 + 4 * (64 + 32 + 10)  # one float32 scale per output channel
    assert "kernel bytes" in quantize.format_report(result)


def test_quantized_kernel_error_is_at_most_half_a_step():
    kernel = np.random.default_rng(0).normal(size=(5, 3, 7)).astype(np.float32)
    quantized = quantize.quantize_kernel(kernel)
    assert quantized.values.dtype == np.int8 and quantized.scale.shape == (1, 1, 7)
    error = np.abs(np.asarray(quantize.dequantize({"kernel": quantized})["kernel"]) - kernel)
    assert np.all(error <= np.asarray(quantized.scale) / 2 + 1e-7)


def test_a_run_saved_with_another_optimizer_state_layout_predicts_with_its_raw_parameters(smoke_runs, tmp_path, capsys):
    """An older version's optimizer state (here: the record says another optimizer) cannot be restored
    into today's; prediction reads the parameters alone and says so."""
    import shutil

    workdir, results = smoke_runs["digits_mlp"]
    shutil.copytree(workdir, tmp_path / "run")
    record = json.loads((tmp_path / "run" / "config.json").read_text())
    record["config"]["optimizer"]["name"] = "sgd" if record["config"]["optimizer"]["name"] != "sgd" else "adam"
    (tmp_path / "run" / "config.json").write_text(json.dumps(record))
    run = predict.load_run(tmp_path / "run")
    assert "using its raw parameters" in capsys.readouterr().err
    assert abs(predict.evaluate(run, "test")["accuracy"] - results["test/accuracy"]) < 1e-6
