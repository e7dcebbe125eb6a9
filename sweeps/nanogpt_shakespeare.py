"""nanoGPT's char-level Shakespeare (github.com/karpathy/nanoGPT, shakespeare_char) over three seeds.

  python launch.py --config experiments/shakespeare_gpt.py:cpu --sweep sweeps/nanogpt_shakespeare.py --sweep_parallel 2
  python launch.py --config experiments/shakespeare_gpt.py --sweep sweeps/nanogpt_shakespeare.py     # one GPU
  python -m research.tools.report runs/nanogpt_shakespeare/shakespeare_gpt_cpu --metric eval/loss
Published: val loss ~1.88 for the CPU run (4 layers, 128 wide, 2,000 iterations), 1.47 for the
GPU run (6 layers, 384 wide, 5,000 iterations). `--reproduce shakespeare_gpt:cpu` checks one seed
against the number; this sweep gives the seed spread. One `:cpu` run is ~4.5 min on a quiet
2-core CPU, so the three take ~10 min with --sweep_parallel 2 (each then on one core: slower).
"""


def get_sweep() -> dict:
    """Seeds 0-2 of the given config."""
    return {"seed": [0, 1, 2]}
