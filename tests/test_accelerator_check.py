"""The accelerator check runs at its tiny size on a CPU, so the command a lent GPU runs cannot rot."""

import json

import pytest

from conftest import ROOT, python


@pytest.mark.slow
def test_the_accelerator_check_runs_tiny_on_a_cpu(tmp_path):
    output = tmp_path / "accelerator.json"
    result = python("benchmarks/accelerator.py", "--tiny", "--steps=2", f"--output={output}", timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    table = result.stdout.strip().splitlines()
    assert table[0].startswith("accelerator check on cpu") and len(table) == 4, table
    report = json.loads(output.read_text())
    rows = {row["model"]: row for row in report["rows"]}
    assert sorted(rows) == ["llama tiny", "resnet-50 (1 block per stage)"]
    for row in rows.values():
        assert row["step_seconds"] > 0 and row["throughput"] > 0 and 0 < row["mfu"] < 1, row
    llama = rows["llama tiny"]
    assert llama["batch"] == "4x64" and llama["throughput"] == pytest.approx(4 * 64 / llama["step_seconds"])
    assert llama["dry_run_memory_gib"] > 0 and llama["dry_run_tokens_per_second"] > 0  # the dry run for cpu:1
    assert (ROOT / "benchmarks" / "accelerator.py").exists()
