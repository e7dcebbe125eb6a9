"""optax as the public test set of the optimizer contract: every factory of optax and optax.contrib goes through
the kit and gets the result docs/optax.md gives, and every failure there is explained."""

import pytest

from conftest import ROOT
from research.tools import optax_survey

TABLE = optax_survey.parse_markdown((ROOT / "docs" / "optax.md").read_text())
SHARDS = 6  # the slow test in parts, so that pytest-xdist's workers share it


def test_the_table_lists_every_factory_and_explains_every_failure():
    specs = optax_survey.factories()
    assert sorted(TABLE) == sorted(specs)
    assert {"optax:adabelief", "optax:scale_by_adam", "optax:masked", "optax.contrib:sophia"} <= set(specs)
    failing = {spec for spec, (_, failed) in TABLE.items() if failed}
    assert failing == set(optax_survey.EXPLANATIONS)
    for spec in specs:
        if spec not in optax_survey.EXAMPLES:
            optax_survey.required_kwargs(spec)  # a KeyError names a required argument REQUIRED lacks
    assert TABLE["optax.contrib:sophia"] == (9, []) and TABLE["optax:lbfgs"] == (9, [])


@pytest.mark.slow
@pytest.mark.parametrize("shard", range(SHARDS))
def test_every_factory_gets_the_kit_result_the_table_gives(shard):
    for row in optax_survey.survey(optax_survey.factories()[shard::SHARDS]):
        failed = optax_survey.failed_checks(row)
        assert (len(row.results) - len(failed), failed) == TABLE[row.spec], (row.spec, row.results)
