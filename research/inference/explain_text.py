"""Looking inside text models: attention maps per layer and head, and token attributions for text classifiers.

Attention maps: the attention modules (research/models/attention.py, llama.py) sow their weights
softmax(Q K^T / sqrt(K)) into an "attention" collection when it is mutable; here the run's forward pass is
applied with it mutable (through the experiment's `logits_fn` hook if it has one), in one jitted call, and
each example's maps are drawn as one PNG: a row per layer, a column per head, queries down, keys across.
GPT, Llama-style and BERT models (any model built on those modules).

Token attributions (text classifiers): integrated gradients over the token embeddings, from a baseline of
zero embeddings (positions and segments kept), summed over the embedding width: one number per token, and
completeness holds as for images (research/inference/explain.py). The token embedding is the first
nn.Embed the model calls on the token ids; it is replaced through flax's method interception, so no model
needs an extra input. Written as tokens.html, each piece shaded by its attribution (red for the explained
class, blue against), with true and predicted labels.

  python predict.py --workdir runs/bert_finetune_cpu --explain test --num_examples 8
  python predict.py --workdir runs/gpt --explain_text "ROMEO:"       # a given input's attention maps
"""

import html
import re
import time
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from research import experiment
from research.errors import ConfigError
from research.experiment import hook
from research.inference import explain, predict
from research.models.attention import ATTENTION_COLLECTION

MAPS_DRAWN = 4  # attention PNGs written per call (each is layers x heads panels)
MAX_TOKENS = 48  # tokens per attention map: the first ones of each example


class _Recording:
    """A model whose `apply` also returns the attention weights it sowed (kept in `sown`), for the hooks that
    call model.apply themselves."""

    def __init__(self, model: nn.Module):
        self.model, self.sown = model, None

    def apply(self, variables, *args, **kwargs):
        output, self.sown = self.model.apply(variables, *args, mutable=[ATTENTION_COLLECTION], **kwargs)
        return output

    def __getattr__(self, name):
        return getattr(self.model, name)


def _layer_order(path) -> list:
    """A sown leaf's path as a sort key in which block_10 comes after block_9."""
    name = "/".join(str(getattr(part, "key", part)) for part in path)
    return [int(piece) if piece.isdigit() else piece for piece in re.split(r"(\d+)", name)]


def attention_maps(run, tokens_BxL: np.ndarray) -> np.ndarray:
    """Layers x B x H x L x L attention weights of a batch of token ids (a scanned model's layers split)."""

    @jax.jit
    def forward(variables, tokens):
        recording = _Recording(run.model)
        experiment.logits_of(run.module, recording, variables, tokens)
        return recording.sown

    sown = forward(run.variables, jnp.asarray(tokens_BxL))
    leaves = sorted(jax.tree_util.tree_leaves_with_path(sown or {}), key=lambda item: _layer_order(item[0]))
    if not leaves:
        raise ConfigError(
            f"{run.name}'s model records no attention weights: attention maps cover GPT, Llama-style and BERT models"
        )
    layers = [leaf[None] if leaf.ndim == 4 else leaf for _, leaf in leaves]  # scanned: L x B x H x L x L already
    return np.concatenate([np.asarray(layer) for layer in layers])


def _embedded_logits(run, tokens_BxL, embeddings=None):
    """(logits, token embeddings) of the run on `tokens_BxL`, the embeddings replaced by `embeddings` if given."""
    captured = []

    def interceptor(next_fun, args, kwargs, context):
        is_token_embedding = (
            not captured
            and isinstance(context.module, nn.Embed)
            and context.method_name == "__call__"
            and getattr(args[0] if args else None, "shape", None) == tokens_BxL.shape
        )
        if not is_token_embedding:
            return next_fun(*args, **kwargs)
        captured.append(next_fun(*args, **kwargs) if embeddings is None else embeddings)
        return captured[0]

    with nn.intercept_methods(interceptor):
        logits = run.logits(tokens_BxL)
    if not captured:
        raise ConfigError(f"{run.name}'s model embeds no token ids with nn.Embed: token attributions need one")
    return logits, captured[0]


def token_attributions(run, tokens_BxL: np.ndarray, steps: int) -> explain.Attributions:
    """Integrated gradients per token (summed over the embedding width) of each example's predicted class."""
    tokens_BxL = jnp.asarray(tokens_BxL)
    _, embeddings_BxLxD = jax.jit(lambda tokens: _embedded_logits(run, tokens))(tokens_BxL)
    logits_fn = lambda embeddings: _embedded_logits(run, tokens_BxL, embeddings)[0]  # noqa: E731
    result = explain.attributions(logits_fn, np.asarray(embeddings_BxLxD), "integrated_gradients", steps)
    result.values = result.values.sum(axis=-1)  # B x L: sums are kept, so completeness is too
    result.inputs = np.asarray(tokens_BxL)
    return result


def pieces_of(run, ids) -> list[str]:
    """Each token id as text: the experiment's `token_pieces` hook, else its decode_tokens one id at a time."""
    token_pieces, decode = hook(run.module, "token_pieces"), hook(run.module, "decode_tokens")
    if token_pieces:
        return list(token_pieces(run.config, ids))
    return [decode(run.config, [int(i)]) if decode else str(int(i)) for i in ids]


def write_html(result: explain.Attributions, labels, names, pieces: list[list[str]], path: Path) -> None:
    """tokens.html: per example its labels, then its pieces shaded by attribution (scaled per example)."""
    rows = []
    for index, example_pieces in enumerate(pieces):
        values = result.values[index, : len(example_pieces)]
        limit = np.abs(values).max() or 1.0
        spans = []
        for piece, value in zip(example_pieces, values):
            colour = "255,0,0" if value > 0 else "0,0,255"
            text = html.escape(piece).replace("\n", "&#8629;<br>") or "&nbsp;"
            spans.append(
                f'<span title="{value:+.4f}" style="background:rgba({colour},{abs(value) / limit:.2f})">{text}</span>'
            )
        rows.append(
            f"<p><b>true {html.escape(names[labels[index]])} / pred {html.escape(names[result.predictions[index]])}</b>"
            f" (completeness gap {result.completeness_gap[index]:.2%})<br>{''.join(spans)}</p>"
        )
    path.write_text(
        "<html><meta charset='utf-8'><body style='font-family:monospace;white-space:pre-wrap'>"
        "<h3>integrated gradients per token for the predicted class (red: for it, blue: against)</h3>"
        + "\n".join(rows)
        + "</body></html>\n",
        encoding="utf-8",
    )


def plot_attention(maps_LxHxTxT: np.ndarray, pieces: list[str], title: str, path: Path) -> None:
    """One example's attention maps as a PNG: a row per layer, a column per head."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    layers, heads, count = maps_LxHxTxT.shape[0], maps_LxHxTxT.shape[1], len(pieces)
    size = max(1.6, 0.07 * count)
    figure, axes = plt.subplots(layers, heads, figsize=(size * heads + 1, size * layers + 1), squeeze=False)
    labels = [piece.replace("\n", "\\n") for piece in pieces]
    for layer in range(layers):
        for head in range(heads):
            axis = axes[layer, head]
            axis.imshow(maps_LxHxTxT[layer, head], cmap="viridis", vmin=0.0)  # each head on its own scale
            axis.set_xticks([])
            axis.set_yticks([])
            if layer == 0:
                axis.set_title(f"head {head}", fontsize=8)
            if head == 0:
                axis.set_ylabel(f"layer {layer}", fontsize=8)
    if count <= MAX_TOKENS:  # the last row names the keys, the first column the queries
        for head in range(heads):
            axes[-1, head].set_xticks(range(count), labels, rotation=90, fontsize=5)
        for layer in range(layers):
            axes[layer, 0].set_yticks(range(count), labels, fontsize=5)
    figure.suptitle(
        title + "\nrows: layers, columns: heads; queries down, keys across; each panel 0 to its maximum", fontsize=8
    )
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def explain_run(run, split: str | None, text: str | None, count: int, steps: int, directory: str | Path) -> str:
    """Attention maps (and, for a classifier, token attributions) of `text` or the first `count` examples of
    `split`, written into `directory`; returns the summary line."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    if text is not None:
        encode = hook(run.module, "encode_text")
        if encode is None:
            raise ConfigError(f"--explain_text needs an experiment with an encode_text hook; {run.name} has none")
        tokens, labels = np.asarray(encode(run.config, text), np.int32)[None], None
        if tokens.size == 0:
            raise ConfigError("--explain_text encodes to no tokens: give at least one character")
    else:
        tokens, labels = explain.first_examples(run, split, count)
    start = time.perf_counter()
    maps = attention_maps(run, tokens[:MAPS_DRAWN])
    written = []
    for index in range(min(len(tokens), MAPS_DRAWN)):
        real = tokens[index] if labels is None else np.trim_zeros(tokens[index], "b")  # a classifier's padding (0)
        shown = min(len(real), MAX_TOKENS)
        path = directory / f"attention_{index}.png"
        title = f"{run.name} step {run.step}, " + (f"{text!r}" if text is not None else f"{split} example {index}")
        plot_attention(maps[:, index, :, :shown, :shown], pieces_of(run, real[:shown]), title, path)
        written.append(path.name)
    line = f"{run.name} step {run.step}: attention maps ({maps.shape[0]} layers x {maps.shape[2]} heads)"
    np.savez(directory / "attention.npz", tokens=tokens[:MAPS_DRAWN], weights=maps)
    if labels is not None and not run.is_language_model:
        result = token_attributions(run, tokens, steps)
        names = predict.class_names(run, int(max(labels.max(), result.predictions.max())) + 1)
        pieces = [pieces_of(run, np.trim_zeros(row, "b")) for row in tokens]
        write_html(result, labels, names, pieces, directory / "tokens.html")
        np.savez(directory / "token_attributions.npz", tokens=tokens, labels=labels, attributions=result.values)
        gap = result.completeness_gap
        line += (
            f" and integrated gradients ({steps} steps) over {len(tokens)} {split} examples; completeness gap "
            f"median {np.median(gap):.2%}, max {gap.max():.2%}"
        )
        written.append("tokens.html")
    seconds = time.perf_counter() - start
    return line + f" in {seconds:.1f} s; wrote {', '.join(written)} in {directory}"
