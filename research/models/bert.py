"""BERT-style bidirectional encoder with masked-LM, next-sentence, cloze and classification heads
(Devlin et al. 2019, "BERT: Pre-training of deep bidirectional transformers for language understanding").

`BertEncoder`: token + learned position (+ optional segment) embeddings, `num_layers` Transformer
blocks (research/models/transformer.py) with GELU MLPs and a padding mask; post-LayerNorm as in
BERT, or `pre_layer_norm=True` (Xiong et al. 2020), which trains stably without warm-up. Every task
model takes the encoder as a field, so its parameters sit under "encoder" in every tree: a
pre-trained `BertForMaskedLM`'s params["encoder"] drops into a `BertClassifier` unchanged.
  `BertForMaskedLM`: dense - GELU - LayerNorm, then logits from the token embedding transposed
  (tied, as BERT) or, with `tie_embeddings=False`, from an output matrix of its own (Chung et al.
  2021: decoupled embeddings transfer better; the input embedding is then trained only where read).
  `BertForPreTraining`: the masked LM plus BERT's next-sentence head (pooler on [CLS], 2 logits).
  `BertClozeClassifier`: the masked LM read at one [MASK] slot over K label words (prompt-based).
  `BertClassifier`: the [CLS] state or (`pooling="mean"`) the mean of the real tokens' states
  (Reimers & Gurevych 2019), through BERT's dense tanh pooler, dropout and a dense layer.
Inputs: tokens_BxL (int), mask_BxL (1 for real tokens; None: all real), segments_BxL (None: all 0).
Logits are float32. Legend: B batch, L sequence length, D width, V vocabulary, K classes.
"""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from research.models.transformer import remat_block

INIT = nn.initializers.normal(0.02)
LAYER_NORM_EPSILON = 1e-12


class BertEncoder(nn.Module):
    """tokens_BxL -> contextual states_BxLxD; `attend` maps states to vocabulary logits by the token embedding."""

    vocab_size: int
    max_length: int
    num_layers: int
    num_heads: int
    width: int
    mlp_dim: int | None = None  # None: 4 * width
    num_segments: int = 2  # 0: no segment embedding
    dropout_rate: float = 0.1
    pre_layer_norm: bool = False
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    remat: str = "none"  # a transformer.REMAT_POLICIES name: what each block's backward pass recomputes
    approximate_gelu: bool = True  # GELU's tanh approximation; False: exact (Hugging Face BERT's "gelu")

    def setup(self) -> None:
        """Submodules; their attribute names are the parameter tree's keys."""
        types = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        self.token_embedding = nn.Embed(self.vocab_size, self.width, embedding_init=INIT, **types)
        self.position_embedding = nn.Embed(self.max_length, self.width, embedding_init=INIT, **types)
        if self.num_segments:
            self.segment_embedding = nn.Embed(self.num_segments, self.width, embedding_init=INIT, **types)
        norm = nn.LayerNorm(epsilon=LAYER_NORM_EPSILON, **types)
        if self.pre_layer_norm:
            self.final_norm = norm
        else:
            self.embedding_norm = norm
        block = remat_block(self.remat)
        self.blocks = [
            block(
                num_heads=self.num_heads,
                mlp_dim=self.mlp_dim or 4 * self.width,
                dropout_rate=self.dropout_rate,
                pre_layer_norm=self.pre_layer_norm,
                layer_norm_epsilon=LAYER_NORM_EPSILON,
                kernel_init=INIT,
                output_kernel_init=INIT,
                approximate_gelu=self.approximate_gelu,
                **types,
            )
            for _ in range(self.num_layers)
        ]
        self.dropout = nn.Dropout(self.dropout_rate)

    def __call__(
        self,
        tokens_BxL: jax.Array,
        mask_BxL: jax.Array | None = None,
        segments_BxL: jax.Array | None = None,
        *,
        deterministic: bool = True,
    ) -> jax.Array:
        length = tokens_BxL.shape[-1]
        if length > self.max_length:
            raise ValueError(f"sequence length {length} exceeds max_length {self.max_length}")
        x_BxLxD = self.token_embedding(tokens_BxL) + self.position_embedding(jnp.arange(length))
        if self.num_segments:
            segments_BxL = jnp.zeros_like(tokens_BxL) if segments_BxL is None else segments_BxL
            x_BxLxD = x_BxLxD + self.segment_embedding(segments_BxL)
        if not self.pre_layer_norm:
            x_BxLxD = self.embedding_norm(x_BxLxD)
        x_BxLxD = self.dropout(x_BxLxD, deterministic=deterministic)
        mask_Bx1xLxL = None if mask_BxL is None else nn.make_attention_mask(mask_BxL > 0, mask_BxL > 0)
        for block in self.blocks:
            x_BxLxD = block(x_BxLxD, mask_Bx1xLxL, deterministic)
        return self.final_norm(x_BxLxD) if self.pre_layer_norm else x_BxLxD

    def attend(self, x_BxLxD: jax.Array) -> jax.Array:
        """Logits over the vocabulary by similarity to each token's input embedding (tied output layer)."""
        return self.token_embedding.attend(x_BxLxD)


class BertForMaskedLM(nn.Module):
    """Predicts every position's token (the loss keeps only the masked ones): logits_BxLxV."""

    encoder: BertEncoder
    tie_embeddings: bool = True  # False: the head's own D x V output matrix ("mlm_output")

    def setup(self) -> None:
        """The MLM head; its attribute names are the parameter tree's keys."""
        types = dict(dtype=self.encoder.dtype, param_dtype=self.encoder.param_dtype)
        self.mlm_transform = nn.Dense(self.encoder.width, kernel_init=INIT, **types)
        self.mlm_norm = nn.LayerNorm(epsilon=LAYER_NORM_EPSILON, **types)
        self.mlm_bias = self.param(
            "mlm_bias", nn.initializers.zeros, (self.encoder.vocab_size,), self.encoder.param_dtype
        )
        if not self.tie_embeddings:
            self.mlm_output = nn.Dense(self.encoder.vocab_size, use_bias=False, kernel_init=INIT, **types)

    def predict(self, x_BxLxD: jax.Array) -> jax.Array:
        """Vocabulary logits (float32) from encoder states of any leading shape."""
        x_BxLxD = self.mlm_norm(nn.gelu(self.mlm_transform(x_BxLxD), approximate=self.encoder.approximate_gelu))
        logits_BxLxV = self.encoder.attend(x_BxLxD) if self.tie_embeddings else self.mlm_output(x_BxLxD)
        return (logits_BxLxV + self.mlm_bias).astype(jnp.float32)

    def __call__(self, tokens_BxL, mask_BxL=None, segments_BxL=None, *, deterministic: bool = True) -> jax.Array:
        return self.predict(self.encoder(tokens_BxL, mask_BxL, segments_BxL, deterministic=deterministic))


class BertForPreTraining(BertForMaskedLM):
    """BERT's two pre-training heads: the masked-LM logits_BxLxV and next-sentence logits_Bx2 from
    the [CLS] state through the pooler (dense, tanh), which BertClassifier shares by name."""

    def setup(self) -> None:
        super().setup()
        types = dict(dtype=self.encoder.dtype, param_dtype=self.encoder.param_dtype)
        self.pooler = nn.Dense(self.encoder.width, kernel_init=INIT, **types)
        self.next_sentence = nn.Dense(2, kernel_init=INIT, **types)

    def __call__(self, tokens_BxL, mask_BxL=None, segments_BxL=None, *, deterministic: bool = True):
        x_BxLxD = self.encoder(tokens_BxL, mask_BxL, segments_BxL, deterministic=deterministic)
        next_Bx2 = self.next_sentence(nn.tanh(self.pooler(x_BxLxD[:, 0]))).astype(jnp.float32)
        return self.predict(x_BxLxD), next_Bx2


class BertClozeClassifier(BertForMaskedLM):
    """Classifies by the masked-LM head's guess at one [MASK] slot: logits_BxK are its logits for
    the K label words (prompt-based fine-tuning, as PET and LM-BFF: Schick & Schuetze 2021, Gao et
    al. 2021). The parameter tree is BertForMaskedLM's, so a pre-trained MLM is restored whole,
    head included, and no layer starts at random."""

    position: int = 1  # where the inputs hold the [MASK] slot
    label_ids: tuple[int, ...] = ()  # the vocabulary id standing for each class

    def __call__(self, tokens_BxL, mask_BxL=None, segments_BxL=None, *, deterministic: bool = True) -> jax.Array:
        if not self.label_ids:
            raise ValueError("BertClozeClassifier needs label_ids: one vocabulary id per class")
        x_BxLxD = self.encoder(tokens_BxL, mask_BxL, segments_BxL, deterministic=deterministic)
        return self.predict(x_BxLxD[:, self.position])[:, jnp.asarray(self.label_ids)]


class BertClassifier(nn.Module):
    """Classifies each sequence from its first ([CLS]) token or its tokens' mean: logits_BxK."""

    encoder: BertEncoder
    num_classes: int
    dropout_rate: float = 0.1
    pooling: str = "cls"  # or "mean": over the tokens the mask calls real

    @nn.compact
    def __call__(self, tokens_BxL, mask_BxL=None, segments_BxL=None, *, deterministic: bool = True) -> jax.Array:
        types = dict(dtype=self.encoder.dtype, param_dtype=self.encoder.param_dtype)
        x_BxLxD = self.encoder(tokens_BxL, mask_BxL, segments_BxL, deterministic=deterministic)
        if self.pooling == "cls":
            summary_BxD = x_BxLxD[:, 0]
        elif self.pooling == "mean":
            weights_BxL = (
                jnp.ones(tokens_BxL.shape, x_BxLxD.dtype) if mask_BxL is None else (mask_BxL > 0).astype(x_BxLxD.dtype)
            )
            summary_BxD = jnp.einsum("bld,bl->bd", x_BxLxD, weights_BxL) / jnp.maximum(
                weights_BxL.sum(-1, keepdims=True), 1
            )
        else:
            raise ValueError(f"pooling must be 'cls' or 'mean', not {self.pooling!r}")
        pooled_BxD = nn.tanh(nn.Dense(self.encoder.width, kernel_init=INIT, name="pooler", **types)(summary_BxD))
        pooled_BxD = nn.Dropout(self.dropout_rate, deterministic=deterministic)(pooled_BxD)
        return nn.Dense(self.num_classes, kernel_init=INIT, name="classifier", **types)(pooled_BxD).astype(jnp.float32)
