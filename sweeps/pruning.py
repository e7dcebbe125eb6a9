"""Accuracy against sparsity: magnitude pruning (research/optim/pruning.py) to 0/50/75/90/95 % zeros.

  python launch.py --config experiments/digits_mlp.py --sweep sweeps/pruning.py --sweep_parallel 2
  python -m research.tools.report runs/pruning/digits_mlp --metric test/accuracy --against pruning.sparsity
The default schedule prunes from step 0 to three quarters of the run, then fine-tunes the survivors for
the last quarter (Zhu & Gupta 2017's gradual pruning). The measured curves are in docs/results.md.
"""


def get_sweep() -> dict:
    return {"pruning.sparsity": [0.0, 0.5, 0.75, 0.9, 0.95]}
