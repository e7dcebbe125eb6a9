"""Export a trained run for deployment without this codebase: the prediction function with its
parameters baked in, serialized by `jax.export` (StableHLO), plus a JSON manifest.

  DIR/model.jaxexport   jax.export.deserialize(bytes).call(inputs) -> logits (float32)
  DIR/manifest.json     input shape (batch is symbolic: any size) and dtype, output meaning,
                        class names or vocabulary, the experiment and its step

Loading needs only jax and numpy (docs/inference.md). With `quantized=True`
the artifact holds int8 kernels and their scales and dequantizes inside the function.
"""

import json
from pathlib import Path
from typing import Any

import jax
import numpy as np

from research.experiment import hook
from research.inference import quantize

ARTIFACT = "model.jaxexport"
MANIFEST = "manifest.json"
PLATFORMS = ("cpu", "cuda")  # lowered for both, so a GPU machine runs the same file


def _prediction_function(run, quantized: bool):
    """inputs -> float32 logits with the run's variables closed over (constants of the artifact)."""
    params = quantize.quantize(run.params) if quantized else run.params

    def predict(inputs):
        variables = {"params": quantize.dequantize(params) if quantized else params, **run.model_state}
        return run.logits(inputs, variables).astype(np.float32)

    return predict


def _labels(run, outputs: int) -> dict[str, Any]:
    """The manifest's names for the output axis: a vocabulary for language models, else class names."""
    from research.inference import predict

    if run.is_language_model:
        decode = hook(run.module, "decode_tokens")
        return {"vocabulary": [decode(run.config, [index]) for index in range(outputs)]}
    return {"class_names": predict.class_names(run, outputs)}


def export_run(run, directory: str | Path, *, quantized: bool = False) -> dict[str, Any]:
    """Writes the artifact and manifest of a `research.inference.predict.Run`; returns the manifest."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    (batch,) = jax.export.symbolic_shape("batch")
    example = run.example_inputs
    spec = jax.ShapeDtypeStruct((batch, *example.shape), example.dtype)
    exported = jax.export.export(jax.jit(_prediction_function(run, quantized)), platforms=PLATFORMS)(spec)
    artifact = exported.serialize()
    (directory / ARTIFACT).write_bytes(artifact)
    output = exported.out_avals[0]
    manifest = {
        "experiment": run.name,
        "step": run.step,
        "artifact": ARTIFACT,
        "artifact_bytes": len(artifact),
        "platforms": list(exported.platforms),
        "quantized_int8": quantized,
        "inputs": {"shape": ["batch", *example.shape], "dtype": str(np.dtype(example.dtype))},
        "outputs": {
            "shape": ["batch", *output.shape[1:]],
            "dtype": str(output.dtype),
            "meaning": "logits (softmax gives probabilities)",
        },
    } | _labels(run, output.shape[-1])
    (directory / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    return manifest
