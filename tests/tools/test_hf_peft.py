"""LoRA adapters exchanged with the `peft` library through the command line: PEFT-made adapters imported onto an
imported base give PEFT's logits, a LoRA run fine-tuned from that base exports adapters that
`PeftModel.from_pretrained` loads with our logits, and adapters for another base model are one line."""

import numpy as np
import pytest
import torch  # the reference implementation (the test extra)
import transformers

from conftest import perturbed, python
from research.data import text

peft = pytest.importorskip("peft")
torch.set_num_threads(1)
VOCAB = 320
SMALL = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2)
SMALL |= dict(num_hidden_layers=2, max_position_embeddings=128, bos_token_id=None, pad_token_id=None, eos_token_id=None)
TOKENS = np.random.default_rng(0).integers(0, VOCAB, (2, 24))


def run(*arguments: str) -> str:
    result = python(*arguments)
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def their_logits(model) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor(TOKENS)).logits.numpy()


def our_logits(workdir, merge: bool = True) -> np.ndarray:
    from research.inference.predict import load_run

    return np.asarray(load_run(workdir, merge=merge).logits(TOKENS))


@pytest.fixture(scope="module")
def base(tmp_path_factory, data_dir):
    """A perturbed random Llama saved by transformers (with a BPE of Shakespeare) and imported as a scanned run."""
    directory = tmp_path_factory.mktemp("peft")
    torch.manual_seed(0)
    model = perturbed(transformers.LlamaForCausalLM(transformers.LlamaConfig(**SMALL)), 0.02)
    model.save_pretrained(directory / "hf")
    tokenizer = text.ByteLevelTokenizer.train(text.split_text("tiny_shakespeare", "train", data_dir), VOCAB)
    tokenizer.save(str(directory / "hf" / "tokenizer.json"))
    run("-m", "research.tools.hf", "import", str(directory / "hf"), str(directory / "base"), "--scan_layers")
    return directory


def reloaded(directory):
    return transformers.LlamaForCausalLM.from_pretrained(directory / "hf").eval()


@pytest.mark.slow
def test_peft_made_adapters_imported_give_peft_logits(base, tmp_path):
    settings = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False)
    theirs = peft.get_peft_model(reloaded(base), peft.LoraConfig(**settings)).eval()
    theirs.save_pretrained(tmp_path / "adapters")
    stdout = run(
        "-m",
        "research.tools.hf",
        "import",
        str(tmp_path / "adapters"),
        str(tmp_path / "ours"),
        "--base",
        str(base / "base"),
    )
    assert "LoRA rank 4, 12 tensors" in stdout
    reference = their_logits(theirs)
    assert np.abs(reference - their_logits(reloaded(base))).max() > 1e-2  # the adapters change the model
    assert np.abs(our_logits(tmp_path / "ours") - reference).max() < 1e-4  # merged into the kernels
    assert np.abs(our_logits(tmp_path / "ours", merge=False) - reference).max() < 1e-4  # as trained


@pytest.mark.slow
def test_a_lora_run_exports_adapters_that_peft_loads(base, tmp_path, data_dir):
    arguments = ["--config", f"experiments/lm.py:from={base / 'base'}", "--workdir", str(tmp_path / "tuned")]
    arguments += [f"--config.data_dir={data_dir}", "--config.num_steps=20", "--config.model.block_size=32"]
    arguments += ["--config.batch_size=8", "--config.eval_every=0", "--config.data.max_eval_windows=8"]
    arguments += ["--config.lora.rank=4", "--config.lora.targets=(q_proj|o_proj|up_proj)$"]
    run("launch.py", *arguments)
    stdout = run("-m", "research.tools.hf", "export", str(tmp_path / "tuned"), str(tmp_path / "adapters"), "--adapters")
    assert "adapters (12 tensors)" in stdout
    theirs = peft.PeftModel.from_pretrained(reloaded(base), tmp_path / "adapters").eval()
    assert sorted(theirs.peft_config["default"].target_modules) == ["o_proj", "q_proj", "up_proj"]
    ours = our_logits(tmp_path / "tuned")
    assert np.abs(ours - their_logits(reloaded(base))).max() > 1e-3  # 20 steps moved the adapters
    assert np.abs(their_logits(theirs) - ours).max() < 1e-4
    run("-m", "research.tools.hf", "export", str(tmp_path / "tuned"), str(tmp_path / "merged"))  # the model, merged
    merged = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "merged").eval()
    assert np.abs(their_logits(merged) - ours).max() < 1e-4


@pytest.mark.slow
def test_adapters_for_another_base_model_are_one_line(base, tmp_path):
    other = transformers.LlamaForCausalLM(transformers.LlamaConfig(**SMALL | dict(hidden_size=32, head_dim=8)))
    settings = dict(r=4, lora_alpha=8, target_modules=["q_proj"])
    peft.get_peft_model(other, peft.LoraConfig(**settings)).save_pretrained(tmp_path / "adapters")
    for extra in (["--base", str(base / "base")], []):
        result = python("-m", "research.tools.hf", "import", str(tmp_path / "adapters"), str(tmp_path / "ours"), *extra)
        assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1, result.stderr
        assert ("for another base model" if extra else "--base") in result.stderr
        assert not (tmp_path / "ours").exists()
    result = python("-m", "research.tools.hf", "export", str(base / "base"), str(tmp_path / "out"), "--adapters")
    assert result.returncode == 2 and "has no adapters" in result.stderr and not (tmp_path / "out").exists()
