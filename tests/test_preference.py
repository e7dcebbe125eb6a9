"""research/features/preference.py (DPO): pairs scored on their replies only, the loss and rewards of Rafailov et
al. 2023's formula (written here apart from ours), the reference's log-probabilities precomputed from the run tuned
from, a preference row without a field as one line, and a resumed run bitwise."""

import json

import jax
import numpy as np
import pytest

from conftest import load_experiment, resumed_losses
from research import experiment, train
from research.data import chat_task, prepare
from research.errors import ConfigError
from research.features import preference

lm = load_experiment("lm")


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    """The bundled reversal task (64 train, 16 test pairs) and its SFT conversations prepared as a chat corpus with a
    400-id BPE (the tokenizer.json and chat_template.jinja a run of it reads)."""
    directory = tmp_path_factory.mktemp("task")
    chat_task.make(directory / "pairs", train=64, test=16)
    arguments = ["--input", str(directory / "pairs" / "sft_train.jsonl"), "--output", str(directory / "chat")]
    assert prepare.main([*arguments, "--tokenizer=bpe:400", "--chat_template=chatml", "--validation_fraction=0.1"]) == 0
    return directory


def smoke(task, **overrides):
    """lm's :smoke model on the chat corpus, optimised on the pairs (reference-free unless overrides say)."""
    config = lm.get_config("smoke")
    config.data.prepared, config.preference.pairs = str(task / "chat"), str(task / "pairs")
    config.update_from_flattened_dict({"model.block_size": 256, "batch_size": 8} | overrides)
    return config


def test_each_side_weighs_its_last_reply_and_shares_the_prompt(task):
    wrapped = preference.wrap(smoke(task), lm)
    rows = preference.read_pairs(task / "pairs" / "dpo_train.jsonl")
    columns = wrapped.encode(rows, 256)
    for i, row in enumerate(rows):
        for prefix, side in (("", "chosen"), ("rejected_", "rejected")):
            targets, weights = columns[f"{prefix}targets"][i], columns[f"{prefix}weights"][i]
            assert wrapped.tokenizer.decode(targets[weights > 0]) == row[side][0]["content"] + "<|im_end|>\n"
        start = int(np.argmax(columns["weights"][i] > 0))  # the prompt: identical up to the chosen reply
        np.testing.assert_array_equal(columns["inputs"][i][:start], columns["rejected_inputs"][i][:start])
    assert sum(len(row["prompt"]) > 2 for row in rows) > 0  # two-round prompts: their first reply weighs nothing


def test_the_loss_and_rewards_are_the_papers_formula(task):
    """Each side's summed reply log-probability equals numpy's from the model's logits (float64) to 1e-5; on those
    log-probabilities the loss and rewards equal -log sigmoid(beta ((pi_c - ref_c) - (pi_r - ref_r))) (+ the NLL
    term) to 1e-6."""
    config = smoke(task, **{"preference.beta": 0.3, "preference.sft_weight": 0.5})
    wrapped = preference.wrap(config, lm)
    batch = {
        k: v[:6] for k, v in wrapped.encode(preference.read_pairs(task / "pairs" / "dpo_train.jsonl"), 256).items()
    }
    batch |= {"beta": np.full(6, 0.3, np.float32), "sft_weight": np.full(6, 0.5, np.float32), "mask": np.ones(6)}
    model = wrapped.make_model(config)
    params = model.init(jax.random.PRNGKey(1), batch["inputs"])["params"]

    def logps(prefix):
        logits = np.asarray(model.apply({"params": params}, batch[f"{prefix}inputs"]), np.float64)
        logits -= logits.max(-1, keepdims=True)
        log_softmax = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
        chosen = np.take_along_axis(log_softmax, batch[f"{prefix}targets"][..., None], -1)[..., 0]
        return (chosen * batch[f"{prefix}weights"]).sum(-1)

    pi_c, pi_r = logps(""), logps("rejected_")
    rng = np.random.default_rng(0)  # a reference near the policy, as in training
    batch |= {"reference_chosen": (pi_c + rng.normal(0, 2, 6)).astype(np.float32)}
    batch |= {"reference_rejected": (pi_r + rng.normal(0, 2, 6)).astype(np.float32)}
    terms = jax.tree.map(np.asarray, wrapped.terms(params, batch, model))  # float32 sums of ~100 terms
    np.testing.assert_allclose(terms["logps/chosen"], pi_c, rtol=1e-5)
    np.testing.assert_allclose(terms["logps/rejected"], pi_r, rtol=1e-5)
    pi_c, pi_r = terms["logps/chosen"].astype(np.float64), terms["logps/rejected"].astype(np.float64)  # identical
    margin = 0.3 * ((pi_c - batch["reference_chosen"]) - (pi_r - batch["reference_rejected"]))
    expected = np.log1p(np.exp(-margin)) + 0.5 * (-pi_c / batch["weights"].sum(-1))
    np.testing.assert_allclose(terms["loss"], expected, rtol=1e-6)
    np.testing.assert_allclose(terms["rewards/chosen"], 0.3 * (pi_c - batch["reference_chosen"]), rtol=1e-6)
    np.testing.assert_allclose(terms["rewards/rejected"], 0.3 * (pi_r - batch["reference_rejected"]), rtol=1e-6)
    np.testing.assert_array_equal(terms["rewards/accuracy"], (margin > 0).astype(np.float32))
    loss, logged = wrapped.loss_fn(params, batch, None, model=model)
    assert float(loss) == pytest.approx(expected.mean(), rel=1e-6)
    assert float(logged["rewards/margin"]) == pytest.approx(margin.mean(), rel=1e-5, abs=1e-6)


def test_a_preference_row_without_a_field_is_one_line(task, tmp_path):
    row = {"prompt": [{"role": "user", "content": "a b"}], "chosen": [{"role": "assistant", "content": "b a"}]}
    (tmp_path / "dpo_train.jsonl").write_text(json.dumps(row) + "\n")
    with pytest.raises(ConfigError, match=r"dpo_train.jsonl:1: a preference row needs prompt, chosen, rejected; "):
        preference.read_pairs(tmp_path / "dpo_train.jsonl")
    with pytest.raises(ConfigError, match="preference.pairs: no .*dpo_train.jsonl"):
        preference.wrap(smoke(task, **{"preference.pairs": str(tmp_path / "none")}), lm).make_data(smoke(task), "train")
    with pytest.raises(ConfigError, match="the experiment reads no tokenizer.json"):
        preference.wrap(lm.get_config("smoke"), lm)


@pytest.mark.slow
def test_the_reference_is_the_run_tuned_from_and_a_resumed_run_ends_bitwise(task, tmp_path):
    """A :smoke SFT run of the chat corpus is the reference: before any step the policy's rewards are 0 (its
    log-probabilities are the reference's); a DPO run from it stopped at step 6 ends bitwise the uninterrupted one."""
    base = lm.get_config("smoke")
    base.data.prepared = str(task / "chat")
    base.update_from_flattened_dict({"model.block_size": 256, "num_steps": 10, "eval_every": 0, "batch_size": 8})
    experiment.claim_workdir(tmp_path / "base", "lm", base)
    train.train_and_evaluate(base, lm, tmp_path / "base")
    config = lm.get_config(f"from={tmp_path / 'base'}")
    config.data.prepared, config.preference.pairs = str(task / "chat"), str(task / "pairs")
    config.update_from_flattened_dict({"model.block_size": 256, "batch_size": 8, "num_steps": 12, "eval_every": 0})
    config.update_from_flattened_dict({"checkpoint.every_steps": 6, "log_every": 1, "optimizer.learning_rate": 1e-2})
    config.optimizer.schedule.warmup_steps = 2
    wrapped = preference.wrap(config, lm)
    batch = next(iter(wrapped.make_data(config, "validation")))
    from research.trained_run import load_params

    params, _ = load_params(tmp_path / "base")
    terms = wrapped.terms(params, batch, wrapped.make_model(config))
    assert np.abs(np.asarray(terms["rewards/margin"])).max() < 1e-5
    losses = resumed_losses(lm, config, tmp_path, stop_at=6)
    assert losses[-1] < losses[0], losses
