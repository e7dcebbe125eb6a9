"""Model FLOPs and the machine's peak: what throughput and MFU (model FLOPs utilisation) are measured against.

Training FLOPs are 3x the forward pass's (the backward pass multiplies twice: by the weights for
the input gradient and by the activations for the weight gradient; Kaplan et al. 2020). Only
matrix multiplies and convolutions are counted; elementwise work is not "model FLOPs".
benchmarks/train_speed.py checks each count against XLA's cost analysis of the compiled step.
"""

import functools
import time
from pathlib import Path
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from research.errors import ConfigError
from research.experiment import DecoderShape, hook
from research.logger import Throughput
from research.models import moe, pipeline

PEAK_MATMUL_SIZE = 1024  # float32 1024^2 matmuls: ~2 GFLOP each, big enough to reach the BLAS peak on a CPU


def gpt_training_flops_per_token(
    parameters: int, num_layers: int, width: int, length: int, windows: Sequence[int] = ()
) -> float:
    """6 N (Kaplan et al. 2020) plus attention's scores and weighted sum: 3 x 2 x 2 x L x D per layer, a layer
    with a window w < L counting w keys instead of L (`windows`: each layer's, 0 for every position).

    The attention term counts the full L x L products, the usual convention (Chowdhery et al. 2022,
    appendix B); research.models.attention skips most of the causally masked blocks, so XLA counts
    ~4% fewer FLOPs for the benchmarked GPTs (benchmarks/train_speed.py prints the ratio)."""
    keys = sum(min(window or length, length) for window in windows) if windows else num_layers * length
    return 6.0 * parameters + 12.0 * keys * width


def conv_flops(height: int, width: int, kernel: int, in_channels: int, out_channels: int) -> float:
    """Forward FLOPs of one convolution producing a height x width map (2 per multiply-add)."""
    return 2.0 * height * width * kernel * kernel * in_channels * out_channels


def cnn_training_flops_per_example(
    image_size: int, in_channels: int, conv_features: Sequence[int], dense_features: int, classes: int
) -> float:
    """research.models.cnn.CNN: 3x3 SAME convolutions each followed by a 2x2 pool, then two dense layers."""
    forward, size, channels = 0.0, image_size, in_channels
    for features in conv_features:
        forward += conv_flops(size, size, 3, channels, features)
        size, channels = size // 2, features
    forward += 2.0 * size * size * channels * dense_features + 2.0 * dense_features * classes
    return 3.0 * forward


def resnet_training_flops_per_example(depth: int, width: int, classes: int, image_size: int = 32) -> float:
    """research.models.resnet.CifarResNet: stem, three stages of (depth - 2) / 6 basic blocks, classifier."""
    blocks = (depth - 2) // 6
    forward = conv_flops(image_size, image_size, 3, 3, width)
    channels = width
    for stage in range(3):
        features, size = width * 2**stage, image_size // 2**stage
        for _ in range(blocks):
            forward += conv_flops(size, size, 3, channels, features) + conv_flops(size, size, 3, features, features)
            channels = features
    forward += 2.0 * channels * classes
    return 3.0 * forward


@functools.cache  # a property of the machine: measured once per process
def measure_peak_flops(size: int = PEAK_MATMUL_SIZE, repeats: int = 10) -> float:
    """float32 FLOP/s of a jitted square matmul on the default device: the best of `repeats` timed chains."""
    a = jax.random.normal(jax.random.PRNGKey(0), (size, size), jnp.float32)
    matmul = jax.jit(lambda x, y: x @ y)
    jax.block_until_ready(matmul(a, a))  # compile
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(matmul(a, a))
        best = min(best, time.perf_counter() - start)
    return 2.0 * size**3 / best


def machine_peak_flops(peak_tflops: float = 0.0) -> float:
    """FLOP/s of all local devices: `peak_tflops` per device if given, else measured (CPU devices share one peak)."""
    per_device = peak_tflops * 1e12 if peak_tflops else measure_peak_flops()
    devices = jax.local_devices()
    # Fake CPU devices (--xla_force_host_platform_device_count) split the same cores: one peak in all.
    return per_device if devices[0].platform == "cpu" else per_device * len(devices)


def xla_flops(compiled) -> float:
    """FLOPs of a compiled function by XLA's cost analysis (per device for an SPMD program)."""
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    return float(cost.get("flops", 0.0)) if cost else float("nan")


def median(values: Sequence[float]) -> float:
    return float(np.median(np.asarray(values, np.float64)))


def throughput_of(config: ml_collections.ConfigDict, experiment: Any) -> Throughput:
    """Tokens and training FLOPs per example from the experiment's optional `tokens_per_example` and
    `flops_per_example`; the peak is `config.peak_tflops` per device, or measured (~0.3 s) when 0."""
    tokens, flops = hook(experiment, "tokens_per_example"), hook(experiment, "flops_per_example")
    return Throughput(
        tokens_per_example=tokens(config) if tokens else 0,
        flops_per_example=flops(config) if flops else 0.0,
        peak_flops=machine_peak_flops(config.peak_tflops) if flops else 0.0,
    )


class StepProfiler:
    """Traces steps FIRST..LAST of config.profile_steps ("FIRST,LAST", "" off) with jax.profiler into `directory`."""

    def __init__(self, steps: str, directory: str | Path):
        self.first = self.last = None
        self.directory, self.tracing = str(directory), False
        if not steps:
            return
        try:
            self.first, self.last = (int(part) for part in steps.split(","))
        except ValueError:
            raise ConfigError(
                f"profile_steps must be 'FIRST,LAST' (two step numbers, e.g. '10,20'), not {steps!r}"
            ) from None
        if not 1 <= self.first <= self.last:
            raise ConfigError(f"profile_steps {steps!r}: need 1 <= FIRST <= LAST")

    def before(self, step: int) -> None:
        """Starts the trace before step FIRST is dispatched."""
        if step == self.first:
            jax.profiler.start_trace(self.directory)
            self.tracing = True

    def after(self, step: int, state: Any) -> None:
        """Stops the trace once step LAST has finished on the device (the one host sync, only then)."""
        if step == self.last and self.tracing:
            jax.block_until_ready(state)
            self.close()

    def close(self) -> None:
        """Ends a trace still open (a run that stopped inside the range)."""
        if self.tracing:
            jax.profiler.stop_trace()
            self.tracing = False


def decoder_of(config: ml_collections.ConfigDict, experiment: Any) -> DecoderShape | None:
    """The experiment's `decoder_shape` hook's answer; None for a model that is not a decoder."""
    shape = hook(experiment, "decoder_shape")
    return shape(config) if shape else None


def decoder_activation_bytes(shape: DecoderShape, tensor: int = 1, expert: int = 1) -> float:
    """Activation memory of one example through a pre-norm decoder (Llama layout) for training, `tensor` and
    `expert` the mesh's axes: what the backward pass keeps under the remat policy (research/models/transformer.py),
    plus the peak while one layer is recomputed and differentiated, plus the loss head's logits (float32) and
    their gradient. Per layer and token without rematerialisation: 4 D-wide values (block input, two norm
    outputs, the attention's residual sum), query, key and value, the attention output, the MLP's values
    (mlp_bytes); XLA's attention also keeps the H x L float32 weights of each query, a fused kernel only its
    softmax statistics. `tensor` splits heads and SwiGLU units (not the D-wide values)."""
    length, width, size = shape.length, shape.width, shape.dtype_bytes
    query, key_value = shape.heads * shape.head_dim, shape.kv_heads * shape.head_dim
    mlp_every, mlp_kept = mlp_bytes(shape, tensor, expert)
    scores = shape.heads / tensor * (4 * (1 if shape.fused_attention else length))
    every = size * (4 * width + (2 * query + 2 * key_value) / tensor) + mlp_every + scores  # per token, per layer
    matmul_outputs = size * ((query + 2 * key_value) / tensor + width) + mlp_kept
    kept = {
        "none": every,
        "full": size * width,
        "dots": matmul_outputs + (0 if shape.fused_attention else scores),
        "dots_no_batch": matmul_outputs,
    }[shape.remat]
    recompute = 0.0 if shape.remat == "none" else 2 * every  # one layer's activations and their gradients at a time
    head = 2 * 4 * (min(shape.loss_chunk, length) if shape.loss_chunk else length) * shape.vocab / tensor
    return length * (shape.layers * kept + recompute) + head


def mlp_bytes(shape: DecoderShape, tensor: int = 1, expert: int = 1) -> tuple[float, float]:
    """(bytes per token and layer the MLP holds for training, those of them a dots policy keeps). Dense: the 3
    SwiGLU values (gate, up, their product), the policy keeping the two matmuls'. A mixture of experts
    (research/models/moe.py): each token's k = experts_per_token copies travel in a buffer whose every row is
    computed, moe.dispatch_rows per token (dropless: one block per expert shard, each sized for as many copies as
    could go to it; capacity: capacity_factor x k), each row with 3 SwiGLU values and 3 D-wide ones (the row
    received, its copy sorted by expert, the expert's output); then the k outputs in token order and the router's
    float32 logits and probabilities. The experts' matmuls are no dots a policy keeps: only the router's are."""
    size = shape.dtype_bytes
    if not shape.experts:
        return size * 3 * shape.mlp_dim / tensor, size * 2 * shape.mlp_dim / tensor
    rows = moe.dispatch_rows(shape.experts, shape.experts_per_token, expert, shape.capacity_factor)
    values = rows * (3 * shape.mlp_dim / tensor + 3 * shape.width) + shape.experts_per_token * shape.width
    return size * values + 2 * 4 * shape.experts, 4 * shape.experts


def active_parameters(shape: DecoderShape, total: int) -> int:
    """Of a decoder's `total` parameters, those one token uses: all less the experts it is not routed to
    (research/models/moe.py's inactive_parameters; all of them for a dense decoder)."""
    inactive = moe.inactive_parameters(shape.layers, shape.experts, shape.experts_per_token, shape.width, shape.mlp_dim)
    return total - inactive


def expert_parameters(shape: DecoderShape) -> int:
    """The experts' parameters (gate, up and down, width x mlp_dim each, per expert and layer): split over the
    mesh's expert axis, where the rest of the decoder is not; 0 for a dense decoder."""
    return shape.layers * shape.experts * 3 * shape.width * shape.mlp_dim


def expert_exchange_bytes(shape: DecoderShape, expert: int, tokens: float) -> float:
    """Bytes one device sends in one all-to-all of a mixture-of-experts layer over `expert` shards for `tokens`
    tokens of its own: its buffer holds moe.dispatch_rows x tokens rows of width (research/models/moe.py), of
    which a ring sends (expert - 1) / expert (research/tools/hlo.py)."""
    if not shape.experts:
        return 0.0
    rows = moe.dispatch_rows(shape.experts, shape.experts_per_token, expert, shape.capacity_factor)
    return (expert - 1) / expert * rows * tokens * shape.width * shape.dtype_bytes


def pipeline_schedule(shape: DecoderShape, stages: int) -> tuple[int, int, int]:
    """(micro-batches, repeats, iterations) of a decoder's pipeline over `stages` (research/models/pipeline.py)."""
    microbatches, repeats = shape.pipeline[0] or stages, shape.pipeline[1]
    return microbatches, repeats, repeats * microbatches + stages - 1


def pipeline_bubble(shape: DecoderShape, stages: int) -> float:
    """The share of a pipeline's iterations a stage idles (0 without stages): research/models/pipeline.py's bubble."""
    microbatches, repeats, _ = pipeline_schedule(shape, stages)
    return pipeline.bubble(stages, microbatches, repeats)


def pipeline_activation_bytes(shape: DecoderShape, per_example: float, examples: float, stages: int, context=1):
    """A device's activations under a pipeline of `stages`, `examples` per batch shard (`per_example`: all the
    layers' bytes for one): a stage's layers for every iteration's micro-batch; or, rematerialising whole stages,
    one residual stream per iteration and one stage's layers of one micro-batch while it is recomputed."""
    microbatches, repeats, iterations = pipeline_schedule(shape, stages)
    rows = examples / microbatches
    if not shape.pipeline[2]:
        return per_example * rows * iterations / stages
    stream = rows * shape.length / context * shape.width * shape.dtype_bytes
    return per_example * rows / (stages * repeats) + iterations * stream
