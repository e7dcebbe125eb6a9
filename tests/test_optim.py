import jax
import jax.numpy as jnp
import ml_collections
import optax
import pytest

from research.config import ConfigError
from research.optim import OPTIMIZERS, make_optimizer


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_every_optimizer_descends_a_quadratic(name):
    tx = make_optimizer(ml_collections.ConfigDict({"name": name, "learning_rate": 0.05}))
    params = {"w": jnp.array([3.0, -2.0])}
    state = tx.init(params)
    loss = lambda p: jnp.sum(p["w"] ** 2)

    @jax.jit
    def step(params, state):
        updates, state = tx.update(jax.grad(loss)(params), state, params)
        return optax.apply_updates(params, updates), state

    for _ in range(50):
        params, state = step(params, state)
    assert float(loss(params)) < 0.5 * 13.0


def test_unknown_optimizer_names_the_nearest():
    with pytest.raises(ConfigError, match="did you mean 'adam'"):
        make_optimizer({"name": "adm", "learning_rate": 1e-3})


def test_unknown_argument_lists_accepted_ones():
    with pytest.raises(ConfigError, match="optimizer 'sgd'.*accepts: learning_rate, momentum, nesterov"):
        make_optimizer({"name": "sgd", "learning_rate": 1e-3, "beta": 0.9})
