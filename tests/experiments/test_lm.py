"""experiments/lm.py: published sizes count what transformers counts, the chunked loss is the loss,
fsdp x tensor on 8 fake devices trains as one device, and the largest sizes lower and compile for a
mesh without a byte of their parameters allocated."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch  # the reference implementation (the test extra)
import transformers

from conftest import assert_trees_close, load_experiment, mesh_losses, smoke_config
from research import perf, steps
from research.errors import ConfigError
from research.models import param_count, published
from research.tools.hf import convert as hf

lm = load_experiment("lm")
ARCHITECTURES = {  # model_type: (config class, model class)
    "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
    "gpt2": (transformers.GPT2Config, transformers.GPT2LMHeadModel),
    "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
    "qwen3": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM),
    "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM),
    "gemma": (transformers.GemmaConfig, transformers.GemmaForCausalLM),
    "gemma2": (transformers.Gemma2Config, transformers.Gemma2ForCausalLM),
    "gemma3_text": (transformers.Gemma3TextConfig, transformers.Gemma3ForCausalLM),
    "mixtral": (transformers.MixtralConfig, transformers.MixtralForCausalLM),
    "qwen3_moe": (transformers.Qwen3MoeConfig, transformers.Qwen3MoeForCausalLM),
}


@pytest.mark.parametrize("name", sorted(lm.SIZES))
def test_published_sizes_have_the_published_parameter_counts(name):
    """Ours sized by jax.eval_shape; transformers' model of our exported config.json built on torch's meta
    device (no memory): both give the count published for the released checkpoint."""
    config = lm.get_config(name)
    assert lm.parameter_count(config) == lm.PUBLISHED_PARAMETERS[name]
    hf_config = hf.config_json(lm.make_model(config), lm.hf_layout(config))
    config_class, model_class = ARCHITECTURES[hf_config["model_type"]]
    with torch.device("meta"):
        reference = model_class(config_class(**hf_config))
    assert reference.num_parameters() == lm.PUBLISHED_PARAMETERS[name]


@pytest.mark.parametrize("name", sorted(published.PUBLISHED_ACTIVE_PARAMETERS))
def test_mixtures_have_the_published_active_parameter_counts(name):
    """A token's parameters: ours (all less the experts it skips, research/perf.py) equal transformers' model's
    all less (experts - top k) / experts of its experts' tensors, and the published figure to its digits."""
    config = lm.get_config(name)
    ours = perf.active_parameters(lm.decoder_shape(config), lm.parameter_count(config))
    hf_config = hf.config_json(lm.make_model(config), lm.hf_layout(config))
    config_class, model_class = ARCHITECTURES[hf_config["model_type"]]
    with torch.device("meta"):
        reference = model_class(config_class(**hf_config))
    skipped = 1 - hf_config["num_experts_per_tok"] / config.model.num_experts
    experts = sum(tensor.numel() for layer in reference.model.layers for tensor in layer.mlp.experts.parameters())
    assert ours == reference.num_parameters() - round(skipped * experts)
    assert abs(ours - published.PUBLISHED_ACTIVE_PARAMETERS[name]) < 0.1e9  # published to a tenth of a billion


def test_from_run_takes_the_model_tokenizer_and_parameters_of_the_run_it_fine_tunes(tmp_path):
    """`lm.py:from=RUN` (one command after `python -m research.tools.hf import`): the architecture, layer layout,
    parameter dtype, tokenizer and end ids are RUN's; the context, compute dtype and training are this config's."""
    from research import experiment

    source = lm.get_config("cpu-gemma3")
    source.update_from_flattened_dict({"model.num_layers": 6, "model.scan_layers": True, "model.block_size": 4096})
    source.update_from_flattened_dict({"data.tokenizer": "/models/gemma/tokenizer.json", "data.end_ids": (1, 106)})
    experiment.claim_workdir(tmp_path / "imported", "lm", source)
    config = lm.get_config(f"from={tmp_path / 'imported'}")
    assert {key: config.model[key] for key in source.model} == dict(source.model) | {"block_size": 64}
    assert (config.data.tokenizer, tuple(config.data.end_ids)) == ("/models/gemma/tokenizer.json", (1, 106))
    assert config.init_from.workdir == str((tmp_path / "imported").absolute()) and config.num_steps == 2000
    assert lm.hf_layout(config) == "gemma3_text" and lm.tokenizer_file(config) == "/models/gemma/tokenizer.json"
    experiment.claim_workdir(tmp_path / "gpt", "shakespeare_gpt", source)
    with pytest.raises(ConfigError, match="holds a run of experiment 'shakespeare_gpt', not of 'lm'"):
        lm.get_config(f"from={tmp_path / 'gpt'}")


@pytest.mark.slow
@pytest.mark.parametrize("family", ["qwen2", "qwen3", "mistral", "gemma", "gemma2", "gemma3", "mixtral", "qwen3_moe"])
def test_each_familys_smoke_config_learns(tmp_path, data_dir, family):
    """`:smoke-FAMILY`, the family's block at the smoke size: 150 steps from ln(66) ~ 4.19 to below 3.4."""
    from research import experiment, train

    config = lm.get_config(f"smoke-{family}")
    config.data_dir = data_dir
    assert config.model.family == family and lm.hf_layout(config) in hf.LAYOUTS
    experiment.claim_workdir(tmp_path, "lm", config)
    assert train.train_and_evaluate(config, lm, tmp_path)["eval/loss"] < 3.4


def test_generated_text_ends_at_the_first_end_id(data_dir):
    module, config = smoke_config("lm", data_dir, **{"data.end_ids": (13, 0)})
    ids = module.encode_text(config, "To be, or not")
    cut = module.encode_text(config, "To be,")
    assert module.decode_tokens(config, [*cut, 13, *ids]) == "To be," and module.end_ids(config) == (13, 0)
    assert module.decode_tokens(config, ids) == "To be, or not"


@pytest.mark.parametrize("family", ["llama", pytest.param("gpt", marks=pytest.mark.slow)])
def test_chunked_loss_equals_the_loss_and_its_gradients(data_dir, family):
    """16 x 32 positions in chunks of 100 (the last one padded): the same value and gradients."""
    module, config = smoke_config("lm", data_dir, **{"model.family": family})
    batch = next(iter(module.make_data(config, "train")))
    model = module.make_model(config)
    params = model.init(jax.random.PRNGKey(0), batch["inputs"])["params"]
    whole = jax.jit(jax.value_and_grad(lambda p: module.loss_fn(p, batch, None, model=model)[0]))(params)
    chunked_model = model.clone(loss_chunk=100)
    chunked = jax.jit(jax.value_and_grad(lambda p: module.loss_fn(p, batch, None, model=chunked_model)[0]))(params)
    assert float(chunked[0]) == pytest.approx(float(whole[0]), abs=1e-6)
    assert_trees_close(chunked[1], whole[1], atol=1e-6)


def losses_on(mesh_axes: dict, data_dir: str, steps_count: int = 4) -> np.ndarray:
    module, config = smoke_config("lm", data_dir, **{"model.num_layers": 2, "model.scan_layers": True})
    return mesh_losses(module, config, mesh_axes, steps_count)


@pytest.mark.slow
def test_fsdp_and_tensor_parallel_give_the_one_device_losses(data_dir):
    """2 data x 2 fsdp x 2 tensor, and 4 fsdp x 2 tensor, by the experiment's rules: the smoke model's
    query and key/value projections and SwiGLU units split over tensor, its 66-row vocabulary whole."""
    reference = losses_on({"data": 1, "fsdp": 1, "tensor": 1}, data_dir)
    assert reference[-1] < reference[0]
    for mesh_axes in ({"data": 2, "fsdp": 2, "tensor": 2}, {"data": 1, "fsdp": 4, "tensor": 2}):
        np.testing.assert_allclose(losses_on(mesh_axes, data_dir), reference, atol=1e-5, err_msg=str(mesh_axes))


@pytest.mark.slow
@pytest.mark.parametrize("name", ["llama2-70b", "llama3-8b"])
def test_largest_sizes_lower_and_compile_on_eight_fake_devices(name):
    """The train step of the full model (80 scanned layers for 70B), 8 x 4096 tokens, FSDP over 8 devices:
    compiled for CPU devices it never runs on; each holds an eighth of the parameters and Adam's moments."""
    config = lm.get_config(name)
    config.batch_size = 8
    batch = {
        "inputs": jax.ShapeDtypeStruct((8, config.model.block_size), jnp.int32),
        "targets": jax.ShapeDtypeStruct((8, config.model.block_size), jnp.int32),
        "mask": jax.ShapeDtypeStruct((8,), jnp.float32),
    }
    setup = steps.build(config, lm, batch=batch)
    assert param_count(setup.abstract_state.params) == lm.PUBLISHED_PARAMETERS[name]
    compiled = setup.train_step.lower(setup.abstract_state, setup.batch_spec).compile()
    state_bytes = 3 * 4 * lm.PUBLISHED_PARAMETERS[name]  # float32 parameters, Adam's two moments
    arguments = compiled.memory_analysis().argument_size_in_bytes
    assert state_bytes / 8 <= arguments <= 1.05 * state_bytes / 8
    kernel = setup.abstract_state.params["layers"]["q_proj"]["kernel"]
    assert kernel.sharding.spec == jax.sharding.PartitionSpec("stage", "fsdp", "tensor")  # stage and tensor of 1
