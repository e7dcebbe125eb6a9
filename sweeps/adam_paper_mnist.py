"""Kingma & Ba 2015 (Adam), figs. 1-2: SGD+Nesterov, AdaGrad, RMSProp and Adam on MNIST.

  python launch.py --config experiments/mnist_logreg.py:cpu --sweep sweeps/adam_paper_mnist.py --sweep_parallel 2
  python launch.py --config experiments/mnist_mlp.py:cpu --sweep sweeps/adam_paper_mnist.py --sweep_parallel 2
  python -m research.tools.report runs/adam_paper_mnist/mnist_logreg_cpu --metric train/loss --best_per optimizer.name
  python -m research.tools.report runs/adam_paper_mnist/mnist_mlp_cpu --metric train/loss --best_per optimizer.name
Fig. 1 (left) is logistic regression, fig. 2 (left) the 1000-1000 ReLU MLP with dropout; both
plot the training cost against epochs, minibatch 128. The paper tunes each method's learning
rate by a dense grid search and shows the best; here each method gets a half-decade grid of four
rates around its usual value, two seeds each (32 runs per model), and the report keeps each
method's best rate by final training loss. Expected, as the paper's findings: on logistic
regression Adam ~ SGD+Nesterov >> AdaGrad; on the MLP Adam (~ RMSProp) >> AdaGrad, Nesterov.
`:cpu` is the shipped 4,500-image subset, so a paper epoch of 60,000 images is ~13 of ours. About
15 minutes for both models on a quiet 2-core CPU; the measured table is in docs/results.md.
"""


def get_sweep() -> list[dict]:
    """Each optimizer over its own four learning rates, seeds 0 and 1."""
    seeds = [0, 1]
    return [
        {
            "optimizer.name": "nesterov",
            "optimizer.learning_rate": [0.3, 0.1, 0.03, 0.01],
            "seed": seeds,
        },  # momentum 0.9
        {"optimizer.name": "adagrad", "optimizer.learning_rate": [0.3, 0.1, 0.03, 0.01], "seed": seeds},
        {"optimizer.name": "rmsprop", "optimizer.learning_rate": [1e-2, 3e-3, 1e-3, 3e-4], "seed": seeds},  # decay 0.9
        {
            "optimizer.name": "adam",
            "optimizer.learning_rate": [1e-2, 3e-3, 1e-3, 3e-4],
            "seed": seeds,
        },  # b1 0.9, b2 0.999
    ]
