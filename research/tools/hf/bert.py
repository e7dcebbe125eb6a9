"""BertForMaskedLM as research/models/bert.py's BertForMaskedLM: the post-LayerNorm encoder with segment
embeddings of published BERT. bert_pretrain's pre-LayerNorm encoder has no transformers equivalent, so
its export is refused in one line.

Torch Linear weights are transposed; attention kernels and biases are split into heads.
"""

import jax.numpy as jnp

from research.errors import ConfigError
from research.models.bert import LAYER_NORM_EPSILON, BertEncoder, BertForMaskedLM
from research.tools.hf.layout import Layout, Tensor, layer_norm, linear, reshaped, same, untied_head


def from_config(config: dict, **overrides) -> BertForMaskedLM:
    """The BertForMaskedLM a config.json describes (`overrides` go to the encoder: dtype, remat, ...)."""
    activation = config.get("hidden_act", "gelu")
    if activation not in ("gelu", "gelu_new", "gelu_pytorch_tanh"):
        raise ConfigError(f"hidden_act {activation!r}: this BERT's MLP is GELU")
    if config.get("position_embedding_type", "absolute") != "absolute":
        raise ConfigError(
            f"position_embedding_type {config['position_embedding_type']!r}: only absolute is implemented"
        )
    if config.get("layer_norm_eps", LAYER_NORM_EPSILON) != LAYER_NORM_EPSILON:
        raise ConfigError(f"layer_norm_eps {config['layer_norm_eps']}: this BERT's is {LAYER_NORM_EPSILON}")
    encoder = BertEncoder(
        vocab_size=config["vocab_size"],
        max_length=config["max_position_embeddings"],
        num_layers=config["num_hidden_layers"],
        num_heads=config["num_attention_heads"],
        width=config["hidden_size"],
        mlp_dim=config["intermediate_size"],
        num_segments=config.get("type_vocab_size", 2),
        dropout_rate=config.get("hidden_dropout_prob", 0.1),
        approximate_gelu=activation != "gelu",
        **overrides,
    )
    return BertForMaskedLM(encoder, tie_embeddings=bool(config.get("tie_word_embeddings", True)))


def to_config(model: BertForMaskedLM) -> dict:
    """The config.json of the same model as transformers' BertForMaskedLM (but its architecture and type)."""
    encoder = model.encoder
    if encoder.pre_layer_norm or encoder.num_segments == 0:
        raise ConfigError("a BertForMaskedLM is post-LayerNorm with segment embeddings: this encoder is not")
    return {
        "vocab_size": encoder.vocab_size,
        "hidden_size": encoder.width,
        "num_hidden_layers": encoder.num_layers,
        "num_attention_heads": encoder.num_heads,
        "intermediate_size": encoder.mlp_dim or 4 * encoder.width,
        "max_position_embeddings": encoder.max_length,
        "type_vocab_size": encoder.num_segments,
        "hidden_act": "gelu_new" if encoder.approximate_gelu else "gelu",
        "layer_norm_eps": LAYER_NORM_EPSILON,
        "hidden_dropout_prob": encoder.dropout_rate,
        "attention_probs_dropout_prob": encoder.dropout_rate,
        "tie_word_embeddings": model.tie_embeddings,
        "dtype": jnp.dtype(encoder.param_dtype).name,
    }


def tensors(model: BertForMaskedLM) -> list[Tensor]:
    """Every BertForMaskedLM tensor and the parameter it holds."""
    embeddings = {"word": "token", "position": "position", "token_type": "segment"}
    found = [
        same(f"bert.embeddings.{hf}_embeddings.weight", f"encoder/{ours}_embedding/embedding")
        for hf, ours in embeddings.items()
    ]
    found += layer_norm("bert.embeddings.LayerNorm", "encoder/embedding_norm")
    for index in range(model.encoder.num_layers):
        found += _block(model.encoder, f"bert.encoder.layer.{index}.", f"encoder/blocks_{index}/")
    found += [
        linear("cls.predictions.transform.dense.weight", "mlm_transform/kernel"),
        same("cls.predictions.transform.dense.bias", "mlm_transform/bias"),
        same("cls.predictions.bias", "mlm_bias"),
    ]
    found += layer_norm("cls.predictions.transform.LayerNorm", "mlm_norm")
    return found + untied_head(model.tie_embeddings, "cls.predictions.decoder.weight", "mlm_output/kernel")


def _block(encoder: BertEncoder, hf: str, ours: str) -> list[Tensor]:
    width = encoder.width
    head_shape = (encoder.num_heads, width // encoder.num_heads)
    found = []
    for name in ("query", "key", "value"):
        weight, path = f"{hf}attention.self.{name}", f"{ours}attention/{name}"
        found += [
            reshaped(f"{weight}.weight", f"{path}/kernel", (width, *head_shape), (width, width), transpose=True),
            reshaped(f"{weight}.bias", f"{path}/bias", head_shape, (width,)),
        ]
    found += [
        reshaped(
            f"{hf}attention.output.dense.weight",
            f"{ours}attention/out/kernel",
            (*head_shape, width),
            (width, width),
            transpose=True,
        ),
        same(f"{hf}attention.output.dense.bias", f"{ours}attention/out/bias"),
        linear(f"{hf}intermediate.dense.weight", f"{ours}mlp/fc_in/kernel"),
        same(f"{hf}intermediate.dense.bias", f"{ours}mlp/fc_in/bias"),
        linear(f"{hf}output.dense.weight", f"{ours}mlp/fc_out/kernel"),
        same(f"{hf}output.dense.bias", f"{ours}mlp/fc_out/bias"),
    ]
    found += layer_norm(f"{hf}attention.output.LayerNorm", f"{ours}attention_norm")
    return found + layer_norm(f"{hf}output.LayerNorm", f"{ours}mlp_norm")


LAYOUT = Layout("bert", "BertForMaskedLM", from_config, to_config, tensors)
