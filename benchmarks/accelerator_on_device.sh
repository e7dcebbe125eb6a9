#!/usr/bin/env bash
# The accelerator check on a lent machine with no network, under that machine's own python3 (jax with its CUDA
# plugin already there), from the repository's root:
#   here:  python benchmarks/device_wheels.py --dest .whl      # the missing packages, ~16 MB, carried with the tree
#   there: bash benchmarks/accelerator_on_device.sh           # ~5 minutes on an H200, compilation included
# (arguments go on to accelerator.py: --tiny --steps=2 is what the test runs on a CPU)
# It installs the carried wheels beside the machine's packages (never over them), names the GPU, then runs
# benchmarks/accelerator.py and writes its table and JSON to $OUT (the tool's folder that comes back) or ./.
set -euo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-.}"
wheels="${WHEELS:-.whl}"  # the carried folder; the test names an empty one
if compgen -G "$wheels/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$wheels"/*.whl
  export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv 2>/dev/null || true
python3 -c "import jax; print('jax', jax.__version__, jax.devices())"
python3 -c "import importlib.metadata as m; print(*(f'{n} {m.version(n)}' for n in ('jaxlib', 'flax', 'optax',
  'orbax-checkpoint', 'numpy', 'grain', 'tensorflow-datasets')), sep=', ')" || true  # for the record
python3 benchmarks/accelerator.py --output "$out/accelerator.json" "$@" 2>&1 | tee "$out/accelerator.log"
