"""A student alone against the same student distilled from a teacher (research/features/distill.py), over 3 seeds.

  python launch.py --config experiments/mnist_cnn.py:cpu --workdir runs/mnist_cnn_cpu      # the teacher
  python launch.py --config experiments/mnist_mlp.py:cpu --sweep sweeps/distillation.py --sweep_parallel 2
  python -m research.tools.report runs/distillation/mnist_mlp_cpu --metric test/accuracy
Same data, steps and optimizer in both arms; the distilled one adds the teacher's soft targets at the
default weights (0.5 task loss + 0.5 x T^2 KL, T 2). The measured table is in docs/results.md.
"""


def get_sweep() -> dict:
    return {"distill.teacher": ["", "runs/mnist_cnn_cpu"], "seed": [0, 1, 2]}
