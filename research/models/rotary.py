"""Rotary position embeddings (Su et al. 2021, RoFormer) in the rotate-half layout of Hugging Face's decoders,
with the context extensions the published models use: linear position interpolation (Chen et al. 2023; Gemma 3's
global layers) and Llama 3.1's frequency-dependent scaling.

Legend: B batch, L sequence length, N heads, Dh head width.
"""

import jax
import jax.numpy as jnp


def rotary_angles(
    positions_L: jax.Array, head_dim: int, theta: float, scaling: tuple = ()
) -> tuple[jax.Array, jax.Array]:
    """(cos, sin), each L x Dh, of the rotary embedding at these positions (the two halves of Dh repeat).

    `scaling` (factor,) is linear position interpolation (Gemma 3's global layers: every frequency divided
    by `factor`); (factor, low_frequency_factor, high_frequency_factor, original_context) is Llama 3.1's
    context extension: wavelengths longer than original_context / low_frequency_factor are slowed by
    `factor`, shorter than original_context / high_frequency_factor kept, and those between blended."""
    inverse_frequencies = 1.0 / theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim)
    if len(scaling) == 1:
        inverse_frequencies = inverse_frequencies / scaling[0]
    elif scaling:
        factor, low, high, context = scaling
        wavelengths = 2 * jnp.pi / inverse_frequencies
        blend = (context / wavelengths - low) / (high - low)
        blended = (1 - blend) * inverse_frequencies / factor + blend * inverse_frequencies
        inverse_frequencies = jnp.where(
            wavelengths > context / low,
            inverse_frequencies / factor,
            jnp.where(wavelengths < context / high, inverse_frequencies, blended),
        )
    angles_LxHalf = positions_L.astype(jnp.float32)[:, None] * inverse_frequencies[None, :]
    angles_LxDh = jnp.concatenate([angles_LxHalf, angles_LxHalf], axis=-1)
    return jnp.cos(angles_LxDh), jnp.sin(angles_LxDh)


def apply_rotary(x_BxLxNxDh: jax.Array, cos_LxDh: jax.Array, sin_LxDh: jax.Array) -> jax.Array:
    """Rotates each pair (i, i + Dh/2) of every head by its position's angle, in float32."""
    x = x_BxLxNxDh.astype(jnp.float32)
    first, second = jnp.split(x, 2, axis=-1)
    rotated_half = jnp.concatenate([-second, first], axis=-1)
    out = x * cos_LxDh[None, :, None, :] + rotated_half * sin_LxDh[None, :, None, :]
    return out.astype(x_BxLxNxDh.dtype)
