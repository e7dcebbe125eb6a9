"""Kingma & Ba 2015 (Adam), figs. 1-2: SGD+Nesterov, AdaGrad, RMSProp and Adam on MNIST.

  python launch.py --config experiments/mnist_logreg.py:cpu --sweep sweeps/adam_paper_mnist.py --sweep_parallel 2
  python launch.py --config experiments/mnist_mlp.py:cpu --sweep sweeps/adam_paper_mnist.py --sweep_parallel 2
  python -m research.tools.report runs/adam_paper_mnist/mnist_logreg_cpu --metric train/loss --best_per optimizer.name
  python -m research.tools.report runs/adam_paper_mnist/mnist_mlp_cpu --metric train/loss --best_per optimizer.name
Fig. 1 (left) is logistic regression, fig. 2 (left) the 1000-1000 ReLU MLP with dropout; both
plot the training cost against epochs, minibatch 128. The paper tunes each method's learning
rate (and momentum) by a dense grid search and shows the best; here each method gets a
half-decade grid of four rates around its usual value, two seeds each (32 runs per model), and
the report keeps each method's best rate by final training loss. Its findings: on logistic
regression "Adam yields similar convergence as SGD with momentum and both converge faster than
Adagrad"; on the MLP with dropout Adam converges faster than the other methods.
`:cpu` is the shipped 4,500-image subset (45 epochs for logistic regression, 60 for the MLP),
so a paper epoch of 60,000 images is ~13 of ours: the curves cover the paper's first few epochs.
Sized for a 2-core CPU: one run costs ~12 s of CPU (logistic regression) or ~62 s (MLP, 2,100
steps; 32 s at 1,050). Timed on a quiet machine with --sweep_parallel 2 (2026-11-23): logistic
regression 2 min 8 s, the MLP at 2,100 steps 13 min 8 s. At 2,100 steps every MLP run memorises
the 4,500 images (final train loss 0.021-0.029: rmsprop 1e-3, adam 3e-4, nesterov 0.03, adagrad
0.1, within the seed spread), so the paper's Adam lead shows in the 30-epoch run below.

MEASURED (2026-11-23, 2-core CPU shared with other jobs at load 7-20: wall times inflated 3-6x;
the MLP sweep ran at 1,050 steps, 30 epochs of 4,500 images, `--config.num_steps=1050
--config.eval_every=525`, to fit). Best rate per method by final training loss, mean ± std of 2 seeds:

  logistic regression (1,575 steps)          MLP + dropout (1,050 steps)
  adam      lr 0.01  train loss 0.0457 ± 0.0001   rmsprop   lr 1e-3  0.0384 ± 0.0020
  rmsprop   lr 0.01             0.0485 ± 0.0013   adam      lr 1e-3  0.0398 ± 0.0011
  nesterov  lr 0.3              0.0566 ± 0.0003   adagrad   lr 0.1   0.0685 ± 0.0035
  adagrad   lr 0.3              0.1229 ± 0.0015   nesterov  lr 0.03  0.0707 ± 0.0034

As in fig. 1, Adam and SGD+Nesterov are close and AdaGrad is far behind on logistic regression. As
in fig. 2, Adam beats AdaGrad and SGD+Nesterov on the MLP by ~1.7x in final training loss; RMSProp
ties with Adam (within the seed spread), where the paper shows Adam ahead: at these rates RMSProp
is Adam without momentum and bias correction, which matter mostly in the first steps, and the
paper's comparison ran 200 epochs of 60,000 images against our 30 of 4,500. On logistic regression
every method's best rate is the top of its grid: on 4,500 images the training loss keeps falling
with the rate while the validation loss rises (overfitting), so that ranking is of the grid's top
points; at every grid position AdaGrad is last by 1.5-2.7x, while Adam, RMSProp and Nesterov stay
within ~35 % of one another in an order that changes with the position.
"""


def get_sweep() -> list[dict]:
    """Each optimizer over its own four learning rates, seeds 0 and 1."""
    seeds = [0, 1]
    return [
        {"optimizer.name": "nesterov", "optimizer.learning_rate": [0.3, 0.1, 0.03, 0.01], "seed": seeds},  # momentum 0.9
        {"optimizer.name": "adagrad", "optimizer.learning_rate": [0.3, 0.1, 0.03, 0.01], "seed": seeds},
        {"optimizer.name": "rmsprop", "optimizer.learning_rate": [1e-2, 3e-3, 1e-3, 3e-4], "seed": seeds},  # decay 0.9
        {"optimizer.name": "adam", "optimizer.learning_rate": [1e-2, 3e-3, 1e-3, 3e-4], "seed": seeds},  # b1 0.9, b2 0.999
    ]
