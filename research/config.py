"""The keys every experiment's config has: the trainer's settings and their defaults, in one place.

An experiment's `get_config` starts from `trainer_config()`, adds its own `data` and `model`
sections, overrides what it needs and returns the result; launch.py locks it so that a
mistyped override is an error.
"""

from typing import Iterable

import ml_collections

from research.errors import ConfigError

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
    (r"(^|/)layers/", ("stage",)),  # a scanned stack's norms and biases: L x ..., over the pipeline's stages
    (r".*", ()),  # biases, norms and anything else: replicated
)


def trainer_config() -> ml_collections.ConfigDict:
    """Trainer defaults; every key here is read by research/train.py."""
    config = ml_collections.ConfigDict()
    config.seed = 0  # parameter init, dropout and data order all derive from it
    config.num_steps = 1000
    config.batch_size = 64  # global: split over processes and the mesh's batch axes
    config.eval_batch_size = 256
    config.log_every = 50
    config.eval_every = 500  # 0: only the final evaluation
    config.data_dir = ""  # tfds data directory; empty means tfds's default (~/tensorflow_datasets)
    # Mesh axes in order; -1 takes every device left over. Batches split over data and fsdp (and expert).
    config.mesh = ml_collections.ConfigDict({"data": -1, "fsdp": 1, "tensor": 1})
    config.param_rules = DEFAULT_PARAM_RULES  # see research/sharding.py
    config.optimizer = optimizer_config()
    # Stop when eval/<metric> has not improved for `patience` evaluations; metric "" never stops.
    config.early_stopping = ml_collections.ConfigDict({"metric": "", "mode": "min", "patience": 3})
    config.freeze = ""  # regex over parameter paths ("encoder/.*"): matching parameters are not trained
    # On a NaN/inf loss or gradient: "stop" the run, "skip" the update, or "rollback" to an earlier
    # checkpoint and skip the data that led there (research/resilience/rollback.py).
    config.nonfinite = "stop"
    config.nonfinite_max_skips = 100  # "skip" gives up after this many consecutive bad steps
    config.rollback = ml_collections.ConfigDict(
        {
            "attempts": 3,  # rollbacks before the run stops
            # The data goes on from where the bad stretch was found (every batch read since the restored
            # step is skipped) and skips this many more.
            "skip_batches": 0,
            # A loss spike is `spike_steps` consecutive losses above spike_factor x the median of the
            # `spike_window` losses before; it stops the run ("stop") or rolls it back. 0: no spike rule.
            "spike_factor": 0.0,
            "spike_window": 100,
            "spike_steps": 1,
        }
    )
    # Magnitude pruning (research/optim/pruning.py): kernels to `sparsity` zeros on a cubic schedule from
    # start_step to end_step (0: three quarters of num_steps), masks recomputed every `every` steps, then kept.
    config.pruning = ml_collections.ConfigDict(
        {"sparsity": 0.0, "scope": "global", "start_step": 0, "end_step": 0, "every": 50, "include": r"kernel$"}
    )
    # Knowledge distillation (research/features/distill.py) from the run in `teacher` (its workdir; step 0: its latest):
    # loss = loss_weight x the experiment's loss + kl_weight x T^2 x KL(teacher || student) at temperature T.
    config.distill = ml_collections.ConfigDict(
        {"teacher": "", "step": 0, "temperature": 2.0, "kl_weight": 0.5, "loss_weight": 0.5}
    )
    # Preference optimisation (research/features/preference.py: DPO) on the pairs in `pairs`, a directory of
    # dpo_train.jsonl and dpo_test.jsonl: beta, the reference run ("": init_from's), + sft_weight x the chosen NLL.
    config.preference = ml_collections.ConfigDict(
        {"pairs": "", "beta": 0.1, "reference": "", "sft_weight": 0.0, "chat_template": "chatml"}
    )
    # Low-rank adapters (research/features/lora.py) of rank `rank` (0: off) on the dense layers whose module path
    # matches `targets`, scaled by alpha / rank, their input dropped at `dropout`; the rest of the model frozen but
    # the parameters `also_train` names (a regex over their paths, "": none), trained in full.
    config.lora = ml_collections.ConfigDict(
        {"rank": 0, "alpha": 16.0, "dropout": 0.0, "targets": r"(q|k|v|o|gate|up|down)_proj$", "also_train": ""}
    )
    # Start from another run's parameters (a pre-trained encoder, say): those whose path matches
    # `include` and not `exclude`; the rest keep their random init. step 0 means its latest.
    config.init_from = ml_collections.ConfigDict({"workdir": "", "step": 0, "include": ".*", "exclude": ""})
    # Downstream tasks of the lm-evaluation-harness on the training state (research/tools/evaluate/training.py):
    # `tasks` (harness task names, comma-separated; "" off) every `every` steps (0: at each evaluation) and at the end,
    # logged as eval/TASK/METRIC; local task YAMLs in `include_path`; `limit` examples per task (0: all);
    # `num_fewshot` (-1: each task's own).
    config.evals = ml_collections.ConfigDict(
        {"tasks": "", "every": 0, "include_path": "", "limit": 0, "num_fewshot": -1, "batch_size": 16}
    )
    # Weights & Biases beside metrics.jsonl and TensorBoard (research/logger.py): the config, every metric and the
    # final results in project `wandb_project` (entity: the login's default when ""), run name the workdir's;
    # `wandb_mode` "online", or "offline" (written to WORKDIR/wandb, `wandb sync` uploads it later).
    config.logging = ml_collections.ConfigDict(
        {"wandb": False, "wandb_project": "research", "wandb_entity": "", "wandb_mode": "online", "wandb_tags": ""}
    )
    # Throughput and MFU are logged as perf/...; MFU is against this many TFLOP/s per device, or,
    # when 0, a float32 matmul timed at the start of training (research/perf.py).
    config.peak_tflops = 0.0
    # "FIRST,LAST": a jax.profiler trace of those steps in WORKDIR/profile (TensorBoard's profile
    # plugin, or Perfetto); "" is off.
    config.profile_steps = ""
    config.checkpoint = ml_collections.ConfigDict(
        {
            "every_steps": 500,  # 0: no step-based saves
            "every_minutes": 0.0,  # 0: no time-based saves
            "keep": 2,  # the newest K checkpoints are kept...
            "best_metric": "",  # ...plus the best by this eval metric, e.g. "eval/accuracy" (saved at each eval)
            "best_mode": "max",
            "asynchronous": True,  # write in the background while training continues
            # A second, fast tier (node-local disk): saved every local_every_steps, the last local_keep kept;
            # resume takes the newest complete step of either tier. "" is off.
            "local_dir": "",
            "local_every_steps": 100,
            "local_keep": 2,
        }
    )
    return config


# nanoGPT's optimizer (github.com/karpathy/nanoGPT, train.py): AdamW with decoupled weight decay 0.1, lr 1e-3
# after a 100-step warm-up, cosine to lr/10, gradients clipped at norm 1.0 (beta2 0.99 goes in optimizer.kwargs).
NANOGPT_OPTIMIZER = {
    "optimizer.name": "adam",
    "optimizer.learning_rate": 1e-3,
    "optimizer.weight_decay": 0.1,
    "optimizer.clip_global_norm": 1.0,
    "optimizer.schedule.name": "warmup_cosine",
    "optimizer.schedule.warmup_steps": 100,
    "optimizer.schedule.final_fraction": 0.1,
}


# Sections whose keys are open: `--config.optimizer.kwargs.b1=0.95` may add a key the file did not
# declare, because each optimizer has its own arguments; make_optimizer checks them by signature.
OPEN_SECTIONS = ("optimizer.kwargs",)


def optimizer_config() -> ml_collections.ConfigDict:
    """Optimizer, schedule and regularization defaults (read by research/optim/registry.py)."""
    return ml_collections.ConfigDict(
        {
            "name": "adam",  # a key of research.optim.OPTIMIZERS, or path/to/file.py:make, or package.module:make
            "learning_rate": 1e-3,  # the peak: the schedule multiplies it
            "kwargs": ml_collections.ConfigDict(),  # the factory's other keyword arguments
            # Float kwargs become arrays in the optimizer state (sweepable without recompiling); these
            # comma-separated names stay Python values instead, for code that branches on them.
            "static_kwargs": "",
            "schedule": ml_collections.ConfigDict(
                {
                    "name": "constant",  # a key of research.optim.schedules.SCHEDULES
                    "warmup_steps": 0,
                    "decay_steps": 0,  # 0: until the end of the run
                    "final_fraction": 0.0,  # the last learning rate, as a fraction of the peak
                    "step_every": 1000,  # step decay: multiply by step_factor every step_every steps
                    "step_factor": 0.1,
                    "decay_fraction": 0.2,  # warmup-stable-decay: the share of the run spent decaying
                    # piecewise: from step boundaries[i] on, the rate is multiplied by factors[i] (cumulative)
                    "boundaries": (),
                    "factors": (),
                }
            ),
            "clip_global_norm": 0.0,  # 0: no clipping
            "weight_decay": 0.0,  # decoupled (Loshchilov & Hutter, 2019): p -= lr_t * weight_decay * p
            "l2_penalty": 0.0,  # adds l2_penalty / 2 * sum(p^2) to the training loss
            "l1_penalty": 0.0,  # adds l1_penalty * sum(|p|) to the training loss
            # Parameters whose path ("Dense_0/bias") matches are spared by the penalties and weight_decay.
            "decay_exclude": r"(^|/)(bias|scale)$",
            "accumulate_steps": 1,  # k: each step averages gradients over k micro-batches of batch_size / k
            "ema_decay": 0.0,  # >0: evaluate an exponential moving average of the parameters
            # The optimizer's precision (research/optim/precision.py): "" its moments follow the parameters' dtype,
            # "float32" keeps them in float32 for bfloat16 parameters; master_weights keeps a float32 copy of the
            # parameters that the updates accumulate into.
            "moment_dtype": "",
            "master_weights": False,
        }
    )


def keep_optimizer_settings_apart(
    experiment_config: ml_collections.ConfigDict, config: ml_collections.ConfigDict, overrides: Iterable[str]
) -> None:
    """When `overrides` (the command line's keys) name another optimizer than the experiment's own, the experiment's
    arguments for its own (optimizer.kwargs, .static_kwargs) stay behind: the other optimizer starts from its own
    defaults plus the arguments the overrides give it, so that trying one on any experiment takes only its name.
    The generic settings (learning rate, schedule, clipping, weight decay, EMA) carry over."""
    if config.optimizer.name == experiment_config.optimizer.name:
        return
    given = {key.removeprefix("optimizer.kwargs.") for key in overrides if key.startswith("optimizer.kwargs.")}
    kept = {key: value for key, value in config.optimizer.kwargs.items() if key in given}
    config.optimizer.kwargs = ml_collections.ConfigDict(kept)
    if "optimizer.static_kwargs" not in overrides:
        config.optimizer.static_kwargs = ""


# Trainer counts and the least each may be: a value below is a one-line error before any work.
MINIMUM = {
    "batch_size": 1,
    "eval_batch_size": 1,
    "num_steps": 0,
    "log_every": 1,
    "eval_every": 0,
    "rollback.attempts": 0,
    "rollback.skip_batches": 0,
    "rollback.spike_factor": 0.0,
    "rollback.spike_window": 1,
    "rollback.spike_steps": 1,
}


def check_trainer(config: ml_collections.ConfigDict) -> None:
    """One-line errors for trainer counts out of range (a batch of 0 or -4 examples, say)."""
    flat = config.to_dict()
    for key, least in MINIMUM.items():
        section, _, name = key.rpartition(".")
        value = (flat.get(section) or {}).get(name) if section else flat.get(name)
        if isinstance(value, (int, float)) and value < least:
            raise ConfigError(f"{key} is {value}: it must be >= {least}")


def choose(arg: str | None, variants: dict[str | None, dict]) -> dict:
    """The overrides named by a config's `:arg`; an unknown arg is a one-line error listing the valid ones."""
    if arg not in variants:
        valid = ", ".join(repr(name) for name in variants if name is not None)
        raise ConfigError(f"unknown config variant {arg!r}: use no ':arg' or one of {valid}")
    return variants[arg]
