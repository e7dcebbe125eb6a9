"""This run's orbax checkpoints (train state, data iterator, config): saved asynchronously by the config's
policy, restored to resume (research/trained_run.py reads another, trained run's).

Layout: `WORKDIR/checkpoints/<step>/{state,data,config}`. Orbax writes each step into a
temporary directory and renames it when complete, so a crash mid-save never leaves a step
that `latest_step()` would pick. A step that still fails to restore is moved, untouched,
to `WORKDIR/checkpoints_unreadable/` and the previous one is used. A second, local tier is
research/resilience/tiers.py.
"""

import json
import shutil
import time
from pathlib import Path
from typing import Any

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from orbax.checkpoint import checkpoint_managers as policies

from research.errors import ConfigError
from research.resilience.tiers import PER_HOST_KEYS, Tiers, tiers_of

PyTree = Any
CHECKPOINT_DIR = "checkpoints"
UNREADABLE_DIR = "checkpoints_unreadable"

# Orbax splits the writing of a replicated array over its replicas; each replica's slice is one eager
# slicing program, compiled per shape and offset. Below 1 MiB a slice is not worth a compilation: one
# replica writes the whole array (large arrays are still split). Orbax's default handler otherwise.
MIN_REPLICA_SLICE_BYTES = 1 << 20


def _item_handlers() -> dict[str, ocp.CheckpointHandler]:
    """A run manager's handlers: the state's with our array handler in a registry of its own (orbax's global
    registry stays as it is), JSON for the config and the data iterator's position."""
    from orbax.checkpoint._src.metadata import array_metadata_store  # the store orbax's own ArrayHandler gets

    arrays = ocp.type_handlers.ArrayHandler(
        min_slice_bytes_for_replica_parallel=MIN_REPLICA_SLICE_BYTES, array_metadata_store=array_metadata_store.Store()
    )
    registry = ocp.type_handlers.create_type_handler_registry((jax.Array, arrays))
    json_handler = ocp.JsonCheckpointHandler
    return {
        "state": ocp.PyTreeCheckpointHandler(type_handler_registry=registry),
        "config": json_handler(),
        "data": json_handler(),
    }


def _ranking(checkpoint_config: ml_collections.ConfigDict) -> dict[str, Any]:
    """Orbax's best-checkpoint options: with them it writes each save's metrics to disk and ranks by them."""
    metric = checkpoint_config.best_metric
    return {"best_fn": lambda metrics: metrics[metric], "best_mode": checkpoint_config.best_mode} if metric else {}


def make_manager(workdir: str | Path, checkpoint_config: ml_collections.ConfigDict):
    """The run's checkpoint manager: the persistent tier's alone, or both tiers (`Tiers`) when
    `checkpoint.local_dir` is set."""
    persistent = tier_manager(workdir, checkpoint_config)
    if not checkpoint_config.local_dir:
        return persistent
    local = ml_collections.ConfigDict(checkpoint_config.to_dict())
    local.update(every_steps=checkpoint_config.local_every_steps, every_minutes=0.0, keep=checkpoint_config.local_keep)
    local.update(best_metric="")
    return Tiers(tier_manager(checkpoint_config.local_dir, local), persistent)


def tier_manager(workdir: str | Path, checkpoint_config: ml_collections.ConfigDict) -> ocp.CheckpointManager:
    """A manager that saves every N steps and/or T minutes and keeps the last K plus the best."""
    save_policies = []
    if checkpoint_config.every_steps:
        save_policies.append(policies.FixedIntervalPolicy(checkpoint_config.every_steps))
    if checkpoint_config.every_minutes:
        seconds = int(checkpoint_config.every_minutes * 60)
        save_policies.append(policies.ContinuousCheckpointingPolicy(minimum_interval_secs=seconds))
    keep = [policies.LatestN(checkpoint_config.keep)]
    if checkpoint_config.best_metric:
        keep.append(
            policies.BestN(
                get_metric_fn=lambda metrics: metrics[checkpoint_config.best_metric],
                reverse=checkpoint_config.best_mode == "min",
                n=1,
                keep_checkpoints_without_metrics=False,
            )
        )
    options = ocp.CheckpointManagerOptions(
        save_decision_policy=policies.AnySavePolicy(save_policies),  # none: only forced saves
        preservation_policy=policies.AnyPreservationPolicy(keep),
        enable_async_checkpointing=checkpoint_config.asynchronous,
        **_ranking(checkpoint_config),  # without best_fn orbax keeps the metrics in memory only
    )
    directory = Path(workdir).absolute() / CHECKPOINT_DIR
    return ocp.CheckpointManager(directory, options=options, item_handlers=_item_handlers())


def save(
    manager: ocp.CheckpointManager, step: int, state: PyTree, iterator, config, *, metrics=None, force=False
) -> bool:
    """Saves if the policy (or `force`) says so; returns whether a save started."""
    items = {"state": ocp.args.PyTreeSave(state), "config": ocp.args.JsonSave(config_dict(config))}
    if hasattr(iterator, "get_state"):
        # One JSON state for all processes: research.data pipelines number global batches, so
        # the state is the same on every process and restores on any number of them.
        items["data"] = ocp.args.JsonSave(iterator.get_state())
    return manager.save(step, args=ocp.args.Composite(**items), metrics=metrics, force=force)


def config_dict(config: ml_collections.ConfigDict) -> dict:
    return json.loads(config.to_json_best_effort())


def restore(manager: ocp.CheckpointManager, step: int, abstract_state: PyTree, iterator) -> tuple[PyTree, dict]:
    """Restores (state, saved config) at `step` into `abstract_state`'s shapes and shardings (any
    topology), and moves the iterator (when it has a position) to where it was."""
    restore_args = ocp.checkpoint_utils.construct_restore_args(abstract_state)
    items = {
        "state": ocp.args.PyTreeRestore(abstract_state, restore_args=restore_args),
        "config": ocp.args.JsonRestore(),
    }
    has_data = hasattr(iterator, "set_state") and (Path(manager.directory) / str(step) / "data").exists()
    if has_data:
        items["data"] = ocp.args.JsonRestore()
    restored = manager.restore(step, args=ocp.args.Composite(**items))
    if has_data:
        iterator.set_state(restored["data"])
    return restored["state"], restored["config"]


def set_aside(manager: ocp.CheckpointManager, step: int, target: Path | None = None) -> Path:
    """Moves a step out of the manager's sight, keeping it as evidence: to `target` (replacing what is there),
    by default WORKDIR/checkpoints_unreadable/STEP-TIME."""
    source = Path(manager.directory) / str(step)
    target = target or Path(manager.directory).parent / UNREADABLE_DIR / f"{step}-{time.strftime('%Y%m%d-%H%M%S')}"
    target.parent.mkdir(parents=True, exist_ok=True)
    if target.exists():
        shutil.rmtree(target)
    shutil.move(source, target)
    manager.reload()
    return target


def config_differences(saved: dict, current: dict, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two config dicts."""
    differences = []
    for key in sorted(set(saved) | set(current)):
        old, new = saved.get(key), current.get(key)
        if isinstance(old, dict) and isinstance(new, dict):
            differences.extend(config_differences(old, new, f"{prefix}{key}."))
        elif old != new:
            differences.append(f"{prefix}{key}: {old!r} -> {new!r}")
    return differences


def restore_latest(manager, abstract_state, iterator, config, *, allow_config_change: bool) -> tuple[int, PyTree]:
    """The newest readable checkpoint as (step, state), the iterator moved to match; (0, None) if none.

    An unreadable step is set aside (never deleted) and the previous one tried. A config that
    differs from the saved one is an error unless `allow_config_change`.
    """
    candidates = [(step, tier) for tier in tiers_of(manager) for step in tier.all_steps()]
    for step, tier in sorted(candidates, key=lambda candidate: candidate[0], reverse=True):  # stable: local first
        try:
            state, saved_config = restore(tier, step, abstract_state, iterator)
        except Exception as error:  # any unreadable file: keep it aside and try the previous step
            moved_to = set_aside(tier, step)
            print(
                f"checkpoint at step {step} in {tier.directory} is unreadable ({type(error).__name__}: "
                f"{str(error)[:200]}); moved to {moved_to}, trying the next newest"
            )
            continue
        if tier is not tiers_of(manager)[-1]:
            print(f"restoring step {step} from the local tier {tier.directory}")
        differences = [
            difference
            for difference in config_differences(saved_config, config_dict(config))
            if not difference.startswith(PER_HOST_KEYS)
        ]
        if differences and not allow_config_change:
            raise ConfigError(
                f"the config differs from the checkpoint's at step {step}: {'; '.join(differences)} "
                "(pass --allow_config_change to resume anyway, or use a new --workdir)"
            )
        if differences:
            print(f"resuming with a changed config: {'; '.join(differences)}")
        return step, state
    return 0, None


def complete_steps(directory: str | Path) -> list[int]:
    """The steps in a checkpoint directory whose writing finished (orbax renames a step's temporary
    directory to the bare step number when it is complete)."""
    directory = Path(directory)
    return sorted(int(path.name) for path in directory.iterdir() if path.name.isdigit()) if directory.is_dir() else []


def newest_complete(manager) -> str:
    """'the newest complete checkpoint is step N in DIRECTORY' over the manager's tiers (or that there is none)."""
    found = [(step, tier.directory) for tier in tiers_of(manager) for step in complete_steps(tier.directory)]
    if not found:
        return "no checkpoint was completed"
    step, directory = max(found, key=lambda candidate: candidate[0])
    return f"the newest complete checkpoint is step {step} in {directory}"


def all_finite(tree: PyTree) -> bool:
    return all(
        bool(np.all(np.isfinite(leaf)))
        for leaf in jax.tree.leaves(jax.device_get(tree))
        if np.issubdtype(np.asarray(leaf).dtype, np.floating)
    )


def choose_step(directory: str | Path, which: str, checkpoint_config: ml_collections.ConfigDict) -> int:
    """The saved step that `which` names: "latest", "best" (orbax's ranking by the run's
    `checkpoint.best_metric` and `.best_mode`) or a step number."""
    directory = Path(directory).absolute()
    best_metric = checkpoint_config.best_metric
    verbosity = logging.get_verbosity()
    logging.set_verbosity(logging.ERROR)  # orbax warns that a read-only checkpoint directory is read-only
    try:
        options = ocp.CheckpointManagerOptions(read_only=True, **_ranking(checkpoint_config))
        manager = ocp.CheckpointManager(directory, options=options)
    finally:
        logging.set_verbosity(verbosity)
    with manager:
        steps = sorted(manager.all_steps())
        if not steps:
            raise ConfigError(f"no checkpoints in {directory}")
        if which == "latest":
            return steps[-1]
        if which == "best":
            if not best_metric:
                raise ConfigError(
                    "--checkpoint best needs a run trained with checkpoint.best_metric set (this one was not): "
                    f"use latest or one of the steps {steps}"
                )
            best = manager.best_step()
            if best is None:  # only step-interval saves, which carry no metrics
                raise ConfigError(
                    f"no checkpoint in {directory} was saved with {best_metric}: use latest or one of the steps {steps}"
                )
            return best
        if not which.isdigit() or int(which) not in steps:
            raise ConfigError(f"no checkpoint {which!r} in {directory}: use latest, best or one of the steps {steps}")
        return int(which)
