"""AdEMAMix and Cautious AdamW against their papers' update equations, computed by hand in float64; SOAP against
optax's Adam run in the eigenbasis numpy computes; Muon, SOAP and AdamW sharded over fsdp x tensor (8 fake devices)
equal to one device by the conformance kit."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from research.optim import ademamix, cautious, make_optimizer, matrices, soap
from research.tools import check_optimizer as kit

PARAMS = np.array([1.0, -2.0, 0.5])
GRADS = [np.array([0.5, -1.0, 0.2]), np.array([-0.3, -0.4, 0.1])]
# b2 = 0.95, not 0.999: float32 loses ~3e-5 of 1 - 0.999**2 to cancellation, and the test holds to 1e-6.
B2 = 0.95


def run(tx: optax.GradientTransformation) -> list[np.ndarray]:
    """Parameters after each of the steps with GRADS (the gradients are fixed, not recomputed)."""
    params, state, history = jnp.asarray(PARAMS, jnp.float32), None, []
    state = tx.init(params)
    update = jax.jit(tx.update)
    for grad in GRADS:
        updates, state = update(jnp.asarray(grad, jnp.float32), state, params)
        params = optax.apply_updates(params, updates)
        history.append(np.asarray(params, np.float64))
    return history


def test_ademamix_matches_algorithm_1():
    """Pagliardini et al. (2024), Alg. 1 with constant alpha and b3."""
    lr, b1, b2, b3, alpha, eps, wd = 0.1, 0.9, B2, 0.99, 2.0, 1e-8, 0.1
    theta, m1, m2, nu, expected = PARAMS.copy(), 0.0, 0.0, 0.0, []
    for t, g in enumerate(GRADS, start=1):
        m1 = b1 * m1 + (1 - b1) * g
        m2 = b3 * m2 + (1 - b3) * g
        nu = b2 * nu + (1 - b2) * g**2
        theta = theta - lr * ((m1 / (1 - b1**t) + alpha * m2) / (np.sqrt(nu / (1 - b2**t)) + eps) + wd * theta)
        expected.append(theta.copy())
    # Step 1 by hand, first coordinate: m1_hat = 0.5, m2 = 0.005, sqrt(nu_hat) = 0.5:
    # 1 - 0.1 * ((0.5 + 0.01) / 0.5 + 0.1 * 1) = 0.888
    assert abs(expected[0][0] - 0.888) < 1e-7
    got = run(ademamix.ademamix(lr, b1=b1, b2=b2, b3=b3, alpha=alpha, eps=eps, weight_decay=wd))
    np.testing.assert_allclose(got, expected, atol=1e-6)


def test_ademamix_schedulers():
    """alpha warms up linearly; b3's half-life warms up linearly from b1's to b3's."""
    assert float(ademamix.alpha_at(jnp.float32(5), 8.0, 10)) == 4.0
    assert float(ademamix.alpha_at(jnp.float32(50), 8.0, 10)) == 8.0
    half_life = lambda beta: np.log(0.5) / np.log(beta)
    b1, b3 = 0.9, 0.9999
    np.testing.assert_allclose(float(ademamix.b3_at(jnp.float32(0), b1, b3, 100)), b1, rtol=1e-6)
    np.testing.assert_allclose(float(ademamix.b3_at(jnp.float32(100), b1, b3, 100)), b3, rtol=1e-6)
    middle = float(ademamix.b3_at(jnp.float32(50), b1, b3, 100))
    # float32 holds 0.9999 to ~5e-8, i.e. its half-life to ~5e-4.
    np.testing.assert_allclose(half_life(middle), (half_life(b1) + half_life(b3)) / 2, rtol=2e-3)


def test_cautious_adamw_matches_the_masked_update():
    """Liang et al. (2024): the Adam direction, zeroed where it disagrees with g, rescaled by size / kept."""
    lr, b1, b2, eps, wd = 0.1, 0.9, B2, 1e-8, 0.01
    theta, m, v, expected, kept = PARAMS.copy(), 0.0, 0.0, [], []
    for t, g in enumerate(GRADS, start=1):
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g**2
        u = (m / (1 - b1**t)) / (np.sqrt(v / (1 - b2**t)) + eps)
        phi = (u * g > 0).astype(np.float64)
        kept.append(int(phi.sum()))
        theta = theta - lr * (u * phi * phi.size / max(phi.sum(), 1) + wd * theta)
        expected.append(theta.copy())
    # Step 2: m[0] = 0.9 * 0.05 + 0.1 * -0.3 = 0.015 > 0 but g[0] = -0.3: coordinate 0 is masked,
    # the others scale by 3/2.
    assert kept == [3, 2]
    got = run(cautious.cautious_adamw(lr, b1=b1, b2=b2, eps=eps, weight_decay=wd))
    np.testing.assert_allclose(got, expected, atol=1e-6)
    adamw = run(optax.adamw(lr, b1=b1, b2=b2, eps=eps, weight_decay=wd))
    np.testing.assert_allclose(got[0], adamw[0], atol=1e-6)  # nothing masked in step 1: plain AdamW


def test_soap_is_adam_in_the_eigenbasis_of_its_first_factors():
    """The first gradient only starts the factors (a zero update); with the basis then fixed (frequency beyond the
    run), SOAP's updates are optax's Adam run on the rotated gradients Q_L^T G Q_R and rotated back, Q from numpy's
    eigh of (1 - b2) G1 G1^T and (1 - b2) G1^T G1, each matrix of a stack (a scanned layer) with its own basis;
    vectors get Adam as they are. Square matrices, so that both factors have full rank and one basis (a rank-
    deficient factor's null space has any basis; so does the paper's)."""
    rng = np.random.default_rng(0)
    shapes = {"layers": {"q_proj": {"kernel": (2, 5, 5)}}, "norm": {"scale": (4,)}}
    is_shape = lambda node: isinstance(node, tuple)
    grads = [
        jax.tree.map(lambda shape: rng.normal(size=shape).astype(np.float32), shapes, is_leaf=is_shape)
        for _ in range(4)
    ]
    b1, b2, eps = 0.9, 0.95, 1e-8
    tx = soap.scale_by_soap(b1=b1, b2=b2, eps=eps, precondition_frequency=1000)
    state, ours = tx.init(jax.tree.map(np.zeros_like, grads[0])), []
    for grad in grads:
        updates, state = jax.jit(tx.update)(grad, state)
        ours.append(updates)
    assert all(not np.asarray(leaf).any() for leaf in jax.tree.leaves(ours[0]))
    first = grads[0]["layers"]["q_proj"]["kernel"].astype(np.float64)
    left = [np.linalg.eigh((1 - b2) * g @ g.T)[1] for g in first]
    right = [np.linalg.eigh((1 - b2) * g.T @ g)[1] for g in first]
    rotate = lambda g: np.stack([ql.T @ m @ qr for ql, m, qr in zip(left, g, right)])
    back = lambda u: np.stack([ql @ m @ qr.T for ql, m, qr in zip(left, u, right)])
    rotated = lambda grad: {
        "layers": {"q_proj": {"kernel": rotate(grad["layers"]["q_proj"]["kernel"])}},
        "norm": grad["norm"],
    }
    adam = optax.scale_by_adam(b1=b1, b2=b2, eps=eps)
    adam_state = adam.init(jax.tree.map(jnp.asarray, rotated(grads[0])))
    for grad, mine in zip(grads[1:], ours[1:]):
        theirs, adam_state = adam.update(jax.tree.map(jnp.asarray, rotated(grad)), adam_state)
        kernel = back(np.asarray(theirs["layers"]["q_proj"]["kernel"], np.float64))
        np.testing.assert_allclose(mine["layers"]["q_proj"]["kernel"], kernel, rtol=1e-4, atol=1e-4)  # f32 eigh
        np.testing.assert_allclose(mine["norm"]["scale"], theirs["norm"]["scale"], rtol=1e-6)


def test_matrix_axes_follow_the_layer_not_the_rank():
    """GPT's attention kernels (D x H x Dh, H x Dh x D) are one matrix each; a scanned projection is a stack."""
    leaf = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.float32)
    shape = lambda name, value: matrices.matrix_shape(value.shape, matrices.axes_of(name, value))
    assert shape("blocks/attention/query/kernel", leaf(64, 4, 16)) == (1, 64, 64)
    assert shape("blocks/attention/out/kernel", leaf(4, 16, 64)) == (1, 64, 64)
    assert shape("layers/q_proj/kernel", leaf(3, 64, 32)) == (3, 64, 32)
    hidden = matrices.hidden_matrices(
        {
            "embed_tokens": {"embedding": leaf(10, 8)},
            "lm_head": {"kernel": leaf(8, 10)},
            "layers": {"up_proj": {"kernel": leaf(8, 16)}},
        }
    )
    assert hidden["embed_tokens"]["embedding"] is None and hidden["lm_head"]["kernel"] is None
    assert hidden["layers"]["up_proj"]["kernel"] is not None


@pytest.mark.parametrize("name", ["adamw", "muon", "soap"])
def test_matrix_and_adam_optimizers_shard_over_fsdp_and_tensor(name):
    """The kit's sharded check: kernels split 4 x 2 over fsdp x tensor, biases over tensor, the state alike; two
    steps equal one device's within the kit's tolerance. SOAP rotates only the sides of at most 4 (the 8 x 4
    kernel's output side): the kit's first gradients are rank-deficient on the longer sides, whose null space has
    no one eigenbasis, so another layout's rounding picks another one (as it would in the paper's code)."""
    kwargs = {"max_precond_dim": 4} if name == "soap" else {}
    make = lambda: make_optimizer({"name": name, "learning_rate": 0.02, "kwargs": kwargs})
    assert "4 x 2 fsdp x tensor mesh" in kit.check_sharded(make)
