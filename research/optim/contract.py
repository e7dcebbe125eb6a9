"""The contract between the trainer and any optax optimizer, taken as optax defines it.

The trainer (and the kit) call every optimizer one way, `update`: gradients, state, parameters and,
as extra arguments, the loss `value`, its `grad` and the loss as a function of the parameters under
both names the ecosystem uses, `value_fn` and `obj_fn` (optax.contrib's Sophia). `conforming`
wraps a factory so that optax's conventions hold whatever the optimizer's code does:
- extra arguments reach only a GradientTransformationExtraArgs, and only the ones its update accepts
  (read from its signature, narrowed at the first traced update if an inner function refuses one);
- updates of any float dtype come back in the parameters' dtypes, as optax.apply_updates casts them;
- a factory without a `learning_rate` argument (a direction such as optax.scale_by_adam) is followed
  by optax.scale_by_learning_rate, so the config's rate and schedule apply to it;
- an exception from its code (built, init, or the first traced update) is one `OptimizerError` line
  naming the file, the function and what to do; a Python `if` on an injected hyperparameter names it.
"""

import contextlib
import inspect
import re
import traceback
from pathlib import Path
from typing import Any, Callable, Iterator

import jax
import optax

from research.errors import ConfigError, OptimizerError

EXTRA_ARGS = ("value", "grad", "value_fn", "obj_fn")
Factory = Callable[..., optax.GradientTransformation]


def update(tx: optax.GradientTransformation, grads, state, params, *, value: jax.Array, value_fn: Callable):
    """`tx.update` as the trainer calls it: the extra arguments go to an ExtraArgs transformation only."""
    extra = dict(value=value, grad=grads, value_fn=value_fn, obj_fn=value_fn)
    return optax.with_extra_args_support(tx).update(grads, state, params, **extra)


def first_line(error: BaseException) -> str:
    return f"{type(error).__name__}: {(str(error).strip().splitlines() or [''])[0]}"


def line_in(error: BaseException, source_file: str | None) -> str:
    """' (line N)' for the deepest traceback frame inside `source_file`."""
    if not source_file:
        return ""
    lines = [
        frame.lineno
        for frame in traceback.extract_tb(error.__traceback__)
        if Path(frame.filename).resolve() == Path(source_file).resolve()
    ]
    if isinstance(error, SyntaxError) and error.lineno:
        lines.append(error.lineno)
    return f" (line {lines[-1]})" if lines else ""


def advice(error: BaseException) -> str:
    """What to do about an error raised by an optimizer's code."""
    if isinstance(error, (jax.errors.ConcretizationTypeError, jax.errors.TracerArrayConversionError)):
        found = re.search(r"hyperparams\['(\w+)'\]", str(error))
        if found:
            return (
                f"its argument {found.group(1)!r} arrives as an array (injected: sweepable without recompiling) and "
                f"the code needs a Python value: keep it static with --config.optimizer.static_kwargs={found.group(1)}"
            )
        return (
            "the code needs a Python value of an array: use jnp.where or jax.lax.cond, or keep the hyperparameter "
            "static with --config.optimizer.static_kwargs=NAME"
        )
    if isinstance(error, TypeError) and "argument" in str(error):
        return "optax calls init(params) and update(updates, state, params=None) (ExtraArgs: plus **extra_args)"
    return "fix the code there (python launch.py --check_optimizer SPEC runs every check)"


@contextlib.contextmanager
def blame(origin: str, source_file: str | None, what: str) -> Iterator[None]:
    """Turns an exception from an optimizer's own code into a one-line OptimizerError."""
    try:
        yield
    except ConfigError:
        raise
    except Exception as error:
        message = f"{origin}{line_in(error, source_file)}: {what} raised {first_line(error)}; {advice(error)}"
        raise OptimizerError(message) from None


def accepted_by_signature(function: Callable) -> list[str]:
    """The extra arguments a function's signature takes: all of them if it has **kwargs (or no signature)."""
    try:
        parameters = inspect.signature(function).parameters.values()
    except (TypeError, ValueError):
        return list(EXTRA_ARGS)
    if any(parameter.kind is parameter.VAR_KEYWORD for parameter in parameters):
        return list(EXTRA_ARGS)
    return [name for name in EXTRA_ARGS if name in {parameter.name for parameter in parameters}]


def _update_accepting(tx: optax.GradientTransformation, updates, state, params, extra_args: dict, accepted: list):
    """tx.update with the extra arguments in `accepted`; one that an inner function refuses leaves the list."""
    while True:
        try:
            return tx.update(
                updates, state, params, **{name: extra_args[name] for name in accepted if name in extra_args}
            )
        except TypeError as error:
            # "unexpected keyword argument 'obj_fn'", or optax's line searches: "not consumed by ...: ['obj_fn']"
            message = str(error)
            refused = [name for name in accepted if f"'{name}'" in message]
            if not refused or not re.search(r"unexpected|not consumed", message):
                raise
            accepted.remove(refused[0])


def cast_like(updates, like):
    """Float updates in the dtypes of `like` (the parameters); anything else as it is."""
    if like is None or jax.tree.structure(updates) != jax.tree.structure(like):
        return updates  # a mismatch is reported by check_against_params, by name
    floating = lambda x: hasattr(x, "dtype") and jax.numpy.issubdtype(x.dtype, jax.numpy.floating)
    return jax.tree.map(lambda u, p: u.astype(p.dtype) if floating(u) and floating(p) else u, updates, like)


def conform(tx: optax.GradientTransformation, origin: str, source_file: str | None, decision: dict):
    """`tx` under the contract; `decision` (shared by the factory's calls) keeps the accepted extra arguments."""
    takes_extra = isinstance(tx, optax.GradientTransformationExtraArgs)

    def init_fn(params):
        with blame(origin, source_file, "init"):
            return tx.init(params)

    def update_fn(updates, state, params=None, **extra_args):
        with blame(origin, source_file, "update"):
            if takes_extra:
                accepted = decision.setdefault("accepted", accepted_by_signature(tx.update))
                new_updates, new_state = _update_accepting(tx, updates, state, params, extra_args, accepted)
            else:
                new_updates, new_state = tx.update(updates, state, params)
        return cast_like(new_updates, updates if params is None else params), new_state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def source_file(factory: Callable) -> str | None:
    try:
        return inspect.getsourcefile(factory)
    except TypeError:
        return None


def conforming(factory: Factory, origin: str) -> Factory:
    """`factory` whose transformations meet the contract, with `learning_rate` as its first argument."""
    signature = inspect.signature(factory)
    takes_rate = "learning_rate" in signature.parameters
    where, decision = source_file(factory), {}

    def make(learning_rate: Any, **kwargs: Any) -> optax.GradientTransformation:
        with blame(origin, where, "calling it"):
            tx = factory(learning_rate=learning_rate, **kwargs) if takes_rate else factory(**kwargs)
        if not isinstance(tx, optax.GradientTransformation):
            raise OptimizerError(
                f"{origin}: it returned {type(tx).__name__}, not an optax.GradientTransformation (init and update)"
            )
        tx = conform(tx, origin, where, decision)
        return tx if takes_rate else optax.chain(tx, optax.scale_by_learning_rate(learning_rate))

    if not takes_rate:
        rate = inspect.Parameter("learning_rate", inspect.Parameter.POSITIONAL_OR_KEYWORD)
        signature = signature.replace(parameters=[rate, *signature.parameters.values()])
    make.__signature__ = signature
    return make
