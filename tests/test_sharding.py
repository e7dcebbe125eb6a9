"""Parameter sharding rules, and sharded training equal to one device for every kind of mesh."""

import os
import signal
import subprocess
import sys
import types

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from conftest import ROOT
from research import metrics, sharding, steps, train
from research.config import DEFAULT_PARAM_RULES, trainer_config
from research.models import bert, cnn, gpt, mlp, resnet, rnn
from research.tree import path_name

CATCH_ALL = len(DEFAULT_PARAM_RULES) - 1
MODELS = {
    "gpt": (gpt.GPT(vocab_size=65, block_size=16, num_layers=2, num_heads=4, width=32), jnp.zeros((2, 16), jnp.int32)),
    "bert": (
        bert.BertForMaskedLM(
            bert.BertEncoder(vocab_size=40, max_length=16, num_layers=1, num_heads=2, width=32, mlp_dim=64)
        ),
        jnp.zeros((2, 16), jnp.int32),
    ),
    "resnet": (resnet.CifarResNet(depth=8), jnp.zeros((2, 32, 32, 3))),
    "cnn": (cnn.CNN(num_classes=10), jnp.zeros((2, 28, 28, 1))),
    "mlp": (mlp.MLP(features=(64, 32, 10)), jnp.zeros((2, 64))),
    "rnn": (rnn.RecurrentLM(vocab_size=65, width=32), jnp.zeros((2, 16), jnp.int32)),
}
MESHES = [
    {"data": 8, "fsdp": 1, "tensor": 1},
    {"data": 1, "fsdp": 8, "tensor": 1},
    {"data": 2, "fsdp": 2, "tensor": 2},
    {"data": 4, "fsdp": 1, "tensor": 2},
]


@pytest.mark.parametrize("name", sorted(MODELS))
def test_every_weight_matrix_matches_a_rule_before_the_catch_all(name):
    model, inputs = MODELS[name]
    params = jax.eval_shape(model.init, jax.random.PRNGKey(0), inputs)["params"]
    unmatched = [
        path_name(path)
        for path, leaf in jax.tree_util.tree_leaves_with_path(params)
        if leaf.ndim >= 2 and sharding.match_rule(path_name(path), DEFAULT_PARAM_RULES)[0] == CATCH_ALL
    ]
    assert unmatched == []


def adam_setup(model, loss_fn, mesh_axes: dict, batch: dict, learning_rate: float = 1e-3) -> steps.Setup:
    """build() for a bare model and loss: Adam, the default sharding rules, a mesh of those axes on the first
    devices."""
    config = trainer_config()
    config.update_from_flattened_dict(
        {"batch_size": len(batch["inputs"]), "optimizer.name": "adam", "optimizer.learning_rate": learning_rate}
    )
    config.mesh.update(mesh_axes)
    experiment = types.SimpleNamespace(make_model=lambda config: model, loss_fn=loss_fn)
    mesh = sharding.make_mesh(mesh_axes, jax.devices()[: int(np.prod(list(mesh_axes.values())))])
    return steps.build(config, experiment, mesh, batch=batch)


def test_fsdp_and_tensor_shard_weights_and_adam_moments_follow():
    model, inputs = MODELS["gpt"]
    abstract = adam_setup(
        model, gpt_loss, {"data": 2, "fsdp": 2, "tensor": 2}, {"inputs": np.zeros((8, 16), np.int32)}
    ).abstract_state
    block = abstract.params["block_0"]
    assert block["attention"]["query"]["kernel"].sharding.spec == jax.sharding.PartitionSpec("fsdp", "tensor", None)
    assert block["attention"]["out"]["kernel"].sharding.spec == jax.sharding.PartitionSpec("tensor", None, "fsdp")
    assert block["mlp"]["fc_out"]["kernel"].sharding.spec == jax.sharding.PartitionSpec("tensor", "fsdp")
    assert abstract.params["token_embedding"]["embedding"].sharding.spec == jax.sharding.PartitionSpec(None, "fsdp")
    adam = abstract.opt_state[0].inner_state[0]  # chain(inject_hyperparams(adam)): adam's own state
    assert adam.mu["block_0"]["mlp"]["fc_in"]["kernel"].sharding == block["mlp"]["fc_in"]["kernel"].sharding
    assert adam.nu["block_0"]["attention"]["out"]["kernel"].sharding == block["attention"]["out"]["kernel"].sharding
    assert adam.count.sharding.spec == jax.sharding.PartitionSpec()


def test_a_dimension_the_axis_does_not_divide_stays_whole():
    mesh = sharding.make_mesh({"data": 1, "fsdp": 8, "tensor": 1})
    assert sharding.spec_for((65, 32), (None, "fsdp"), mesh) == jax.sharding.PartitionSpec(None, "fsdp")
    assert sharding.spec_for((10, 12), ("fsdp", None), mesh) == jax.sharding.PartitionSpec(None, None)


def test_large_optimizer_state_that_mirrors_no_parameter_splits_over_fsdp():
    """SOAP's per-layer eigenbases (L x n x n) split along their first dimension fsdp divides; a small leaf, and any
    leaf on a mesh without fsdp, stays whole; a leaf shaped like a parameter still mirrors it."""
    from research.state import TrainState

    P = jax.sharding.PartitionSpec
    leaf = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.float32)
    params = {"layers": {"q_proj": {"kernel": leaf(4, 64, 64)}}}
    opt_state = {"bases": {"layers": {"q_proj": {"kernel": (leaf(4, 512, 512), leaf(3, 512, 512))}}}}
    opt_state |= {"count": leaf(), "small": leaf(8, 8), "mu": params}
    state = TrainState(step=leaf(), params=params, model_state={}, opt_state=opt_state, rng=leaf(2))
    rules = ((r"kernel$", (None, "fsdp", "tensor")), (".*", ()))
    fsdp = sharding.state_shardings(state, sharding.make_mesh({"data": 1, "fsdp": 4, "tensor": 2}), rules)
    left, right = fsdp.opt_state["bases"]["layers"]["q_proj"]["kernel"]
    assert left.spec == P("fsdp") and right.spec == P(None, "fsdp")  # 3 layers: the next dimension
    assert fsdp.opt_state["small"].spec == P() and fsdp.opt_state["count"].spec == P()
    assert fsdp.opt_state["mu"]["layers"]["q_proj"]["kernel"].spec == P(None, "fsdp", "tensor")
    data = sharding.state_shardings(state, sharding.make_mesh({"data": 8, "fsdp": 1, "tensor": 1}), rules)
    assert data.opt_state["bases"]["layers"]["q_proj"]["kernel"][0].spec == P()


def gpt_loss(params, batch, rng, *, model):
    logits = model.apply({"params": params}, batch["inputs"])
    nll = optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], batch["inputs"][:, 1:])
    return metrics.masked_mean(nll), {}


def resnet_loss(params, batch, rng, *, model, model_state):
    logits, updated = model.apply(
        {"params": params, **model_state}, batch["inputs"], train=True, mutable=["batch_stats"]
    )
    nll = optax.softmax_cross_entropy_with_integer_labels(logits, batch["labels"])
    return metrics.masked_mean(nll), {"model_state": updated}


def losses_on(mesh_axes, name, steps=5):
    """Per-step losses of a few Adam steps on fixed random batches, on a mesh with those axes."""
    rng = np.random.default_rng(0)
    if name == "gpt":
        model, loss_fn = gpt.GPT(vocab_size=64, block_size=16, num_layers=2, num_heads=4, width=32), gpt_loss
        # Counting sequences (start, start + 1, ...) mod 64: learnable, so the loss has to fall.
        batches = [
            {"inputs": ((rng.integers(0, 64, (16, 1)) + np.arange(16)) % 64).astype(np.int32)} for _ in range(steps)
        ]
    else:
        model, loss_fn = resnet.CifarResNet(depth=8), resnet_loss
        batches = [
            {
                "inputs": rng.normal(size=(16, 16, 16, 3)).astype(np.float32),
                "labels": rng.integers(0, 10, 16).astype(np.int32),
            }
            for _ in range(steps)
        ]
    setup = adam_setup(model, loss_fn, mesh_axes, batches[0], learning_rate=3e-3)
    state, losses = setup.init_state(jax.random.PRNGKey(0)), []
    for batch in batches:
        state, step_metrics = setup.train_step(state, sharding.put_batch(batch, setup.mesh))
        losses.append(float(step_metrics["loss"]))
    return np.array(losses)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["gpt", "resnet"])
def test_every_mesh_gives_the_one_device_losses(name):
    reference = losses_on({"data": 1, "fsdp": 1, "tensor": 1}, name)
    assert reference[-1] < reference[0]
    # The GPT exercises every kind of mesh; the ResNet (BatchNorm statistics, convolutions) the two extremes.
    for mesh_axes in MESHES if name == "gpt" else (MESHES[0], MESHES[2]):
        np.testing.assert_allclose(losses_on(mesh_axes, name), reference, atol=1e-5, err_msg=str(mesh_axes))


WINDOW_SCRIPT = """
import os, sys
os.environ["XLA_FLAGS"] = ("--xla_force_host_platform_device_count=8"
                           " --xla_cpu_collective_call_terminate_timeout_seconds=5"
                           " --xla_cpu_collective_call_warn_stuck_timeout_seconds=2")
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P
from research import train

def step(w, x):  # a gradient-like mean over the batch: one all-reduce when x is split over devices
    w = w - 0.01 * (jnp.mean(jnp.tanh(x @ w), axis=0)[None, :] - 0.3)
    return w, jnp.sum(w)

def run(devices, window):
    mesh = jax.make_mesh((len(devices),), ("data",), devices=devices)
    w = jax.device_put(jnp.full((16, 16), 0.5), NamedSharding(mesh, P()))
    x = jax.device_put(jnp.linspace(0.0, 1.0, 16 * 16).reshape(16, 16), NamedSharding(mesh, P("data")))
    jitted = jax.jit(step)
    for _ in range(int(sys.argv[1])):
        w, loss = jitted(w, x)
        if window:
            window.add(loss)
    return float(loss)

paced = run(jax.devices(), train.DispatchWindow() if sys.argv[2] == "window" else None)
print(paced, run(jax.devices()[:1], None))
"""


@pytest.mark.slow  # two processes of 1,000 steps; the second waits out XLA's collective timeout
def test_dispatch_window_keeps_collectives_from_deadlocking(tmp_path):
    """Without the window, 1,000 un-read steps of a program with an all-reduce abort XLA:CPU (8
    host devices, the rendezvous timed out); with it they finish and give the one-device loss."""
    script = tmp_path / "window.py"
    script.write_text(WINDOW_SCRIPT)
    environment = {key: value for key, value in os.environ.items() if key != "XLA_FLAGS"} | {"PYTHONPATH": str(ROOT)}

    def run(steps: int, choice: str) -> subprocess.CompletedProcess:
        command = [sys.executable, str(script), str(steps), choice]
        return subprocess.run(command, capture_output=True, text=True, env=environment, timeout=120)

    paced = run(1000, "window")
    assert paced.returncode == 0, paced.stderr[-1500:]
    sharded, single = map(float, paced.stdout.split())
    np.testing.assert_allclose(sharded, single, rtol=1e-5)
    unpaced = run(1000, "none")
    assert unpaced.returncode == -signal.SIGABRT, (
        "XLA:CPU no longer deadlocks without the window: DispatchWindow may be unneeded"
    )
    assert "Termination timeout for `all reduce" in unpaced.stderr


def test_dispatch_window_blocks_on_the_step_depth_back():
    window = train.DispatchWindow(depth=2)
    outputs = [jnp.arange(4.0) * step for step in range(4)]
    for output in outputs:
        window.add({"loss": output})
    assert [len(window.pending), window.pending[0] is outputs[2]] == [2, True]
    with pytest.raises(ValueError, match="depth 0: must be at least 1"):
        train.DispatchWindow(depth=0)
