"""The --dry_run and --plan commands that README.md and docs/*.md write work as written. Quick: each one's config
loads with its overrides, and its batch splits over its target's mesh (nothing compiled). Slow: each runs as a
user runs it, fits, and prints no traceback and none of the compiler plugins' start-up noise."""

import re
import shlex

import pytest
from absl import flags
from jax.sharding import AbstractMesh
from ml_collections import config_flags

from conftest import ROOT, launch
from research import experiment as experiment_lib
from research import perf, sharding, steps
from research.tools import plan, targets

DOCS = (ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")))
NOISE = ("Traceback", "cudart", "TPU_WORKER", "libtpu")  # a stack trace; the CUDA and TPU plugins' start-up logs


def launch_arguments(text: str) -> list[str] | None:
    """launch.py's arguments in `text` when it is a dry run or plan for a --target ("python launch.py --config ..."
    or "--config ..."), else None."""
    if "--target" not in text or not ("--dry_run" in text or "--plan" in text):
        return None
    words = shlex.split(text, comments=True)
    words = words[2:] if words[:2] == ["/usr/bin/time", "-v"] else words  # measured for its host memory
    words = words[2:] if words[:2] == ["python", "launch.py"] else words
    return words if words[:1] == ["--config"] else None


def docs_commands() -> list[tuple[str, list[str]]]:
    """(file:line, launch.py's arguments) of every dry run and plan the docs write: a code block's line (joined
    with its continuation lines) or an inline code span of prose."""
    found = []
    for path in DOCS:
        lines, fenced, index = path.read_text(encoding="utf-8").splitlines(), False, 0
        while index < len(lines):
            number, line = index + 1, lines[index]
            while fenced and line.endswith("\\") and index + 1 < len(lines):
                index += 1
                line = line[:-1] + lines[index]
            index += 1
            if line.lstrip().startswith("```"):
                fenced = not fenced
                continue
            for text in [line] if fenced else re.findall(r"`([^`]+)`", line):
                if arguments := launch_arguments(text):
                    found.append((f"{path.name}:{number}", arguments))
    return found


COMMANDS = docs_commands()
IDS = [where for where, _ in COMMANDS]
# Each distinct command once, but those that take minutes to compile on 2 cores, which are run by hand (the tables
# in docs/scaling.md give their figures): a plan over a TPU pod's candidates, ~6 minutes; the 27B and 32B dry runs,
# 1-6 minutes each, some of them sized not to fit.
BY_HAND = (("--plan", "--target", "tpu:v5p-64"), ("experiments/lm.py:qwen3-32b",), ("experiments/lm.py:gemma3-27b",))
BY_HAND += (("experiments/lm.py:mixtral-8x7b",),)  # 13 s to 4.5 min of compiling each
BY_HAND += (("--config", "experiments/lm.py:llama3.1-8b-128k", "--plan"),)  # 9 minutes, 7.8 GB of host memory
DISTINCT = {" ".join(arguments): (where, arguments) for where, arguments in reversed(COMMANDS)}
RUN = [
    (where, arguments)
    for where, arguments in DISTINCT.values()
    if not any(" ".join(marker) in " ".join(arguments) for marker in BY_HAND)
]


def assert_quiet(output: str) -> None:
    """No line of a command's output is a traceback or a plugin's start-up log."""
    noisy = [line for line in output.splitlines() if any(word in line for word in NOISE)]
    assert not noisy, "\n".join(noisy[:5])


def option(arguments: list[str], name: str) -> str:
    """The value of `--name VALUE` or `--name=VALUE` among launch.py's arguments."""
    for index, word in enumerate(arguments):
        if word == name:
            return arguments[index + 1]
        if word.startswith(name + "="):
            return word.partition("=")[2]
    raise AssertionError(f"no {name} in {arguments}")


def loaded(arguments: list[str]):
    """(experiment module, config) as launch.py's --config flag loads them, its overrides applied and checked."""
    values = flags.FlagValues()
    command = ["launch.py", *arguments]  # ml_collections reads --config.* overrides from sys_argv, not `values`
    config_flags.DEFINE_config_file(
        "config", None, flag_values=values, lock_config=False, accept_new_attributes=True, sys_argv=command
    )
    parser = values["config"].parser = experiment_lib.ConfigFileParser()
    values(command, known_only=True)
    assert parser.error is None, parser.error
    overrides = config_flags.get_override_values(values["config"])
    assert experiment_lib.unknown_key_message(parser.base_config, overrides) is None
    return parser.module, values.config


def test_the_docs_write_the_readmes_dry_run_and_plans():
    readme = ["--config", "experiments/lm.py:llama2-70b", "--dry_run", "--target", "tpu:v5p-512"]
    assert ("README.md", readme) in [(where.partition(":")[0], arguments) for where, arguments in COMMANDS]
    assert sum("--plan" in arguments for _, arguments in COMMANDS) >= 2


@pytest.mark.parametrize("where, arguments", COMMANDS, ids=IDS)
def test_a_docs_command_loads_and_its_batch_splits_over_its_target(where, arguments):
    module, config = loaded(arguments)
    target = targets.parse(option(arguments, "--target"))
    mesh = AbstractMesh(tuple(sharding.resolve_sizes(config.mesh, target.chips)), tuple(config.mesh))
    steps.check_batch(config, mesh)
    if "--plan" in arguments:
        assert plan.candidates(config, perf.decoder_of(config, module), target)


@pytest.mark.slow
@pytest.mark.parametrize("where, arguments", RUN, ids=[where for where, _ in RUN])
def test_a_docs_command_runs_as_written_and_fits(where, arguments, tmp_path):
    finished = launch(*arguments, timeout=1800, RESEARCH_PLAN_CACHE=str(tmp_path))
    assert finished.returncode == 0, (finished.stdout + finished.stderr)[-3000:]
    assert_quiet(finished.stdout + finished.stderr)
    result = "best of " if "--plan" in arguments else "verdict: FITS"
    assert any(line.startswith(result) for line in finished.stdout.splitlines()), finished.stdout[-3000:]
