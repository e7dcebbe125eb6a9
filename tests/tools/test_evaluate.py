"""research/tools/evaluate.py, the lm-evaluation-harness backend, against the harness's own `hf` backend on the same
checkpoint: every per-sample log-likelihood (multiple choice, rolling perplexity) within 1e-4, greedy generations
identical, task metrics equal; bad inputs one line."""

import json

import numpy as np
import pytest

from conftest import perturbed, python
from research.data import eval_tasks, text

lm_eval = pytest.importorskip("lm_eval")
torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
VOCAB = 320
SMALL = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2)
SMALL |= dict(num_hidden_layers=2, max_position_embeddings=128, bos_token_id=None, pad_token_id=None)
TASKS = list(eval_tasks.TASKS)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, data_dir):
    """A perturbed random Llama saved by transformers with a BPE of Shakespeare whose end of text is the newline, the
    same imported as a run, and the local tasks (12 examples each)."""
    directory = tmp_path_factory.mktemp("evaluate")
    tokenizer = text.ByteLevelTokenizer.train(text.split_text("tiny_shakespeare", "train", data_dir), VOCAB)
    newline = int(tokenizer.encode("\n")[0])
    torch.manual_seed(0)
    model = perturbed(transformers.LlamaForCausalLM(transformers.LlamaConfig(**SMALL, eos_token_id=newline)), 0.02)
    model.save_pretrained(directory / "hf")
    tokenizer.save(str(directory / "hf" / "tokenizer.json"))
    eos = {"eos_token": tokenizer.tokenizer.id_to_token(newline)}
    (directory / "hf" / "tokenizer_config.json").write_text(json.dumps(eos))
    (directory / "hf" / "generation_config.json").write_text(json.dumps({"eos_token_id": newline}))
    result = python("-m", "research.tools.hf", "import", str(directory / "hf"), str(directory / "run"), "--scan_layers")
    assert result.returncode == 0, result.stderr
    eval_tasks.make(directory / "tasks", count=12)
    return directory


@pytest.mark.slow
def test_every_sample_equals_the_harness_hf_backend(checkpoint):
    from lm_eval import evaluator

    from research.inference.predict import load_run
    from research.tools.evaluate import harness as evaluate

    run = load_run(checkpoint / "run")
    length = run.example_inputs.shape[-1]
    manager = evaluate.task_manager(TASKS, str(checkpoint / "tasks"))
    ours = evaluate.evaluate(evaluate.RunLM(run, 8), TASKS, checkpoint / "evals", manager, log_samples=True)
    assert (checkpoint / "evals" / "results_0.json").exists() and (checkpoint / "evals" / "samples_0.json").exists()
    settings = f"pretrained={checkpoint / 'hf'},dtype=float32,max_length={length}"
    theirs = evaluator.simple_evaluate(
        model="hf", model_args=settings, device="cpu", batch_size=8, tasks=TASKS, task_manager=manager, log_samples=True
    )
    for task in TASKS:
        pairs = [
            (mine[0], reference[0])
            for sample, other in zip(ours["samples"][task], theirs["samples"][task], strict=True)
            for mine, reference in zip(sample["resps"], other["resps"], strict=True)
        ]
        if task == "reverse_words":  # generate_until: the same text, greedy
            assert [mine for mine, _ in pairs] == [reference for _, reference in pairs]
            assert sum(bool(mine.strip()) for mine, _ in pairs) >= 6, pairs  # a random model still says something
        elif task == "shakespeare_paragraphs":  # loglikelihood_rolling: a sum over whole speeches
            assert len(pairs) == 12 and max(abs(mine - reference) for mine, reference in pairs) < 1e-4
        else:  # loglikelihood: (log-probability, greedy) of each choice
            assert len(pairs) == 48 and max(abs(mine[0] - reference[0]) for mine, reference in pairs) < 1e-4
            assert [mine[1] for mine, _ in pairs] == [reference[1] for _, reference in pairs]
        for metric, value in theirs["results"][task].items():
            if isinstance(value, float):
                assert np.isclose(ours["results"][task][metric], value, rtol=1e-5, atol=0), (task, metric)


@pytest.mark.slow
def test_bad_inputs_are_one_line(checkpoint, smoke_runs):
    def fails(*arguments):
        result = python("-m", "research.tools.evaluate", *arguments)
        assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1, result.stderr
        return result.stderr

    assert "unknown task 'no_such_task'" in fails("--workdir", str(checkpoint / "run"), "--tasks", "no_such_task")
    workdir = str(smoke_runs["digits_mlp"][0])
    tasks = ["--tasks", "reverse_words", "--include_path", str(checkpoint / "tasks")]
    assert "not a language model" in fails("--workdir", workdir, *tasks)
