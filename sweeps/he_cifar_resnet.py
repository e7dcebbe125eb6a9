"""He et al. 2016, Table 6: CIFAR-10 test accuracy of ResNet-20/32/56 (needs the data and a GPU).

  python launch.py --config experiments/cifar10_resnet.py --sweep sweeps/he_cifar_resnet.py --sweep_emit  # a job a line
  python launch.py --config experiments/cifar10_resnet.py --sweep sweeps/he_cifar_resnet.py  # one GPU, in turn
  python -m research.tools.report runs/he_cifar_resnet/cifar10_resnet --metric test/accuracy
Published test accuracy: 91.25 % (20 layers), 92.49 % (32), 93.03 % (56), 64k iterations of
batch 128 each (the recipe is in experiments/cifar10_resnet.py); `--reproduce cifar10_resnet`
checks the same three numbers with PASS/FAIL. Needs cifar-10-binary.tar.gz in the tfds manual
directory. Not run here: no CIFAR-10 offline and no GPU on the development machine.
"""


def get_sweep() -> dict:
    """The three depths of the table, one seed each (the paper reports single runs for these)."""
    return {"model.depth": [20, 32, 56], "seed": 0}
