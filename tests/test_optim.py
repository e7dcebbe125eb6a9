"""The registry: every optimizer passes the core of the conformance kit; names and arguments fail clearly."""

import pytest

from research.config import ConfigError
from research.optim import OPTIMIZERS, make_optimizer
from research.optim import conformance



@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_every_registered_optimizer_conforms(name):
    """Finite jitted steps, f32/bf16 kept, bitwise checkpoint, accumulation = large batch."""
    config = {"name": name, "learning_rate": 0.05}
    tx, accumulating = make_optimizer(config), make_optimizer(config | {"accumulate_steps": conformance.ACCUMULATE})
    make = lambda: tx
    assert "finite" in conformance.check_finite(make)
    assert conformance.check_dtypes(make) == "float32 and bfloat16 kept"
    assert conformance.check_checkpoint(make).startswith("orbax StandardCheckpointer: bitwise")
    assert "max diff" in conformance.check_accumulation(make, lambda: accumulating)


def test_unknown_optimizer_names_the_nearest():
    with pytest.raises(ConfigError, match="did you mean 'adam'"):
        make_optimizer({"name": "adm", "learning_rate": 1e-3})


def test_unknown_argument_lists_accepted_ones():
    with pytest.raises(ConfigError, match="optimizer 'sgd'.*accepts: learning_rate, momentum, nesterov"):
        make_optimizer({"name": "sgd", "learning_rate": 1e-3, "kwargs": {"beta": 0.9}})


def test_unknown_schedule_and_config_key():
    with pytest.raises(ConfigError, match="unknown schedule 'cosin'"):
        make_optimizer({"name": "sgd", "learning_rate": 1e-3, "schedule": {"name": "cosin"}})
    with pytest.raises(ConfigError, match=r"unknown optimizer config keys \['lr'\]"):
        make_optimizer({"name": "sgd", "lr": 1e-3})
