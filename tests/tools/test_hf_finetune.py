"""A transformers-made checkpoint of each decoder family, as a user takes it through the command line: imported,
fine-tuned 50 steps on the shipped corpus in one command (`experiments/lm.py:from=RUN`, no model setting
copied by hand), exported, and loaded by `transformers`, whose loss on held-out text equals ours."""

import json

import numpy as np
import pytest
import torch  # the reference implementation (the test extra)
import transformers

from conftest import python
from research.data import text

torch.set_num_threads(1)  # the reference's threads would contend with JAX's for this machine's cores
VOCAB = 320  # a byte-level BPE's 256 bytes and some merges
WINDOW = 32
SMALL = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2)
SMALL |= dict(max_position_embeddings=128, bos_token_id=None, pad_token_id=None, eos_token_id=None)
FAMILIES = {  # model_type: (config class, model class, its settings: windows shorter than the 32-token windows)
    "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM, dict(num_hidden_layers=2)),
    "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM, dict(num_hidden_layers=2)),
    "qwen3": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM, dict(num_hidden_layers=2, head_dim=24)),
    "mistral": (
        transformers.MistralConfig,
        transformers.MistralForCausalLM,
        dict(num_hidden_layers=2, sliding_window=8),
    ),
    "gemma": (transformers.GemmaConfig, transformers.GemmaForCausalLM, dict(num_hidden_layers=2, head_dim=16)),
    "gemma2": (
        transformers.Gemma2Config,
        transformers.Gemma2ForCausalLM,
        dict(num_hidden_layers=2, head_dim=16, sliding_window=8, query_pre_attn_scalar=16),
    ),
    "gemma3_text": (
        transformers.Gemma3TextConfig,
        transformers.Gemma3ForCausalLM,
        dict(num_hidden_layers=3, head_dim=16, sliding_window=8, query_pre_attn_scalar=16, sliding_window_pattern=3),
    ),
    "mixtral": (
        transformers.MixtralConfig,
        transformers.MixtralForCausalLM,
        dict(num_hidden_layers=2, num_local_experts=4, num_experts_per_tok=2),
    ),
    "qwen3_moe": (
        transformers.Qwen3MoeConfig,
        transformers.Qwen3MoeForCausalLM,
        dict(num_hidden_layers=2, head_dim=24, num_experts=8, num_experts_per_tok=2, moe_intermediate_size=48),
    ),
}
END_IDS = [5, 7]  # a generation_config.json's end-of-turn ids (Gemma's <end_of_turn>, Qwen's <|im_end|> ...)


@pytest.fixture(scope="module")
def tokenizer(data_dir):
    return text.ByteLevelTokenizer.train(text.split_text("tiny_shakespeare", "train", data_dir), VOCAB)


def held_out(tokenizer, data_dir) -> np.ndarray:
    """Four windows of the validation text, as token ids."""
    ids = tokenizer.encode(text.split_text("tiny_shakespeare", "validation", data_dir)[:20000])
    return ids[: 4 * (WINDOW + 1)].reshape(4, WINDOW + 1).astype(np.int64)


def torch_loss(model, windows: np.ndarray) -> float:
    with torch.no_grad():
        logits = model(torch.tensor(windows[:, :-1])).logits
        return float(torch.nn.functional.cross_entropy(logits.reshape(-1, VOCAB), torch.tensor(windows[:, 1:]).ravel()))


def our_loss(workdir, windows: np.ndarray) -> float:
    import jax

    from research.inference.predict import load_run

    run = load_run(workdir)
    logits = np.asarray(jax.jit(run.model.apply)({"params": run.params}, windows[:, :-1]), np.float64)
    logits -= logits.max(-1, keepdims=True)
    log_probabilities = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    return float(-np.take_along_axis(log_probabilities, windows[:, 1:, None], -1).mean())


def run(*arguments: str) -> str:
    result = python(*arguments)
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


@pytest.mark.slow
@pytest.mark.parametrize("model_type", sorted(FAMILIES))
def test_import_fine_tune_in_one_command_export_and_load_in_transformers(tmp_path, data_dir, tokenizer, model_type):
    config_class, model_class, settings = FAMILIES[model_type]
    torch.manual_seed(0)
    reference = model_class(config_class(**SMALL | settings)).eval()
    reference.save_pretrained(tmp_path / "hf")
    tokenizer.save(str(tmp_path / "hf" / "tokenizer.json"))
    (tmp_path / "hf" / "generation_config.json").write_text(json.dumps({"eos_token_id": END_IDS}))

    imported, tuned, exported = tmp_path / "imported", tmp_path / "tuned", tmp_path / "exported"
    run("-m", "research.tools.hf", "import", str(tmp_path / "hf"), str(imported), "--scan_layers")
    arguments = ["--config", f"experiments/lm.py:from={imported}", "--workdir", str(tuned)]
    arguments += [f"--config.data_dir={data_dir}", "--config.num_steps=50", f"--config.model.block_size={WINDOW}"]
    arguments += ["--config.batch_size=8", "--config.eval_every=0", "--config.data.max_eval_windows=8"]
    stdout = run("launch.py", *arguments)
    assert "left at random init: none" in stdout, stdout
    run("-m", "research.tools.hf", "export", str(tuned), str(exported))

    windows = held_out(tokenizer, data_dir)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(exported).eval()
    assert type(theirs) is model_class
    assert abs(torch_loss(theirs, windows) - our_loss(tuned, windows)) <= 1e-4
    assert torch_loss(theirs, windows) < torch_loss(reference, windows) - 0.5  # 50 steps of Shakespeare learned
    assert json.loads((exported / "generation_config.json").read_text())["eos_token_id"] == END_IDS
    assert (exported / "tokenizer.json").read_text() == (tmp_path / "hf" / "tokenizer.json").read_text()
