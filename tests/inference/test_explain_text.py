"""Text models explained (research/inference/explain_text.py): attention maps equal `transformers`' own
(output_attentions, random weights imported through research/tools/hf/), token attributions satisfy
completeness on the BERT classifier, and predict.py writes the pictures."""

import types

import numpy as np
import pytest
import torch  # the reference implementation (the test extra)
import transformers

from conftest import python
from research.inference import explain_text, predict
from research.tools.hf import convert as hf

VOCAB, TOKENS = 96, np.random.default_rng(0).integers(1, 96, size=(2, 24))
SMALL = dict(num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=64)
REFERENCES = {
    "gpt2": lambda: transformers.GPT2LMHeadModel(
        transformers.GPT2Config(vocab_size=VOCAB, n_positions=64, n_embd=64, n_layer=2, n_head=4)
    ),
    "llama gqa": lambda: transformers.LlamaForCausalLM(
        transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_key_value_heads=2, **SMALL)
    ),
    "bert padded": lambda: transformers.BertForMaskedLM(
        transformers.BertConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, **SMALL)
    ),
}


def as_run(model, params, logits_fn=None):
    """What attention_maps reads of a run: its model, variables and experiment hooks."""
    module = types.SimpleNamespace(**({"logits_fn": logits_fn} if logits_fn else {}))
    return types.SimpleNamespace(name="imported", model=model, variables={"params": params}, module=module)


@pytest.mark.parametrize("name", [*REFERENCES, "llama gqa scanned"])
def test_attention_maps_are_transformers_attentions(tmp_path, name):
    torch.manual_seed(0)
    reference = REFERENCES[name.removesuffix(" scanned")]()
    reference.config._attn_implementation = "eager"  # the implementation that returns its weights
    reference.eval().save_pretrained(tmp_path)
    model, params = hf.from_hf(tmp_path, **({"scan_layers": True} if "scanned" in name else {}))
    tokens, mask = TOKENS.copy(), np.ones_like(TOKENS)
    logits_fn = None
    if "padded" in name:  # the second example ends in 6 padding tokens, masked out of attention
        tokens[1, -6:], mask[1, -6:] = 0, 0
        logits_fn = lambda variables, inputs, *, model: model.apply(variables, inputs, inputs != 0)  # noqa: E731
    ours = explain_text.attention_maps(as_run(model, params, logits_fn), tokens)
    with torch.no_grad():
        theirs = reference(torch.tensor(tokens), attention_mask=torch.tensor(mask), output_attentions=True).attentions
    theirs = np.stack([layer.numpy() for layer in theirs])
    assert ours.shape == theirs.shape == (2, 2, 4, 24, 24)
    kept = np.broadcast_to(mask[None, :, None, :, None].astype(bool), ours.shape)  # padded queries: anything
    assert np.abs(ours - theirs)[kept].max() < 1e-5
    np.testing.assert_allclose(ours.sum(axis=-1), 1.0, atol=1e-5)


@pytest.fixture(scope="module")
def bert(smoke_runs):
    run = predict.load_run(smoke_runs["bert_finetune"][0])
    return run, next(iter(run.module.make_data(run.config, "test")))


def test_token_attributions_sum_to_the_change_in_logit_within_1_percent(bert):
    run, batch = bert
    result = explain_text.token_attributions(run, batch["inputs"][:6], steps=64)
    assert result.values.shape == batch["inputs"][:6].shape  # one number per token
    assert result.completeness_gap.max() < 0.01  # measured: max 0.03 % on the smoke run
    assert np.abs(result.logit - result.baseline_logit).min() > 0.01


def test_predict_explain_writes_shaded_tokens_and_attention_maps(smoke_runs, tmp_path):
    result = python(
        "predict.py", f"--workdir={smoke_runs['bert_finetune'][0]}", "--explain=test", "--num_examples=5",
        f"--explain_dir={tmp_path}",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    assert "integrated gradients (64 steps) over 5 test examples" in result.stdout
    page = (tmp_path / "tokens.html").read_text()
    assert page.count("<p><b>true ") == 5 and "[CLS]</span>" in page
    weights = np.load(tmp_path / "attention.npz")["weights"]  # layers x 4 examples x heads x L x L
    assert weights.shape[1] == 4 and (tmp_path / "attention_3.png").stat().st_size > 5_000
    generated = python(
        "predict.py", f"--workdir={smoke_runs['shakespeare_gpt'][0]}", "--explain_text=ROMEO: hark",
        f"--explain_dir={tmp_path / 'gpt'}",
    )  # fmt: skip
    assert generated.returncode == 0, generated.stderr[-2000:]
    weights = np.load(tmp_path / "gpt" / "attention.npz")["weights"][:, 0]  # layers x heads x 11 x 11
    assert weights.shape[-1] == len("ROMEO: hark")
    assert np.abs(np.triu(weights, k=1)).max() == 0.0  # causal: nothing from later tokens
