"""Two real JAX processes (2 CPU devices each, gloo): shards are disjoint, global batches cover the data.

Run as a script, this file is one of the two processes.
"""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[2]  # run as a script too, where conftest is not importable
EXAMPLES, GLOBAL_BATCH, STEPS = 48, 8, 6  # six global batches: exactly one epoch


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.mark.slow
def test_two_processes_read_disjoint_shards_into_global_batches():
    port = free_port()
    environment = {key: value for key, value in os.environ.items() if key != "XLA_FLAGS"}
    workers = [
        subprocess.Popen(
            [sys.executable, __file__, str(port), str(index)],
            cwd=ROOT,
            env=environment,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for index in range(2)
    ]
    outputs = [worker.communicate(timeout=120) for worker in workers]
    assert all(worker.returncode == 0 for worker in workers), [error[-2000:] for _, error in outputs]
    reports = [json.loads(out.strip().splitlines()[-1]) for out, _ in outputs]
    assert [report["devices"] for report in reports] == [4, 4]
    assert reports[0]["global"] == reports[1]["global"], "every process sees the same global batches"
    assert sorted(reports[0]["global"]) == list(range(EXAMPLES)), (
        "one epoch of global batches covers every example once"
    )
    local = [set(report["local"]) for report in reports]
    assert not local[0] & local[1] and local[0] | local[1] == set(range(EXAMPLES))
    sys.path.insert(0, str(ROOT))
    from research.data import pipeline

    one_process = pipeline.train_batches(
        pipeline.array_source(x=np.arange(EXAMPLES, dtype=np.int32)),
        batch_size=GLOBAL_BATCH,
        seed=0,
        process=pipeline.Process(0, 1),
    )
    iterator = iter(one_process)
    assert reports[0]["global"] == sum((next(iterator)["x"].tolist() for _ in range(STEPS)), []), (
        "the same batches as one process"
    )


def worker(port: str, process_id: int) -> None:
    """One process: its shard through train_batches, placed on the 4-device mesh, gathered back."""
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
    os.environ["JAX_PLATFORMS"] = "cpu"
    import jax
    import numpy as np

    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(f"127.0.0.1:{port}", num_processes=2, process_id=process_id)
    sys.path.insert(0, str(ROOT))
    from jax.experimental import multihost_utils

    from research import sharding
    from research.data import pipeline

    mesh = sharding.make_mesh({"data": -1, "fsdp": 1, "tensor": 1})
    iterator = iter(
        pipeline.train_batches(
            pipeline.array_source(x=np.arange(EXAMPLES, dtype=np.int32)), batch_size=GLOBAL_BATCH, seed=0
        )
    )
    local, seen = [], []
    for _ in range(STEPS):
        host_batch = next(iterator)
        local += host_batch["x"].tolist()
        batch = sharding.put_batch(host_batch, mesh)
        assert batch["x"].shape == (GLOBAL_BATCH,)
        seen += multihost_utils.process_allgather(batch["x"], tiled=True).tolist()
    print(json.dumps({"devices": jax.device_count(), "local": local, "global": seen}))


if __name__ == "__main__":
    worker(sys.argv[1], int(sys.argv[2]))
