"""The optimizer conformance kit: runs any optimizer (registry name, `file.py:make` or `module:make`)
through the checks the trainer relies on and reports each as pass/fail with the reason.

  python launch.py --check_optimizer path/to/my_opt.py:make

The sharding check needs 8 devices: launch.py fakes them on a CPU, the tests have them.
"""

import functools
import tempfile
from pathlib import Path
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from research.errors import ConfigError
from research.optim import contract
from research.optim.registry import make_optimizer

PyTree = Any
ACCUMULATE = 4  # micro-batches per step in the accumulation check


class CheckResult(NamedTuple):
    name: str
    passed: bool
    reason: str


def mlp_params(dtype=jnp.float32) -> PyTree:
    """A 16-8-4 tanh MLP's parameters; leading dims divide by 8 so FSDP can split them."""
    rng = np.random.default_rng(0)  # numpy, not jax.random: nothing to compile
    return {
        "Dense_0": {"kernel": jnp.asarray(rng.normal(size=(16, 8)) * 0.3, dtype), "bias": jnp.full((8,), 0.1, dtype)},
        "Dense_1": {"kernel": jnp.asarray(rng.normal(size=(8, 4)) * 0.3, dtype), "bias": jnp.zeros((4,), dtype)},
    }


def mlp_loss(params: PyTree, inputs_BxI: jax.Array, targets_BxO: jax.Array) -> jax.Array:
    """Mean squared error of the MLP (a mean over examples, so micro-batch gradients average exactly)."""
    hidden_BxH = jnp.tanh(inputs_BxI @ params["Dense_0"]["kernel"] + params["Dense_0"]["bias"])
    outputs_BxO = hidden_BxH @ params["Dense_1"]["kernel"] + params["Dense_1"]["bias"]
    return jnp.mean(jnp.square(outputs_BxO - targets_BxO).astype(jnp.float32))


def mlp_batch(size: int, dtype=jnp.float32, seed: int = 1) -> tuple[jax.Array, jax.Array]:
    rng = np.random.default_rng(seed)
    return jnp.asarray(rng.normal(size=(size, 16)), dtype), jnp.asarray(rng.normal(size=(size, 4)), dtype)


_loss_and_grad = jax.jit(jax.value_and_grad(mlp_loss))  # shared by every optimizer: compiled once per shape


@functools.lru_cache(maxsize=64)
def compiled(tx: optax.GradientTransformation) -> tuple[Callable, Callable]:
    """(init, jitted step) for `tx`; the step takes gradients, so every batch size shares one compilation."""
    inputs, targets = mlp_batch(8, seed=0)

    def step(params, state, grads, value):
        value_fn = lambda p: mlp_loss(p, inputs.astype(p["Dense_0"]["kernel"].dtype), targets)
        updates, state = contract.update(tx, grads, state, params, value=value, value_fn=value_fn)
        return optax.apply_updates(params, updates), state, updates

    return tx.init, jax.jit(step)  # init runs eagerly: its few ops compile once for every optimizer


def run_steps(
    tx: optax.GradientTransformation, params: PyTree, batches: list, state=None
) -> tuple[PyTree, Any, PyTree]:
    """(params, state, last updates) after one jitted step per batch."""
    init, step = compiled(tx)
    state = init(params) if state is None else state
    updates = None
    for inputs, targets in batches:
        value, grads = _loss_and_grad(params, inputs, targets)
        params, state, updates = step(params, state, grads, value)
    return params, state, updates


def _raw(leaf: jax.Array) -> np.ndarray:
    """A leaf as numpy; a typed PRNG key as its raw bits (noise-adding optimizers keep one)."""
    return np.asarray(jax.random.key_data(leaf) if jnp.issubdtype(leaf.dtype, jax.dtypes.prng_key) else leaf)


def _numbers(leaf: jax.Array) -> np.ndarray:
    return _raw(leaf).astype(np.float32)


def _signature(tree: PyTree) -> tuple:
    return jax.tree.structure(tree), [(leaf.shape, leaf.dtype) for leaf in jax.tree.leaves(tree)]


def _all_finite(tree: PyTree) -> bool:
    return all(
        bool(jnp.all(jnp.isfinite(leaf))) for leaf in jax.tree.leaves(tree) if jnp.issubdtype(leaf.dtype, jnp.inexact)
    )


def check_eval_shape(make: Callable) -> str:
    state = jax.eval_shape(make().init, mlp_params())
    return f"{len(jax.tree.leaves(state))} state leaves"


def check_finite(make: Callable) -> str:
    tx = make()
    params, state, updates = run_steps(
        tx, mlp_params(), [mlp_batch(8, seed=s) for s in range(3)], jax.jit(tx.init)(mlp_params())
    )
    for name, tree in (("params", params), ("updates", updates), ("state", state)):
        if not _all_finite(tree):
            raise AssertionError(f"non-finite {name} after 3 jitted steps")
    return "params, updates and state finite after 3 jitted steps"


def check_dtypes(make: Callable) -> str:
    for dtype in (jnp.float32, jnp.bfloat16):
        params = mlp_params(dtype)
        new_params, _, updates = run_steps(make(), params, [mlp_batch(8, dtype)])
        for name, tree in (("updates", updates), ("new params", new_params)):
            if _signature(tree) != _signature(params):
                raise AssertionError(f"{name} do not keep the {jnp.dtype(dtype).name} params' shapes/dtypes")
    return "float32 and bfloat16 kept"


def check_state_stable(make: Callable) -> str:
    tx = make()
    initial = jax.eval_shape(tx.init, mlp_params())
    _, state, _ = run_steps(tx, mlp_params(), [mlp_batch(8, seed=s) for s in range(3)])
    if _signature(state) != _signature(initial):
        raise AssertionError("the state's structure, shapes or dtypes changed after 3 steps")
    return "same structure, shapes and dtypes after 3 steps"


def mirror_shardings(state: PyTree, params: PyTree, param_shardings: PyTree, fallback: NamedSharding) -> PyTree:
    """A state leaf whose path ends with a parameter's path and has its shape takes that parameter's sharding."""
    by_path = {
        tuple(key.key for key in path): (leaf.shape, sharding)
        for (path, leaf), sharding in zip(jax.tree_util.tree_leaves_with_path(params), jax.tree.leaves(param_shardings))
    }

    def choose(path, leaf):
        keys = tuple(getattr(key, "key", None) for key in path)
        for length in range(len(keys), 0, -1):
            shape, sharding = by_path.get(keys[-length:], (None, None))
            if sharding is not None and shape == getattr(leaf, "shape", None):
                return sharding
        return fallback

    return jax.tree_util.tree_map_with_path(choose, state)


def check_sharded(make: Callable) -> str:
    """Steps on an fsdp x tensor mesh (4 x 2 on 8 devices): kernels split along both dimensions, as a transformer's
    are, biases along `tensor`, the state mirroring them; the parameters after 2 steps equal one device's."""
    devices = jax.devices("cpu")  # 8 fake ones under the tests and --check_optimizer
    tensor = 2 if len(devices) % 2 == 0 else 1
    shape, names = (len(devices) // tensor, tensor), ("fsdp", "tensor")
    mesh = jax.make_mesh(shape, names, axis_types=(jax.sharding.AxisType.Auto,) * 2, devices=devices)
    params = mlp_params()
    divides = lambda size, axis: size % mesh.shape[axis] == 0
    spec_of = lambda leaf: P(
        *[axis if divides(size, axis) else None for size, axis in zip(leaf.shape, names[-leaf.ndim :])]
    )
    param_shardings = jax.tree.map(lambda leaf: NamedSharding(mesh, spec_of(leaf)), params)
    tx = make()
    state_shardings = mirror_shardings(
        jax.eval_shape(tx.init, params), params, param_shardings, NamedSharding(mesh, P())
    )
    sharded_params = jax.device_put(params, param_shardings)
    state = jax.jit(tx.init, out_shardings=state_shardings)(sharded_params)
    batches = [mlp_batch(8, seed=s) for s in range(2)]
    sharded = run_steps(tx, sharded_params, batches, state=state)
    plain = run_steps(make(), params, batches)
    # Sums split over devices add in another order: float32 rounding, which adaptive methods amplify a little.
    for got, want in zip(jax.tree.leaves(sharded[:2]), jax.tree.leaves(plain[:2])):
        np.testing.assert_allclose(_numbers(got), _numbers(want), rtol=1e-4, atol=1e-5)
    mirrored = sum(s.spec != P() for s in jax.tree.leaves(state_shardings))
    return f"{shape[0]} x {shape[1]} fsdp x tensor mesh, {mirrored} state leaves split like params, equals unsharded"


def check_checkpoint(make: Callable) -> str:
    import orbax.checkpoint as ocp

    tx = make()
    params, state, _ = run_steps(tx, mlp_params(), [mlp_batch(8, seed=s) for s in range(2)])
    with tempfile.TemporaryDirectory() as directory, ocp.StandardCheckpointer() as checkpointer:
        path = Path(directory) / "opt_state"
        checkpointer.save(path, state)
        checkpointer.wait_until_finished()
        restored = checkpointer.restore(path, jax.tree.map(ocp.utils.to_shape_dtype_struct, state))
    if jax.tree.structure(restored) != jax.tree.structure(state):
        raise AssertionError("the restored state has another structure")
    for got, want in zip(jax.tree.leaves(restored), jax.tree.leaves(state)):
        if got.dtype != want.dtype or not np.array_equal(_raw(got), _raw(want)):
            raise AssertionError("a restored state leaf differs bitwise")
    batch = [mlp_batch(8, seed=9)]
    after_restore, after_original = run_steps(tx, params, batch, restored)[0], run_steps(tx, params, batch, state)[0]
    if not all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(after_restore), jax.tree.leaves(after_original))):
        raise AssertionError("the step after restoring differs from the step without the round trip")
    return "orbax StandardCheckpointer: bitwise, and the next step identical"


def check_accumulation(make: Callable, make_accumulating: Callable) -> str:
    big = [mlp_batch(8 * ACCUMULATE, seed=s) for s in range(2)]
    micro = [(inputs[i::ACCUMULATE], targets[i::ACCUMULATE]) for inputs, targets in big for i in range(ACCUMULATE)]
    expected, _, _ = run_steps(make(), mlp_params(), big)
    accumulated, _, _ = run_steps(make_accumulating(), mlp_params(), micro)
    error = max(float(jnp.max(jnp.abs(a - e))) for a, e in zip(jax.tree.leaves(accumulated), jax.tree.leaves(expected)))
    if error > 1e-5:
        raise AssertionError(f"{ACCUMULATE} accumulated micro-batches differ from the large batch by {error:.2e}")
    return f"optax.MultiSteps: {ACCUMULATE} micro-batches = 1 large batch over 2 steps (max diff {error:.1e})"


def check_converges(make: Callable) -> str:
    """Fits y = 3x + 2 from w = 0.5, b = -0.5 (nonzero: parameter-scaled optimizers need a scale)."""
    inputs_Nx1 = jnp.linspace(-1.0, 1.0, 64)[:, None]
    targets_Nx1 = 3.0 * inputs_Nx1 + 2.0
    loss = lambda p: jnp.mean(jnp.square(inputs_Nx1 @ p["w"] + p["b"] - targets_Nx1))
    params = {"w": jnp.full((1, 1), 0.5), "b": jnp.full((1,), -0.5)}
    tx = make()

    def step(carry, _):
        params, state = carry
        value, grads = jax.value_and_grad(loss)(params)
        updates, state = contract.update(tx, grads, state, params, value=value, value_fn=loss)
        return (optax.apply_updates(params, updates), state), None

    first = float(loss(params))
    (params, _), _ = jax.jit(lambda carry: jax.lax.scan(step, carry, length=300))((params, tx.init(params)))
    last = float(loss(params))
    if not last < 0.05 * first:
        raise AssertionError(f"linear regression loss {first:.3g} -> {last:.3g} in 300 steps (needs < 5%)")
    return f"linear regression loss {first:.3g} -> {last:.2g} in 300 steps"


def check_optimizer(
    name: str, learning_rate: float = 0.05, kwargs: dict | None = None, static_kwargs: str = ""
) -> list[CheckResult]:
    """Runs every check on the optimizer `name`; a config error (bad file, bad factory) is the first, failed row."""
    config = {
        "name": name,
        "learning_rate": learning_rate,
        "kwargs": dict(kwargs or {}),
        "static_kwargs": static_kwargs,
    }
    try:
        tx = make_optimizer(config)
    except ConfigError as error:
        return [CheckResult("loads", False, str(error))]
    steps = optax.MultiSteps(tx, ACCUMULATE)  # as ExtraArgs: its update passes them on to the optimizer
    accumulating = optax.GradientTransformationExtraArgs(steps.init, steps.update)
    make, make_accumulating = (lambda: tx), (lambda: accumulating)
    checks = {
        "init under jax.eval_shape": lambda: check_eval_shape(make),
        "jitted init/update finite": lambda: check_finite(make),
        "shapes and dtypes kept": lambda: check_dtypes(make),
        "state structure stable": lambda: check_state_stable(make),
        "state sharded like params": lambda: check_sharded(make),
        "checkpoint round-trip": lambda: check_checkpoint(make),
        "accumulation = large batch": lambda: check_accumulation(make, make_accumulating),
        "linear regression converges": lambda: check_converges(make),
    }
    rows = [CheckResult("loads", True, name)]
    for check_name, check in checks.items():
        try:
            rows.append(CheckResult(check_name, True, check()))
        except Exception as error:  # every failure is a row of the table, not a crash
            reason = str(error) if isinstance(error, ConfigError) else contract.first_line(error)
            rows.append(CheckResult(check_name, False, reason[:240]))
    return rows


def format_table(rows: list[CheckResult]) -> str:
    """A fixed-width table: check, PASS/FAIL, reason; then a summary line."""
    width = max(len(row.name) for row in rows)
    lines = [f"{'check':{width}s}  result  reason"]
    lines += [f"{row.name:{width}s}  {'PASS' if row.passed else 'FAIL':6s}  {row.reason}" for row in rows]
    lines.append(f"{sum(row.passed for row in rows)}/{len(rows)} checks passed")
    return "\n".join(lines)


def main(name: str) -> bool:
    """launch.py --check_optimizer: prints the kit's table; True when every check passed."""
    rows = check_optimizer(name)
    print(format_table(rows))
    return all(row.passed for row in rows)
