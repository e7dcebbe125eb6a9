"""Your own optimizer from your own file: it trains digits_mlp through launch.py, the kit checks it,
and every mistake in the file is an error that names the file."""

import json
import textwrap
from pathlib import Path

import jax
import jax.numpy as jnp
import pytest

from conftest import assert_trees_close, launch, restored_state
from experiments import digits_mlp, linear_regression
from research import sharding, train
from research.errors import ConfigError
from research.optim import make_optimizer
from research.steps import build
from research.tools import check_optimizer as conformance

MY_OPTIMIZER = '''
"""Heavy-ball momentum written by hand, as a user would, outside the repository."""
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax


class MyState(NamedTuple):
    velocity: optax.Updates


def make(learning_rate, momentum=0.9):
    def init(params):
        return MyState(velocity=jax.tree.map(jnp.zeros_like, params))

    def update(grads, state, params=None):
        velocity = jax.tree.map(lambda v, g: momentum * v + g, state.velocity, grads)
        return jax.tree.map(lambda v: (-learning_rate * v).astype(v.dtype), velocity), MyState(velocity)

    return optax.GradientTransformation(init, update)
'''


def write(directory: Path, name: str, text: str) -> Path:
    path = directory / name
    path.write_text(textwrap.dedent(text))
    return path


@pytest.mark.slow
def test_my_optimizer_file_trains_digits_mlp_through_launch(tmp_path, data_dir):
    path = write(tmp_path, "my_opt.py", MY_OPTIMIZER)
    workdir = tmp_path / "run"
    result = launch(
        "--config",
        "experiments/digits_mlp.py:smoke",
        "--workdir",
        str(workdir),
        f"--config.data_dir={data_dir}",
        f"--config.optimizer.name={path}:make",
        "--config.optimizer.learning_rate=0.05",
        "--config.optimizer.kwargs.momentum=0.8",
        "--config.num_steps=80",
        "--config.eval_every=0",
    )
    assert result.returncode == 0, result.stderr[-2000:]
    saved = json.loads((workdir / "config.json").read_text())["config"]["optimizer"]
    assert saved["name"] == f"{path}:make" and saved["kwargs"] == {"momentum": 0.8}
    assert json.loads((workdir / "results.json").read_text())["test/accuracy"] > 0.85
    logged = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert [record["train/learning_rate"] for record in logged if "train/learning_rate" in record][-1] == pytest.approx(
        0.05
    )


@pytest.mark.slow
def test_kit_from_the_command_line_passes_my_optimizer(tmp_path):
    path = write(tmp_path, "my_opt.py", MY_OPTIMIZER)
    result = launch("--check_optimizer", f"{path}:make")
    assert result.returncode == 0, result.stdout + result.stderr[-2000:]
    rows = result.stdout.strip().splitlines()
    assert rows[-1] == "9/9 checks passed"
    assert sum(" PASS " in row for row in rows) == 9
    assert "4 x 2 fsdp x tensor mesh, 4 state leaves split like params, equals unsharded" in result.stdout


def test_kit_reports_a_state_that_changes_dtype(tmp_path):
    bad = MY_OPTIMIZER.replace("MyState(velocity)", "MyState(jax.tree.map(lambda v: v.astype(jnp.float16), velocity))")
    path = write(tmp_path, "drifting.py", bad)
    tx = make_optimizer({"name": f"{path}:make", "learning_rate": 0.1})
    with pytest.raises(AssertionError, match="the state's structure, shapes or dtypes changed after 3 steps"):
        conformance.check_state_stable(lambda: tx)
    rows = [
        conformance.CheckResult("loads", True, str(path)),
        conformance.CheckResult("state structure stable", False, "changed"),
    ]
    assert conformance.format_table(rows).splitlines()[-2:] == [
        "state structure stable  FAIL    changed",
        "1/2 checks passed",
    ]


@pytest.mark.parametrize(
    "text, message",
    [
        (
            "import optax\ndef make(learning_rate):\n    return optax.sgd(learning_rate) + undefined_name\n",
            r"bad.py:make \(line 3\): calling it raised NameError: name 'undefined_name' is not defined; fix the code",
        ),
        (
            "import optax\n\nraise ImportError('no such thing')\n",
            r"bad.py \(line 3\): importing it raised ImportError: no such thing",
        ),
        (
            "def make(learning_rate):\n    return learning_rate\n",
            r"bad.py:make: it returned float, not an optax.GradientTransformation",
        ),
        ("def build(learning_rate):\n    pass\n", r"bad.py: no function 'make' in it; it defines \['build'\]"),
        (
            "def make(rate):\n    pass\n",
            r"bad.py:make: missing a required argument: 'rate'; it accepts: learning_rate, rate",
        ),
    ],
)
def test_mistakes_in_my_file_name_the_file(tmp_path, text, message):
    path = write(tmp_path, "bad.py", text)
    with pytest.raises(ConfigError, match=message):
        make_optimizer({"name": f"{path}:make", "learning_rate": 0.1})


def test_missing_file_and_updates_that_do_not_match_the_params(tmp_path):
    with pytest.raises(ConfigError, match="optimizer file 'nowhere.py' does not exist"):
        make_optimizer({"name": "nowhere.py:make", "learning_rate": 0.1})
    path = write(
        tmp_path,
        "dropping.py",
        MY_OPTIMIZER.replace(
            "return jax.tree.map(lambda v: (-learning_rate * v).astype(v.dtype), velocity)",
            "return jax.tree.leaves(velocity)",
        ),
    )
    tx = make_optimizer({"name": f"{path}:make", "learning_rate": 0.1})
    with pytest.raises(ConfigError, match=f"{path}:make: update returned updates that do not match the params"):
        from research.optim.registry import check_against_params

        check_against_params(tx, {"w": jnp.zeros((2, 2))}, f"{path}:make")


def test_a_package_module_factory_and_extra_args(tmp_path, monkeypatch):
    """`package.module:make` imports from sys.path; an ExtraArgs optimizer receives the step's loss value."""
    package = tmp_path / "my_optimizers"
    package.mkdir()
    write(package, "__init__.py", "")
    write(
        package,
        "recording.py",
        '''
        from typing import NamedTuple
        import jax.numpy as jnp
        import optax

        class RecordingState(NamedTuple):
            last_value: jnp.ndarray

        def make(learning_rate):
            """SGD that keeps the loss value the trainer passes as an extra argument."""
            sgd = optax.sgd(learning_rate)
            def init(params):
                return RecordingState(jnp.zeros((), jnp.float32)), sgd.init(params)
            def update(grads, state, params=None, *, value=None, **extra):
                updates, inner = sgd.update(grads, state[1], params)
                return updates, (RecordingState(jnp.asarray(value, jnp.float32)), inner)
            return optax.GradientTransformationExtraArgs(init, update)
        ''',
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    config = linear_regression.get_config("smoke")
    config.optimizer.name = "my_optimizers.recording:make"
    setup = build(config, linear_regression, sharding.make_mesh({"data": 1}, jax.devices()[:1]))
    batch = sharding.put_batch(next(iter(linear_regression.make_data(config, "train"))), setup.mesh)
    state, metrics = setup.train_step(setup.init_state(jax.random.PRNGKey(0)), batch)
    recorded = jax.tree.leaves(state.opt_state, is_leaf=lambda x: type(x).__name__ == "RecordingState")
    recorded = [leaf for leaf in recorded if type(leaf).__name__ == "RecordingState"][0]
    assert float(recorded.last_value) == pytest.approx(float(metrics["loss"]), rel=1e-6)


@pytest.mark.parametrize(
    "override, message",
    [
        (
            "--config.optimizer.schedule.warmup=5",
            "error: unknown config key 'optimizer.schedule.warmup'; did you mean 'optimizer.schedule.warmup_steps'?",
        ),
        (
            "--config.optimizer.kwargs.beta=0.9",
            "error: optimizer 'sgd': got an unexpected keyword argument 'beta'; "
            "it accepts: learning_rate, momentum, nesterov",
        ),
    ],
)
def test_optimizer_kwargs_are_open_but_other_sections_are_not(tmp_path, override, message):
    result = launch("--config", "experiments/linear_regression.py:smoke", "--workdir", str(tmp_path), override)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith(message)


def test_a_broken_file_stops_launch_in_one_line(tmp_path):
    path = write(
        tmp_path, "broken.py", "import optax\n\ndef make(learning_rate):\n    return optax.sgd(learning_rate\n"
    )
    result = launch(
        "--config",
        "experiments/linear_regression.py:smoke",
        "--workdir",
        str(tmp_path / "run"),
        f"--config.optimizer.name={path}:make",
    )
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert (
        result.stderr.strip()
        .splitlines()[-1]
        .startswith(f"error: optimizer file {path} (line 4): importing it raised SyntaxError:")
    )


@pytest.mark.slow
def test_my_optimizer_resumes_bitwise_from_a_checkpoint(tmp_path, data_dir):
    path = write(tmp_path, "my_opt.py", MY_OPTIMIZER)
    config = digits_mlp.get_config("smoke")
    config.update_from_flattened_dict(
        {
            "data_dir": data_dir,
            "num_steps": 10,
            "eval_every": 0,
            "checkpoint.every_steps": 0,
            "optimizer.name": f"{path}:make",
            "optimizer.learning_rate": 0.05,
        }
    )
    train.train_and_evaluate(config, digits_mlp, tmp_path / "straight")
    train.train_and_evaluate(config, digits_mlp, tmp_path / "resumed", stop_at_step=4)
    train.train_and_evaluate(config, digits_mlp, tmp_path / "resumed")
    states = [restored_state(tmp_path / name, 10) for name in ("straight", "resumed")]
    assert_trees_close(states[1], states[0], atol=0.0)
