"""The accelerator check runs at its tiny size on a CPU, so the command a lent GPU runs cannot rot; its full rows
are compiled for an H200 here (they fit), and the wheels carried to the lent machine cover what it imports."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT, child_environment, python


@pytest.mark.slow
def test_the_accelerator_check_runs_tiny_on_a_cpu(tmp_path):
    """Through the script a lent machine runs (benchmarks/accelerator_on_device.sh), with this venv's python3."""
    output = tmp_path / "accelerator.json"
    path = f"{Path(sys.executable).parent}:{os.environ['PATH']}"  # its python3: this venv's
    environment = child_environment({"OUT": str(tmp_path), "WHEELS": str(tmp_path / "none"), "PATH": path})
    script = ["bash", "benchmarks/accelerator_on_device.sh", "--tiny", "--steps=2"]
    result = subprocess.run(script, cwd=ROOT, env=environment, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.strip().splitlines()
    table = lines[lines.index(next(line for line in lines if line.startswith("accelerator check"))) :]
    assert lines[0].startswith("jax ") and lines[1].startswith("jaxlib ") and "grain " in lines[1], lines
    assert table[0].startswith("accelerator check on cpu") and len(table) == 4, lines
    assert (tmp_path / "accelerator.log").read_text().strip().splitlines()[-4:] == table
    report = json.loads(output.read_text())
    rows = {row["model"]: row for row in report["rows"]}
    assert sorted(rows) == ["llama tiny", "resnet-50 (1 block per stage)"]
    for row in rows.values():
        assert row["step_seconds"] > 0 and row["throughput"] > 0 and 0 < row["mfu"] < 1, row
    llama = rows["llama tiny"]
    assert llama["batch"] == "4x64" and llama["throughput"] == pytest.approx(4 * 64 / llama["step_seconds"])
    assert llama["dry_run_memory_gib"] > 0 and llama["dry_run_tokens_per_second"] > 0  # the dry run for cpu:1
    assert (ROOT / "benchmarks" / "accelerator.py").exists()


@pytest.mark.slow
def test_the_accelerator_checks_full_rows_fit_an_h200(tmp_path):
    """Compiled for an H200 here (no GPU, nothing run), every full-size row fits the 75 % of its memory that JAX
    preallocates, and the LMs use cuDNN's fused attention: a lent device's 15 minutes are not spent on an OOM."""
    result = python("benchmarks/accelerator.py", "--target=gpu:h200:1", timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr[-3000:]
    table = result.stdout.strip().splitlines()
    assert table[0].startswith("accelerator check compiled for gpu:h200:1") and "105.8 GiB usable" in table[0]
    rows = {line[:22].strip(): line[22:].split() for line in table[2:]}
    assert sorted(rows) == ["llama 124M", "llama 3.2 1B", "resnet-50"], table
    for name, (batch, memory, fits, *attention) in rows.items():
        assert fits == "yes" and 0.5 < float(memory) < 105.8, (name, memory)
        assert " ".join(attention) == ("-" if name == "resnet-50" else "cuDNN fused attention"), (name, attention)
    assert rows["llama 3.2 1B"][0] == "8x2048" and float(rows["llama 3.2 1B"][1]) > 30  # 66 GiB with jax 0.10.2
    failed = python("benchmarks/accelerator.py", "--target=gpu:h200", timeout=60)
    assert failed.returncode == 1 and failed.stderr.strip().splitlines()[-1].startswith("accelerator.py: unknown")


WHAT_ACCELERATOR_IMPORTS = """
import importlib.metadata, json, sys
sys.argv = ["accelerator"]
sys.path[:0] = ["benchmarks"]
import accelerator
from packaging.utils import canonicalize_name
owners = importlib.metadata.packages_distributions()
modules = {name.split(".")[0] for name in list(sys.modules)}
print(json.dumps({m: [canonicalize_name(d) for d in owners.get(m, [])] for m in sorted(modules)}))
"""


def test_the_device_wheels_cover_every_package_the_check_imports(monkeypatch):
    """benchmarks/device_wheels.py: what the lent machine's image lacks is carried, and nothing it has (a second
    jax or numpy would shadow its own); a new import outside both fails here, not on the device."""
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import device_wheels

    carried = device_wheels.needed()
    assert {"ml-collections", "grain", "tensorflow-datasets", "array-record", "promise"} <= set(carried)
    assert not set(carried) & (device_wheels.IMAGE | device_wheels.LEFT_BEHIND)
    result = python("-c", WHAT_ACCELERATOR_IMPORTS)
    assert result.returncode == 0, result.stderr[-3000:]
    imported = json.loads(result.stdout.strip().splitlines()[-1])
    here_only = {"research", "libtpu", "jax-cuda12-plugin", "jax-cuda12-pjrt"}  # the project, this machine's compilers
    allowed = set(carried) | device_wheels.IMAGE | device_wheels.LEFT_BEHIND | here_only
    uncovered = {module: owners for module, owners in imported.items() if owners and not set(owners) & allowed}
    assert not uncovered and {"grain", "ml_collections", "jax", "flax"} <= set(imported), uncovered


def test_a_failed_row_is_reported_and_the_others_kept(tmp_path):
    """Each row runs in a process of its own: one that fails or hangs (here: every row past a 1 ms limit) becomes
    a 'failed' line and an error in the JSON, which is written after each row; the exit status says so."""
    output = tmp_path / "accelerator.json"
    result = python("benchmarks/accelerator.py", "--tiny", "--row_timeout=0.001", f"--output={output}", timeout=120)
    assert result.returncode == 1, result.stderr[-3000:]
    lines = result.stdout.strip().splitlines()
    assert lines[0].startswith("accelerator check on an accelerator") and len(lines) == 4, lines
    assert lines[2].split() == ["llama", "tiny", "failed:", "timed", "out", "after", "0", "s"], lines
    rows = json.loads(output.read_text())["rows"]
    assert [row["model"] for row in rows] == ["llama tiny", "resnet-50 (1 block per stage)"]
    assert all(row["error"].startswith("timed out") for row in rows), rows
