"""The reproduction registry: PASS/FAIL arithmetic, selection, the table, and every smoke reproduction (CI)."""

import math
import types
from pathlib import Path

import pytest

from conftest import experiment_names, load_experiment
from research.errors import ConfigError
from research.experiment import Reference
from research.tools import reproduce

NAMES = experiment_names()
load = load_experiment


@pytest.mark.parametrize(
    "better, measured, passed",
    [
        ("", 1.93, True),
        ("", 1.83, True),
        ("", 1.94, False),
        ("", 1.82, False),
        ("min", 1.50, True),
        ("min", 1.93, True),
        ("min", 1.94, False),
        ("max", 2.50, True),
        ("max", 1.83, True),
        ("max", 1.82, False),
        ("", math.nan, False),
        ("", None, False),
    ],
)
def test_pass_and_fail_within_the_tolerance_and_on_the_better_side(better, measured, passed):
    reference = Reference(
        config="cpu", metric="eval/loss", value=1.88, tolerance=0.05, source="s", kind="published", better=better
    )
    assert reference.passes(measured) is passed


def test_a_reference_with_a_bad_direction_or_kind_is_refused():
    with pytest.raises(ConfigError, match="better must be '', 'min' or 'max'"):
        Reference(config=None, metric="eval/loss", value=1.0, tolerance=0.1, source="s", kind="ours", better="lower")
    with pytest.raises(ConfigError, match="kind must be one of published, ours, truth"):
        Reference(config=None, metric="eval/loss", value=1.0, tolerance=0.1, source="s", kind="paper")


def fake_module(*references: Reference) -> types.ModuleType:
    """An experiment whose get_config takes overrides and whose references are given."""
    import ml_collections

    module = types.ModuleType("experiments.fake")
    module.get_config = lambda arg=None: ml_collections.ConfigDict({"variant": arg or "", "depth": 20, "data_dir": ""})
    module.REFERENCES = references
    return module


def test_reproduce_trains_once_per_config_and_compares_every_metric(tmp_path):
    references = (
        Reference(
            config="cpu",
            metric="eval/loss",
            value=1.88,
            tolerance=0.05,
            source="nanoGPT",
            kind="published",
            better="min",
        ),
        Reference(
            config="cpu",
            metric="eval/accuracy",
            value=0.50,
            tolerance=0.01,
            source="our run",
            kind="ours",
            better="max",
        ),
        Reference(
            config=None,
            metric="test/accuracy",
            value=0.9125,
            tolerance=0.005,
            source="He",
            kind="published",
            overrides=(("depth", 56),),
        ),
    )
    trained = []

    def train(config, module, workdir):
        trained.append((config.variant, config.depth, config.data_dir, str(Path(workdir).relative_to(tmp_path))))
        return {"eval/loss": 1.886, "eval/accuracy": 0.439, "test/accuracy": 0.93}

    outcomes = reproduce.reproduce(
        "fake:cpu",
        tmp_path,
        load=lambda name: fake_module(*references),
        names=["fake"],
        train=train,
        extra={"data_dir": "/data"},
    )
    assert trained == [("cpu", 20, "/data", "fake_cpu")]
    assert [(outcome.reference.metric, outcome.measured, outcome.passed) for outcome in outcomes] == [
        ("eval/loss", 1.886, True),
        ("eval/accuracy", 0.439, False),
    ]
    outcomes = reproduce.reproduce(
        "fake", tmp_path, load=lambda name: fake_module(*references), names=["fake"], train=train
    )
    assert trained[-1] == ("", 56, "", "fake/depth=56") and not outcomes[0].passed  # two-sided: 0.0175 away
    table = reproduce.format_table(outcomes).splitlines()
    assert table[0] == "| experiment | config | metric | reference | kind | tolerance | measured | result | source |"
    assert table[2] == "| fake | default depth=56 | test/accuracy | 0.9125 | published | ±0.005 | 0.9300 | FAIL | He |"
    assert table[3:] == ["", "kind: published = a paper, README or leaderboard"]


def test_the_table_tells_our_own_earlier_numbers_from_published_ones():
    """A regression guard from this repository is labelled `ours`, never `published`, and the legend says so."""
    references = [
        Reference(config="cpu", metric="eval/loss", value=1.88, tolerance=0.05, source="nanoGPT", kind="published"),
        Reference(config="smoke", metric="eval/loss", value=2.9, tolerance=0.15, source="our smoke run", kind="ours"),
        Reference(config=None, metric="test/slope", value=3.0, tolerance=0.01, source="y = 3x + 2", kind="truth"),
    ]
    outcomes = [
        reproduce.Outcome("fake", reference, measured) for reference, measured in zip(references, (1.9, 3.1, 3.0))
    ]
    table = reproduce.format_table(outcomes).splitlines()
    assert [row.split(" | ")[3:6] for row in table[2:5]] == [
        ["1.8800", "published", "±0.05"],
        ["2.9000", "ours", "±0.15"],
        ["3.0000", "truth", "±0.01"],
    ]
    assert table[-1] == (
        "kind: published = a paper, README or leaderboard; ours = this repository's own earlier run (a regression "
        "guard); truth = the value the data was generated with"
    )


def test_selection_errors_are_one_line():
    module = fake_module(
        Reference(config="cpu", metric="eval/loss", value=1.0, tolerance=0.1, source="s", kind="published")
    )
    with pytest.raises(ConfigError, match=r"no experiment 'nope'; choose one of \['fake'\] or 'all'"):
        reproduce.select("nope:cpu", lambda name: module, ["fake"])
    with pytest.raises(ConfigError, match=r"fake has no reference for config 'gpu'; try fake:cpu$"):
        reproduce.select("fake:gpu", lambda name: module, ["fake"])
    with pytest.raises(ConfigError, match="pass EXPERIMENT"):
        reproduce.select(":cpu", lambda name: module, ["fake"])


def test_every_shipped_reference_names_a_valid_config_and_overrides():
    count = 0
    for name in NAMES:
        module = load(name)
        for reference in reproduce.references_of(module):
            reproduce.build_config(module, reference, {})  # a bad variant or override raises
            count += 1
    assert count >= 15
    gpt = {reference.config: reference for reference in load("shakespeare_gpt").REFERENCES}
    assert gpt["cpu"].value == 1.88 and gpt[None].value == 1.47
    assert gpt["cpu"].kind == gpt[None].kind == "published" and gpt["smoke"].kind == "ours"


def test_every_shipped_reference_from_this_repository_is_labelled_ours():
    """A source that says the number is this repository's own is never shown as published, and the reverse."""
    for name in NAMES:
        for reference in reproduce.references_of(load(name)):
            ours = "this repository" in reference.source
            assert (reference.kind == "ours") == ours, (name, reference)


def test_every_smoke_reproduction_passes(smoke_runs, data_dir, capsys):
    """--reproduce all:smoke over the session's smoke runs (trained as launch.py would, where
    reproduce puts them): each is found finished, reported with its numbers, and passes."""
    root = next(iter(smoke_runs.values()))[0].parent
    outcomes = reproduce.reproduce("all:smoke", root, load=load, names=NAMES, extra={"data_dir": data_dir})
    table = reproduce.format_table(outcomes)
    print(table)
    assert {outcome.experiment for outcome in outcomes} >= {
        "mnist_logreg",
        "mnist_mlp",
        "shakespeare_gpt",
        "linear_regression",
    }
    assert all(outcome.passed for outcome in outcomes), table
    assert [outcome.measured for outcome in outcomes] == pytest.approx(
        [smoke_runs[outcome.experiment][1][outcome.reference.metric] for outcome in outcomes]
    )
    assert "is finished; its results are in" in capsys.readouterr().out
