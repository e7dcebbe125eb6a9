"""The keys every experiment's config has: the trainer's settings and their defaults, in one place.

An experiment's `get_config` starts from `trainer_config()`, adds its own `data` and `model`
sections, overrides what it needs and returns the result; launch.py locks it so that a
mistyped override is an error.
"""

import ml_collections


class ConfigError(ValueError):
    """A bad config, experiment or workdir: launch.py reports it in one line, without a traceback."""


# (regex over the parameter path, mesh axis per dimension): first match wins. Transformer
# weights are split Megatron-style over `tensor` and along their input width over `fsdp`; other
# weights along their first dimension (convolutions: their output channels) over `fsdp`.
DEFAULT_PARAM_RULES = (
    (r"attention/(query|key|value)/kernel$", ("fsdp", "tensor", None)),  # D x H x Dh: heads split
    (r"attention/(query|key|value)/bias$", ("tensor", None)),
    (r"attention/out/kernel$", ("tensor", None, "fsdp")),  # H x Dh x D
    (r"fc_in/kernel$", ("fsdp", "tensor")),  # D x F: column-parallel
    (r"fc_in/bias$", ("tensor",)),
    (r"fc_out/kernel$", ("tensor", "fsdp")),  # F x D: row-parallel
    (r"embedding$", (None, "fsdp")),  # V x D: vocabularies rarely divide, widths do
    (r"conv[^/]*/kernel$", (None, None, None, "fsdp")),  # H x W x Cin x Cout
    (r"kernel$", ("fsdp",)),
    (r".*", ()),  # biases, norms and anything else: replicated
)


def trainer_config() -> ml_collections.ConfigDict:
    """Trainer defaults; every key here is read by research/train.py."""
    config = ml_collections.ConfigDict()
    config.seed = 0  # parameter init, dropout and data order all derive from it
    config.num_steps = 1000
    config.batch_size = 64  # global: split over processes and the mesh's data/fsdp axes
    config.eval_batch_size = 256
    config.log_every = 50
    config.eval_every = 500  # 0: only the final evaluation
    config.data_dir = ""  # tfds data directory; empty means tfds's default (~/tensorflow_datasets)
    # Mesh axes in order; -1 takes every device left over. Batches split over data and fsdp.
    config.mesh = ml_collections.ConfigDict({"data": -1, "fsdp": 1, "tensor": 1})
    config.param_rules = DEFAULT_PARAM_RULES  # see research/sharding.py
    config.optimizer = ml_collections.ConfigDict({"name": "adam", "learning_rate": 1e-3})
    config.freeze = ""  # regex over parameter paths ("encoder/.*"): matching parameters are not trained
    config.nonfinite = "stop"  # on a NaN/inf loss or gradient: "stop" the run, or "skip" the update
    config.nonfinite_max_skips = 100  # "skip" gives up after this many consecutive bad steps
    # Start from another run's parameters (a pre-trained encoder, say): those whose path matches
    # `include` and not `exclude`; the rest keep their random init. step 0 means its latest.
    config.init_from = ml_collections.ConfigDict({"workdir": "", "step": 0, "include": ".*", "exclude": ""})
    config.checkpoint = ml_collections.ConfigDict({
        "every_steps": 500,  # 0: no step-based saves
        "every_minutes": 0.0,  # 0: no time-based saves
        "keep": 2,  # the newest K checkpoints are kept...
        "best_metric": "",  # ...plus the best by this eval metric, e.g. "eval/accuracy" (saved at each eval)
        "best_mode": "max",
        "asynchronous": True,  # write in the background while training continues
    })
    return config


def choose(arg: str | None, variants: dict[str | None, dict]) -> dict:
    """The overrides named by a config's `:arg`; an unknown arg is a one-line error listing the valid ones."""
    if arg not in variants:
        valid = ", ".join(repr(name) for name in variants if name is not None)
        raise ConfigError(f"unknown config variant {arg!r}: use no ':arg' or one of {valid}")
    return variants[arg]
