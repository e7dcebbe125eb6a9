"""Low-rank adapters (Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models") on a frozen model.

  python launch.py --config experiments/lm.py:from=runs/base --workdir runs/lora --config.lora.rank=8 \
      --config.data.prepared=data/reverse_sft --config.model.block_size=160
  python predict.py --workdir runs/lora --chat_eval data/reverse/sft_test.jsonl      # the adapters merged
  python -m research.tools.hf export runs/lora hf_adapters --adapters                 # as PEFT loads them
Measured (docs/results.md "LoRA"): rank 8 on the bundled chat task beside full SFT.

A feature that wraps the experiment when `lora.rank` > 0. Every nn.Dense whose module path (`layers/q_proj`,
`layers_3/down_proj`) matches `lora.targets` computes y = x W (+ b) + (alpha / rank) dropout(x) A B, with A
(in x rank) drawn as PEFT draws it (uniform, bound 1 / sqrt(in)) and B (rank x out) zeros, so step 0 is the model
itself. The adapters are parameters in the module they adapt (`layers/q_proj/lora_a`, `lora_b`), float32
whatever the model's param_dtype, stacked like the kernel under nn.scan and sharded like it: A takes the
kernel's input axis, B its output axis (`param_rules`). The model's own parameters are frozen: the loss sees
them through stop_gradient (no weight gradients are computed) and the optimizer (`make_tx`) updates the adapters
only, keeping no state for the rest; `lora.also_train` names parameters trained in full beside them (PEFT's
modules_to_save: the embeddings, when the chat template's tokens are new to the base model). Prediction and
export merge the adapters into the kernels (`merged`): W + (alpha / rank) A B, a plain model of the
experiment's; research/tools/hf/peft.py writes and reads them as PEFT's adapter_config.json +
adapter_model.safetensors.
"""

import re
from types import ModuleType
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import optax

from research import experiment
from research.errors import ConfigError
from research.tree import PyTree, path_name

ADAPTERS = ("lora_a", "lora_b")
# PEFT's lora_A init (torch.nn.init.kaiming_uniform_ with a = sqrt(5)): uniform with bound 1 / sqrt(fan_in)
A_INIT = nn.initializers.variance_scaling(1 / 3, "fan_in", "uniform")


def is_adapter(path: tuple) -> bool:
    return path_name(path).rsplit("/", 1)[-1] in ADAPTERS


def check_settings(settings: ml_collections.ConfigDict) -> tuple[re.Pattern, re.Pattern | None]:
    """The compiled `lora.targets` and `lora.also_train` (None when empty); a rank, alpha or dropout out of range, or
    a pattern that does not compile, is a one-line error."""
    if settings.rank < 1 or settings.alpha <= 0 or not 0 <= settings.dropout < 1:
        raise ConfigError(
            f"lora: rank {settings.rank} must be >= 1, alpha {settings.alpha} > 0, dropout {settings.dropout} in [0, 1)"
        )
    compiled = []
    for key in ("targets", "also_train"):
        try:
            compiled.append(re.compile(settings[key]) if settings[key] else None)
        except re.error as error:
            raise ConfigError(f"lora.{key} {settings[key]!r} is not a regular expression: {error}") from None
    return compiled[0], compiled[1]


def interceptor(settings: ml_collections.ConfigDict, targets: re.Pattern, adapted: set) -> Callable:
    """A flax method interceptor adding the low-rank path to each targeted nn.Dense (its path put in `adapted`)."""
    rank, scale, rate = settings.rank, settings.alpha / settings.rank, settings.dropout

    def intercept(next_fun, args, kwargs, context):
        module = context.module
        if not isinstance(module, nn.Dense) or context.method_name != "__call__":
            return next_fun(*args, **kwargs)
        name = "/".join(module.scope.path)
        if not targets.search(name):
            return next_fun(*args, **kwargs)
        adapted.add(name)
        y = next_fun(*args, **kwargs)
        x = args[0] if args else kwargs["inputs"]
        a = module.param("lora_a", A_INIT, (x.shape[-1], rank), jnp.float32)
        b = module.param("lora_b", nn.initializers.zeros_init(), (rank, module.features), jnp.float32)
        if rate and module.has_rng("dropout"):  # training: PEFT drops the adapter's input only
            keep = jax.random.bernoulli(module.make_rng("dropout"), 1 - rate, x.shape)
            x = jnp.where(keep, x / (1 - rate), 0).astype(x.dtype)
        dtype = y.dtype
        low_rank = jnp.dot(jnp.dot(x, a.astype(dtype)), b.astype(dtype)) * jnp.asarray(scale, dtype)
        return y + low_rank

    return intercept


def frozen(params: PyTree, trainable: PyTree) -> PyTree:
    """The parameters with the frozen ones behind stop_gradient: no gradient is computed for them."""
    return jax.tree.map(lambda leaf, trained: leaf if trained else jax.lax.stop_gradient(leaf), params, trainable)


def derived_rules(rules) -> tuple:
    """Sharding rules for the adapters from the kernels' (research/sharding.py): A (.. x in x rank) splits like the
    kernel's input axis, B (.. x rank x out) like its output axis."""
    derived = []
    for pattern, axes in rules:
        if not pattern.endswith("kernel$"):
            continue
        axes, stem = tuple(axes), pattern[: -len("kernel$")]
        if len(axes) >= 2:
            derived += [(stem + "lora_a$", (*axes[:-1], None)), (stem + "lora_b$", (*axes[:-2], None, axes[-1]))]
        else:
            derived += [(stem + "lora_a$", ()), (stem + "lora_b$", ())]
    return tuple(derived)


class LoRA:
    """The experiment with adapters on its frozen model (the module docstring); every other hook is its own."""

    def __init__(self, inner: ModuleType, config: ml_collections.ConfigDict):
        self.inner, self.settings = inner, config.lora
        self.targets, self.also_train = check_settings(config.lora)
        self.adapted: set[str] = set()

    def __getattr__(self, name: str) -> Any:
        value = getattr(self.inner, name)
        if name == "eval_fn":
            return lambda params, batch, **kwargs: self._adapted(value, params, batch, **kwargs)
        return value

    def _intercepting(self):
        return nn.intercept_methods(interceptor(self.settings, self.targets, self.adapted))

    def _adapted(self, function: Callable, params, *args, **kwargs):
        with self._intercepting():
            return function(frozen(params, self.trainable(params)), *args, **kwargs)

    def init_variables(self, model: nn.Module, rng: jax.Array, batch) -> dict:
        from research.steps import default_init_variables  # the core calls this feature, never the reverse

        initialise = experiment.hook(self.inner, "init_variables", default_init_variables)
        with self._intercepting():
            variables = initialise(model, rng, batch)
        if not self.adapted:
            raise ConfigError(
                f"lora.targets {self.settings.targets!r} matches none of the model's dense layers: name some of "
                f"{', '.join(sorted(dense_paths(variables['params']))[:8])}"
            )
        return variables

    def loss_fn(self, params, batch, rng, *, model, **model_state):
        return self._adapted(self.inner.loss_fn, params, batch, rng, model=model, **model_state)

    def logits_fn(self, variables: dict, inputs: jax.Array, *, model: nn.Module) -> jax.Array:
        rest = {key: value for key, value in variables.items() if key != "params"}
        predict = lambda params: experiment.logits_of(self.inner, model, {"params": params} | rest, inputs)
        return self._adapted(predict, variables["params"])

    def trainable(self, params: PyTree) -> PyTree:
        """The adapters, and the parameters `lora.also_train` names (PEFT's modules_to_save): True; the rest False."""
        also = self.also_train
        return jax.tree_util.tree_map_with_path(
            lambda path, _: is_adapter(path) or bool(also and also.search(path_name(path))), params
        )

    def make_tx(self, config: ml_collections.ConfigDict) -> optax.GradientTransformation:
        """The configured optimizer on the adapters; the rest get no update and keep no state."""
        from research.optim import make_tx

        tx = experiment.hook(self.inner, "make_tx", make_tx)(config)
        labels = lambda params: jax.tree.map(lambda trained: "adapter" if trained else "frozen", self.trainable(params))
        return optax.multi_transform({"adapter": tx, "frozen": optax.set_to_zero()}, labels)

    def param_rules(self, config: ml_collections.ConfigDict) -> tuple:
        rules = experiment.hook(self.inner, "param_rules", lambda config: tuple(config.param_rules))(config)
        return derived_rules(rules) + tuple(rules)


def dense_paths(params: PyTree) -> set[str]:
    """The module paths of the parameters' kernels (what `lora.targets` can name)."""
    return {
        path_name(path).removesuffix("/kernel")
        for path, _ in jax.tree_util.tree_leaves_with_path(params)
        if path_name(path).endswith("/kernel")
    }


def merged(config: ml_collections.ConfigDict, params: PyTree) -> tuple[ml_collections.ConfigDict, PyTree]:
    """(the config without adapters, the parameters with each module's adapters folded into its kernel:
    W + (alpha / rank) A B, in W's dtype)."""
    scale = config.lora.alpha / config.lora.rank

    def fold(tree):
        if not isinstance(tree, dict):
            return tree
        if "lora_a" in tree and "kernel" in tree:
            kernel, a, b = tree["kernel"], tree["lora_a"], tree["lora_b"]
            update = jnp.einsum("...ir,...ro->...io", a.astype(jnp.float32), b.astype(jnp.float32)) * scale
            rest = {key: value for key, value in tree.items() if key not in (*ADAPTERS, "kernel")}
            return rest | {"kernel": (kernel.astype(jnp.float32) + update).astype(kernel.dtype)}
        return {key: fold(value) for key, value in tree.items()}

    plain = config.copy_and_resolve_references()
    plain.lora.rank = 0
    return plain, fold(dict(params))


def wrap(config: ml_collections.ConfigDict, inner: ModuleType) -> LoRA:
    """The experiment with adapters, when `config.lora.rank` > 0 (research/steps.py `with_features`)."""
    return LoRA(inner, config)
