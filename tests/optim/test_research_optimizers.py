"""AdEMAMix and Cautious AdamW against their papers' update equations, computed by hand in float64."""

import jax
import jax.numpy as jnp
import numpy as np
import optax

from research.optim import ademamix, cautious

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
