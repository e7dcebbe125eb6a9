"""Another run's checkpoints, read by this one: which step (`saved_step`), the saved tree by the checkpoint's own
metadata (`read_saved`), its parameters (`load_params`), a fresh train state starting from them (`init_from`), and
its weights for inference or as a distillation teacher (`weights`).

`weights` restores the train state the run's Setup describes and takes the parameters its optimizer evaluates with
(an EMA or schedule-free average when it keeps one). A run saved by an older version of its optimizer, whose state
has another layout, still gives its raw parameters and model state, with a note on stderr that no average is
applied (predict.py on runs/reproduce/lm_cpu, a teacher of that age).
"""

import re
import sys
from pathlib import Path

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from absl import logging

from research import checkpoint
from research.checkpoint import CHECKPOINT_DIR, complete_steps
from research.errors import ConfigError
from research.optim.regularizers import eval_params
from research.state import TrainState
from research.tree import PyTree, named_leaves, path_name

SHOWN = 8  # names of arrays left at their init that init_from's line lists (LoRA's adapters are many)


def weights(directory: Path, step: int, abstract_state: TrainState, optimizer: str) -> TrainState:
    """The train state saved at `step` in the shardings of `abstract_state`, its params the ones to evaluate with;
    when the saved optimizer state has another structure, the raw parameters and model state (optimizer state
    zeros, `optimizer` named in the note)."""
    verbosity = logging.get_verbosity()
    logging.set_verbosity(logging.ERROR)  # orbax warns that a read-only checkpoint directory is read-only
    try:
        with ocp.CheckpointManager(directory, options=ocp.CheckpointManagerOptions(read_only=True)) as manager:
            state, _ = checkpoint.restore(manager, step, with_saved_extras(directory, step, abstract_state), None)
        model_state = {name: state.model_state[name] for name in abstract_state.model_state}
        return state.replace(params=eval_params(state.params, state.opt_state), model_state=model_state)
    except ValueError as error:  # another structure: saved by an older version of the optimizer
        if "do not match" not in str(error):
            raise
    finally:
        logging.set_verbosity(verbosity)
    saved = read_saved(directory, step)
    if jax.tree.structure(saved["params"]) != jax.tree.structure(abstract_state.params):
        raise ConfigError(f"the parameters saved at step {step} in {directory} do not fit the experiment's model")
    print(
        f"note: step {step} in {directory} has another optimizer-state layout than this version's {optimizer} "
        "(saved by an older version?): using its raw parameters, without any average the optimizer kept",
        file=sys.stderr,
    )

    def place(leaf, like):
        return jax.device_put(np.asarray(leaf, like.dtype), like.sharding)

    params, model_state = (
        jax.tree.map(place, saved.get(key, {}), getattr(abstract_state, key)) for key in ("params", "model_state")
    )
    zeros = jax.tree.map(lambda like: place(np.zeros(like.shape), like), abstract_state.opt_state)
    return TrainState(saved["step"], params, model_state, zeros, saved["rng"])


def with_saved_extras(directory: Path, step: int, abstract_state: TrainState) -> TrainState:
    """`abstract_state` with the model-state collections saved at `step` that it lacks (what a feature kept beside
    the model, such as a distilled run's copy of its teacher), on this process's first device, to be read and
    dropped."""
    saved = read_saved(directory, step, shapes_only=True).get("model_state") or {}
    extras = {name: value for name, value in saved.items() if name not in abstract_state.model_state}
    return abstract_state.replace(model_state=abstract_state.model_state | extras) if extras else abstract_state


def saved_step(workdir: str | Path, step: int, setting: str) -> tuple[Path, int]:
    """(checkpoint directory, step) of another run's checkpoint `step`, its latest when 0; errors name `setting`."""
    directory = Path(workdir).absolute() / CHECKPOINT_DIR
    steps = complete_steps(directory) if directory.is_dir() else []
    if not steps:
        raise ConfigError(f"{setting}: no checkpoints in {directory}: train that run first or fix {setting}")
    if (step or steps[-1]) not in steps:
        raise ConfigError(f"{setting}: no step {step} in {directory}; it has {steps}")
    return directory, step or steps[-1]


def load_params(workdir: str | Path, step: int = 0) -> tuple[PyTree, int]:
    """The parameters saved by another run (its latest step when `step` is 0), as host arrays (`read_saved`)."""
    directory, step = saved_step(workdir, step, "init_from")
    return read_saved(directory, step)["params"], step


def read_saved(directory: Path, step: int, shapes_only: bool = False) -> PyTree:
    """The train state saved at `step` as nested dicts of host arrays (`shapes_only`: of ShapeDtypeStructs on this
    process's first device), by the checkpoint's own metadata, whatever devices, processes and code wrote it."""
    path, checkpointer = Path(directory) / str(step) / "state", ocp.StandardCheckpointer()
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    verbosity = logging.get_verbosity()
    logging.set_verbosity(logging.ERROR)  # orbax warns of the step's metadata file, which the manager keeps above it
    try:
        saved = checkpointer.metadata(path).item_metadata.tree
        shapes = jax.tree.map(lambda leaf: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=device), saved)
        return shapes if shapes_only else jax.device_get(checkpointer.restore(path, shapes))
    finally:
        logging.set_verbosity(verbosity)


def init_from(state: PyTree, shardings: PyTree, tx, init_from_config: ml_collections.ConfigDict) -> tuple[PyTree, str]:
    """(a fresh train state with the parameters that `init_from.include` selects (and `.exclude` does not) copied
    from another run's checkpoint, the optimizer state made anew for them; a line saying what was loaded)."""
    source, step = load_params(init_from_config.workdir, init_from_config.step)
    source = named_leaves(source)
    include = re.compile(init_from_config.include)
    exclude = re.compile(init_from_config.exclude) if init_from_config.exclude else None
    loaded, kept, mismatched = [], [], []

    def take(path, target, where):
        name = path_name(path)
        if name not in source or not include.search(name) or (exclude and exclude.search(name)):
            kept.append(name)
            return target
        if source[name].shape != target.shape:
            mismatched.append(f"{name} {tuple(source[name].shape)} vs {tuple(target.shape)}")
            return target
        loaded.append(name)
        return jax.device_put(np.asarray(source[name], target.dtype), where)

    params = jax.tree_util.tree_map_with_path(take, state.params, shardings.params)
    if mismatched:
        raise ConfigError(f"init_from: shapes differ for {', '.join(mismatched)}")
    shown = ", ".join(kept[:SHOWN]) + (f" and {len(kept) - SHOWN} more" if len(kept) > SHOWN else "")
    said = f"init_from {init_from_config.workdir} step {step}: loaded {len(loaded)} arrays; left at random init: "
    opt_state = jax.jit(tx.init, out_shardings=shardings.opt_state)(params)
    return state.replace(params=params, opt_state=opt_state), said + (shown or "none")
