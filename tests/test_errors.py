"""One-line endings: which error is which exit status, and a device out of memory told from other failures."""

import jax
import pytest

from research import errors


def test_out_of_memory_is_told_from_other_runtime_errors():
    tpu = jax.errors.JaxRuntimeError(
        "RESOURCE_EXHAUSTED: XLA:TPU compile permanent error. Ran out of memory in memory space hbm. Used 32.00G of "
        "15.75G hbm. Exceeded hbm capacity by 16.25G.\n\nTotal hbm usage >= 32.25G:"
    )
    said = errors.out_of_memory(tpu)
    assert said.startswith("out of memory on cpu: Ran out of memory in memory space hbm. Used 32.00G of 15.75G hbm.")
    assert "\n" not in said and "batch_size" in said and "XLA_PYTHON_CLIENT_MEM_FRACTION" not in said  # no GPU
    assert errors.out_of_memory(jax.errors.JaxRuntimeError("INTERNAL: a failed collective")) == ""
    assert errors.out_of_memory(RuntimeError("Out of memory, said a library that is not XLA")) == ""


@pytest.mark.parametrize(
    "error, code, line",
    [
        (errors.ConfigError("batch_size is 0: it must be >= 1\nmore"), 2, "error: batch_size is 0: it must be >= 1"),
        (errors.MissingDataError("dataset 'x' is not available offline"), 2, "error: dataset 'x' is not available"),
        (errors.LossSpikeError("loss spike at steps 7-8", step=7), 3, "error: loss spike at steps 7-8"),
        (errors.StorageError("OSError: No space left on device"), 4, "error: OSError: No space left on device"),
        (
            jax.errors.JaxRuntimeError("RESOURCE_EXHAUSTED: Out of memory allocating 8 bytes."),
            6,
            "error: out of memory",
        ),
    ],
)
def test_each_failure_ends_in_one_line_and_its_exit_status(error, code, line, capsys):
    with pytest.raises(SystemExit) as ended, errors.exit_on_error():
        raise error
    assert ended.value.code == code
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 and lines[0].startswith(line)


def test_a_bug_keeps_its_traceback():
    with pytest.raises(KeyError), errors.exit_on_error():
        raise KeyError("a bug")
    with pytest.raises(RuntimeError, match="INTERNAL"), errors.exit_on_error():
        raise jax.errors.JaxRuntimeError("INTERNAL: a failed collective")
