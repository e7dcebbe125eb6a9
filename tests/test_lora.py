"""research/features/lora.py: adapters that start as the model and merge into it, a frozen base with no optimizer
state and no gradient (but what lora.also_train names), sharded like the kernels they adapt (8 fake devices equal
one), the dry run's optimizer-state saving, bad settings as one line, and a resumed LoRA run bitwise."""

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from conftest import mesh_losses, resumed_losses, smoke_config
from research import experiment, sharding, steps
from research.errors import ConfigError
from research.features import lora
from research.tree import named_leaves


def adapted(data_dir, **overrides):
    """lm's :smoke Llama (two layers, scanned) with rank-4 adapters on every projection."""
    settings = {"model.family": "llama", "model.num_layers": 2, "model.scan_layers": True, "lora.rank": 4}
    settings |= {"lora.alpha": 8.0} | overrides
    return smoke_config("lm", data_dir, **settings)


def one_device(config, module):
    return steps.build(config, module, sharding.make_mesh({"data": 1}, jax.devices()[:1]))


def with_random_b(params, seed=0):
    """The adapters' B drawn (they start at zero, which would hide a wrong merge)."""
    rng = np.random.default_rng(seed)
    return jax.tree_util.tree_map_with_path(
        lambda path, leaf: rng.normal(0, 0.1, leaf.shape).astype(leaf.dtype) if "lora_b" in str(path[-1]) else leaf,
        params,
    )


@pytest.mark.slow  # keeps the quick suite within its 6 minutes
def test_adapters_start_as_the_model_and_merge_into_its_kernels(data_dir):
    module, config = adapted(data_dir)
    setup = one_device(config, module)
    state = setup.init_state()
    names = named_leaves(state.params)
    assert names["layers/q_proj/lora_a"].shape == (2, 64, 4) and names["layers/down_proj/lora_b"].shape == (2, 4, 64)
    assert str(names["layers/q_proj/lora_a"].dtype) == "float32"
    tokens = np.random.default_rng(0).integers(0, 60, (2, 16))
    wrapped = steps.with_features(config, module, setup.mesh)
    logits = lambda experiment_, params, model: experiment.logits_of(experiment_, model, {"params": params}, tokens)
    plain_config, plain_params = lora.merged(config, state.params)
    plain_model = module.make_model(plain_config)
    # B = 0: the adapted model is the model itself, bitwise
    assert np.array_equal(logits(wrapped, state.params, setup.model), logits(module, plain_params, plain_model))
    trained = with_random_b(state.params)
    _, merged = lora.merged(config, trained)
    assert "lora_a" not in str(jax.tree.structure(merged))
    difference = np.abs(logits(wrapped, trained, setup.model) - logits(module, merged, plain_model)).max()
    assert 0 < difference < 1e-5
    assert np.abs(logits(wrapped, trained, setup.model) - logits(module, plain_params, plain_model)).max() > 1e-2


def test_only_the_adapters_train_and_hold_optimizer_state(data_dir):
    module, config = adapted(data_dir)
    setup = one_device(config, module)
    state = setup.init_state()
    before = jax.device_get(state.params)
    adapters = {name for name in named_leaves(state.params) if name.rsplit("/", 1)[-1] in lora.ADAPTERS}
    moments = [name for name, leaf in named_leaves(state.opt_state).items() if leaf.ndim]
    state_bytes = sum(leaf.nbytes for leaf in jax.tree.leaves(state.opt_state))
    adapter_bytes = sum(named_leaves(state.params)[name].nbytes for name in adapters)
    assert len(adapters) == 14 and len(moments) == 28  # scanned: 7 projections x (A, B); Adam's mu and nu of each
    assert all(any(name.endswith("/" + adapter) for adapter in adapters) for name in moments), moments
    assert 2 * adapter_bytes <= state_bytes < 2 * adapter_bytes + 1024  # Adam's two moments, a few counters
    batches = iter(module.make_data(config, "train"))
    for _ in range(3):
        state, metrics = setup.train_step(state, sharding.put_batch(next(batches), setup.mesh))
    after = jax.device_get(state.params)
    for name, value in named_leaves(after).items():
        unchanged = np.array_equal(value, named_leaves(before)[name])
        assert unchanged != (name in adapters), name


@pytest.mark.slow  # keeps the quick suite within its 6 minutes
def test_adapters_shard_like_their_kernels_and_eight_devices_equal_one(data_dir):
    module, config = adapted(data_dir, **{"batch_size": 8})
    rules = lora.derived_rules(config.param_rules)
    assert ("layers/(q_proj|k_proj|v_proj|gate_proj|up_proj)/lora_a$", ("stage", "fsdp", None)) in rules
    assert ("layers/(q_proj|k_proj|v_proj|gate_proj|up_proj)/lora_b$", ("stage", None, "tensor")) in rules
    mesh_axes = {"data": 2, "fsdp": 2, "tensor": 2}
    mesh = sharding.make_mesh(mesh_axes, jax.devices()[:8])
    setup = steps.build(config, module, mesh)
    where = named_leaves(setup.state_shardings.params)
    assert where["layers/o_proj/lora_a"].spec == P(None, "tensor", None)
    assert where["layers/o_proj/lora_b"].spec == P(None, None, "fsdp")
    one = mesh_losses(module, config.copy_and_resolve_references(), {"data": 1}, 4)
    eight = mesh_losses(module, config, mesh_axes, 4)
    assert np.abs(one - eight).max() < 1e-5 and one[-1] < one[0], (one, eight)


def test_the_dry_run_counts_optimizer_state_and_gradients_of_the_adapters_only(data_dir):
    from research.tools import dry_run

    module, config = adapted(data_dir)
    full = dry_run.analytic_memory(config, module, one_device(config, module))
    module, plain = adapted(data_dir, **{"lora.rank": 0})
    without = dry_run.analytic_memory(plain, module, one_device(plain, module))
    per_layer = 4 * (2 * (64 + 64) + 2 * (64 + 32) + 2 * (64 + 176) + (176 + 64))  # rank x (in + out), 7 projections
    adapters = 2 * per_layer
    assert full["gradients"] == 4 * adapters
    # rank 4 of width 64: the adapters are ~10 % of the model
    assert full["optimizer state"] < 2 * 4 * adapters + 1024 < without["optimizer state"] / 8
    module, also = adapted(data_dir, **{"lora.also_train": "embed_tokens"})  # trained in full beside the adapters
    setup = one_device(also, module)
    embedding = named_leaves(setup.abstract_state.params)["embed_tokens/embedding"]
    assert dry_run.analytic_memory(also, module, setup)["gradients"] == 4 * (adapters + np.prod(embedding.shape))


def test_bad_settings_are_one_line(data_dir):
    module, config = adapted(data_dir, **{"lora.targets": "no_such_layer$"})
    with pytest.raises(ConfigError, match="matches none of the model's dense layers: name some of .*q_proj"):
        one_device(config, module)
    module, config = adapted(data_dir, **{"lora.dropout": 1.0})
    with pytest.raises(ConfigError, match=r"dropout 1.0 in \[0, 1\)"):
        one_device(config, module)


@pytest.mark.slow
def test_a_resumed_lora_run_with_dropout_ends_bitwise(data_dir, tmp_path):
    overrides = {"num_steps": 12, "eval_every": 0, "log_every": 1, "checkpoint.every_steps": 6, "lora.dropout": 0.1}
    module, config = adapted(data_dir, **overrides | {"optimizer.learning_rate": 1e-2})
    losses = resumed_losses(module, config, tmp_path, stop_at=6)
    assert len(losses) == 12 and losses[-1] < losses[0], losses
