"""optax as the public test set of the optimizer contract: every optimizer and gradient transformation
factory that `optax` and `optax.contrib` export, named in the config as a user would
(`optax:adabelief`), through the conformance kit; a Markdown table of which checks each passes and,
for each failure, why.

  python -m research.tools.optax_survey --output docs/optax.md     # ~2 minutes on 2 CPU cores

A factory taking `learning_rate` is an optimizer; one without it is a direction (optax.scale_by_adam)
that the contract follows with scale_by_learning_rate, its required numbers from REQUIRED; one that
takes another transformation or a function (a combinator: optax.masked, optax.lookahead) runs the
way a user writes it, in a factory file of its own (EXAMPLES). tests/tools/test_optax_survey.py runs
them all again and compares with the table.
"""

import argparse
import importlib
import inspect
import multiprocessing
import re
import tempfile
import textwrap
from pathlib import Path
from typing import NamedTuple

import optax

from research import runtime
from research.tools import check_optimizer

MODULES = ("optax", "optax.contrib")
LEARNING_RATE = 0.05  # the kit's default (its problems are scaled for it), unless the factory has its own
# Numbers a transformation requires, by argument name: typical values, none tuned to pass a check.
REQUIRED = {
    "clipping": 0.1,
    "eta": 0.01,
    "gamma": 0.55,
    "max_delta": 1.0,
    "threshold": 1.0,
    "max_norm": 1.0,
    "decay": 0.9,
    "step_size": 1.0,
    "max_backtracking_steps": 15,
    "max_linesearch_steps": 15,
    "l2_norm_clip": 1.0,
    "noise_multiplier": 0.1,
    "seed": 0,
}
_MATRICES = "lambda params: jax.tree.map(lambda p: p.ndim > 1, params)"
_LABELS = 'lambda params: jax.tree.map(lambda p: "matrix" if p.ndim > 1 else "vector", params)'
# Combinators as a user composes them in a factory file (the body of `make(learning_rate)`).
EXAMPLES = {
    "optax:apply_if_finite": "optax.apply_if_finite(optax.adam(learning_rate), max_consecutive_errors=5)",
    "optax:chain": "optax.chain(optax.clip_by_global_norm(1.0), optax.adam(learning_rate))",
    "optax:conditionally_mask": "optax.conditionally_mask(optax.adam(learning_rate), lambda step: step >= 0)",
    "optax:conditionally_transform": "optax.conditionally_transform(optax.adam(learning_rate), lambda step: step >= 0)",
    "optax:flatten": "optax.flatten(optax.adam(learning_rate))",
    "optax:freeze": f"optax.chain(optax.adam(learning_rate), optax.freeze({_MATRICES.replace('> 1', '> 2')}))",
    "optax:lookahead": "optax.lookahead(optax.adam(learning_rate), sync_period=5, slow_step_size=0.5)",
    "optax:masked": f"optax.chain(optax.masked(optax.add_decayed_weights(1e-4), {_MATRICES}), "
    "optax.adam(learning_rate))",
    "optax:measure_with_ema": "optax.chain(optax.measure_with_ema(optax.tree.norm, 0.9), optax.adam(learning_rate))",
    "optax:multi_transform": f"optax.multi_transform({{'matrix': optax.adam(learning_rate), "
    f"'vector': optax.sgd(learning_rate)}}, {_LABELS})",
    "optax:named_chain": "optax.named_chain(('clip', optax.clip_by_global_norm(1.0)), "
    "('adam', optax.adam(learning_rate)))",
    "optax:partition": f"optax.partition({{'matrix': optax.adam(learning_rate), "
    f"'vector': optax.sgd(learning_rate)}}, {_LABELS})",
    "optax:scale_by_schedule": "optax.chain(optax.scale_by_adam(), "
    "optax.scale_by_schedule(lambda count: -learning_rate * 0.999**count))",
    "optax:selective_transform": "optax.selective_transform(optax.adam(learning_rate), freeze_mask=False)",
    "optax:snapshot": "optax.chain(optax.snapshot('norm', optax.tree.norm), optax.adam(learning_rate))",
    "optax:stateless": "optax.chain(optax.stateless(lambda updates, params: jax.tree.map(jnp.tanh, updates)), "
    "optax.sgd(learning_rate))",
    "optax:stateless_with_tree_map": "optax.chain(optax.stateless_with_tree_map(lambda g, p: jnp.clip(g, -1, 1)), "
    "optax.sgd(learning_rate))",
    "optax:with_extra_args_support": "optax.with_extra_args_support(optax.adam(learning_rate))",
    "optax.contrib:mechanize": "optax.contrib.mechanize(optax.adam(learning_rate))",
    "optax.contrib:sam": "optax.contrib.sam(optax.sgd(learning_rate), optax.sgd(0.05), sync_period=2)",
    "optax.contrib:schedule_free": "optax.contrib.schedule_free(optax.sgd(learning_rate), learning_rate)",
    "optax.contrib:split_real_and_imaginary": "optax.contrib.split_real_and_imaginary(optax.adam(learning_rate))",
}


_SLOW = "slow on this problem at the kit's rate, not a contract failure: "
# Why each failure: "by design" (what the factory is for), "upstream" (a limitation of optax or orbax at the
# installed versions), or slow convergence on the kit's linear regression at its learning rate.
EXPLANATIONS = {
    "optax:adadelta": _SLOW + "Adadelta (Zeiler 2012) is meant to run at rate 1 (optax's default None).",
    "optax:scale_by_adadelta": _SLOW + "Adadelta's direction, meant for rate 1.",
    "optax:adafactor": _SLOW + "steps relative to each parameter's scale (0.5 here).",
    "optax:adagrad": _SLOW + "steps shrink as the squared gradients accumulate.",
    "optax:scale_by_rss": _SLOW + "Adagrad's direction; steps shrink as the squared gradients accumulate.",
    "optax:sm3": _SLOW + "SM3 (Anil et al. 2019) accumulates squared gradients like Adagrad.",
    "optax:scale_by_sm3": _SLOW + "SM3's direction, Adagrad-like.",
    "optax:adaptive_grad_clip": _SLOW + "each step is clipped to 0.1 x the parameter's norm.",
    "optax:fromage": _SLOW + "steps proportional to each layer's norm (Bernstein et al. 2020).",
    "optax:lamb": _SLOW + "layer-wise trust ratio: steps proportional to the parameter's norm.",
    "optax:lars": _SLOW + "trust coefficient 0.001 (You et al. 2017): tiny steps for a 1x1 layer.",
    "optax:scale_by_trust_ratio": _SLOW + "steps proportional to the parameter's norm.",
    "optax.contrib:simplified_ademamix": _SLOW + "its momentum accumulates without bias correction by design.",
    "optax.contrib:scale_by_simplified_ademamix": _SLOW + "its momentum accumulates without bias correction.",
    "optax:centralize": "by design: centralizes a weight's gradient over its input axis (Yong et al. 2020), which "
    "zeroes the kit's 1x1 weight's; meant for wider layers.",
    "optax:set_to_zero": "by design: zero updates (it freezes what it is applied to).",
    "optax:keep_params_nonnegative": "by design: a projection of the final updates; chain it after an optimizer "
    "in your own file (as a direction the contract multiplies it by -learning_rate).",
    "optax:polyak_sgd": "an optimizer whose rate is `max_learning_rate`: with no `learning_rate` argument the "
    "contract takes it for a direction and flips its steps; in a file: "
    "`return optax.polyak_sgd(max_learning_rate=learning_rate)`.",
    "optax:scale_by_rprop": "a direction although it takes `learning_rate` (Rprop's initial step size), so the "
    "contract does not scale it; optax:rprop is the optimizer.",
    "optax.contrib:scale_by_cocob": "returns descent steps, not a direction: the contract's -learning_rate flips "
    "them; optax.contrib:cocob is the optimizer.",
    "optax:scale_by_distance_over_gradients": "DoG's steps start at 1e-6 x the parameters' norm and grow; the kit's "
    "rate 0.05 (not DoG's 1.0) keeps them too small for 300 steps; optax.contrib:dog passes.",
    "optax:scale_by_zoom_linesearch": "by design: a line search along the incoming updates, which must already be "
    "a descent direction (optax.lbfgs chains it after its own); given gradients it finds no decrease.",
    "optax:scale_by_backtracking_linesearch": "by design: a line search along a descent direction (chain it after "
    "an optimizer); under MultiSteps it re-evaluates the loss of the last micro-batch, not of the sum.",
    "optax:lookahead": "by design: its parameters must be optax.LookaheadParams (fast and slow copies), not the "
    "model's parameter tree.",
    "optax:measure_with_ema": "by design: a measurement for optax.monitor; it replaces the updates by the "
    "measurement's average.",
    "optax.contrib:scale_by_muon": "by design (optax 0.2.8): matrices only, a bias fails; optax.contrib:muon "
    "routes the other parameters to Adam and passes.",
    "optax.contrib:dpsgd": "by design: needs per-example gradients (a leading batch axis); a train step gives the "
    "batch's mean gradient.",
    "optax.contrib:differentially_private_aggregate": "by design: needs per-example gradients (a leading batch "
    "axis); a train step gives the batch's mean gradient.",
    "optax.contrib:galore": "upstream (orbax 0.12.8): orbax refuses to save zero-size arrays, and GaLore keeps an "
    "empty projector for each vector (bias), so its state cannot be checkpointed.",
    "optax.contrib:scale_by_galore": "upstream (orbax 0.12.8): orbax refuses to save zero-size arrays, and GaLore "
    "keeps an empty projector for each vector (bias).",
}


class SurveyRow(NamedTuple):
    spec: str
    kind: str  # optimizer, direction or combinator
    results: list  # the kit's CheckResults


def _returns_transformation(function) -> bool:
    returns = inspect.signature(function).return_annotation
    if isinstance(returns, type):
        return issubclass(returns, optax.GradientTransformation)
    if returns is not inspect.Signature.empty:
        return False
    # Unannotated: a factory if it makes a transformation from its defaults (building one computes nothing).
    parameters = inspect.signature(function).parameters.values()
    if any(p.default is p.empty and p.name != "learning_rate" for p in parameters):
        return False
    made = function(learning_rate=0.1) if "learning_rate" in inspect.signature(function).parameters else function()
    return isinstance(made, optax.GradientTransformation)


def factories() -> list[str]:
    """`module:function` for every public function of MODULES that makes a gradient transformation."""
    found = []
    for module_name in MODULES:
        module = importlib.import_module(module_name)
        for name in sorted(dir(module)):
            function = getattr(module, name)
            if not name.startswith("_") and inspect.isfunction(function) and _returns_transformation(function):
                found.append(f"{module_name}:{name}")
    return found


def kind_of(spec: str) -> str:
    if spec in EXAMPLES:
        return "combinator"
    module, _, name = spec.partition(":")
    parameters = inspect.signature(getattr(importlib.import_module(module), name)).parameters
    return "optimizer" if "learning_rate" in parameters else "direction"


def required_kwargs(spec: str) -> dict:
    module, _, name = spec.partition(":")
    parameters = inspect.signature(getattr(importlib.import_module(module), name)).parameters.values()
    return {p.name: REQUIRED[p.name] for p in parameters if p.default is p.empty and p.name != "learning_rate"}


def survey_one(spec: str, directory: Path) -> SurveyRow:
    """The kit's rows for one factory; a combinator through a factory file written into `directory`."""
    if spec in EXAMPLES:
        path = directory / f"{spec.replace(':', '_').replace('.', '_')}.py"
        body = "import jax\nimport jax.numpy as jnp\nimport optax\nimport optax.contrib\n\n\ndef make(learning_rate):\n"
        path.write_text(body + textwrap.indent(f"return {EXAMPLES[spec]}\n", "    "))
        return SurveyRow(spec, "combinator", check_optimizer.check_optimizer(f"{path}:make", LEARNING_RATE))
    results = check_optimizer.check_optimizer(spec, learning_rate(spec), required_kwargs(spec))
    return SurveyRow(spec, kind_of(spec), results)


def learning_rate(spec: str) -> float:
    """1.0 for a learning-rate-free method (its default rate is 1.0: Prodigy, D-Adaptation, DoG, COCOB), else
    LEARNING_RATE."""
    module, _, name = spec.partition(":")
    if spec in EXAMPLES:
        return LEARNING_RATE
    parameter = inspect.signature(getattr(importlib.import_module(module), name)).parameters.get("learning_rate")
    return 1.0 if parameter is not None and parameter.default == 1.0 else LEARNING_RATE


def survey(specs: list[str]) -> list[SurveyRow]:
    with tempfile.TemporaryDirectory() as directory:
        return [survey_one(spec, Path(directory)) for spec in specs]


def _survey_in_worker(specs: list[str]) -> list[SurveyRow]:
    runtime.use_fake_devices(8)  # a spawned process: JAX not started yet
    return survey(specs)


def survey_parallel(specs: list[str], workers: int) -> list[SurveyRow]:
    """survey(specs) split over `workers` spawned processes, in the order of `specs`."""
    context = multiprocessing.get_context("spawn")
    with context.Pool(workers) as pool:
        parts = pool.map(_survey_in_worker, [specs[index::workers] for index in range(workers)])
    by_spec = {row.spec: row for part in parts for row in part}
    return [by_spec[spec] for spec in specs]


def failed_checks(row: SurveyRow) -> list[str]:
    return [result.name for result in row.results if not result.passed]


def format_markdown(rows: list[SurveyRow]) -> str:
    """The table docs/optax.md holds: one row per factory, its failed checks with the kit's reason and why."""
    lines = [
        "| factory | kind | learning rate | checks passed | failed checks | the kit's reason | why |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        failed = [result for result in row.results if not result.passed]
        reason = re.sub(r"/\S*/(\w+\.py)", r"\1", failed[0].reason.replace("|", "/")) if failed else ""
        lines.append(
            f"| `{row.spec}` | {row.kind} | {learning_rate(row.spec):g} | {len(row.results) - len(failed)}/"
            f"{len(row.results)} | {', '.join(result.name for result in failed)} | {reason[:160]} | "
            f"{EXPLANATIONS.get(row.spec, '') if failed else ''} |"
        )
    return "\n".join(lines)


def parse_markdown(text: str) -> dict[str, tuple[int, list[str]]]:
    """{factory: (checks passed, failed check names)} from a table written by format_markdown."""
    found = {}
    for line in text.splitlines():
        if line.startswith("| `"):
            cells = [cell.strip() for cell in line.strip("|").split("|")]
            failed = [name.strip() for name in cells[4].split(",") if name.strip()]
            found[cells[0].strip("`")] = (int(cells[3].split("/")[0]), failed)
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", default="docs/optax.md", help="the Markdown file whose table is replaced")
    parser.add_argument("--workers", type=int, default=2, help="processes (one per core)")
    arguments = parser.parse_args()
    rows = survey_parallel(factories(), arguments.workers)
    path = Path(arguments.output)
    head, marker, _ = path.read_text().partition(TABLE_MARKER)
    path.write_text(head + marker + "\n" + format_markdown(rows) + "\n")
    passed = sum(not failed_checks(row) for row in rows)
    print(f"{passed}/{len(rows)} factories pass every check; table written to {path}")


TABLE_MARKER = "<!-- generated by research/tools/optax_survey.py: everything below is replaced -->"

if __name__ == "__main__":
    main()
