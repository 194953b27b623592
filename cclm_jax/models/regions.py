"""Region tokens for region grounding (X-VLM / CCLM-4M), independent of the image tower.

An image tower's `encode_image` returns `(N, 1 + P, D)`: a pooled token 0 and P patch tokens (row-major grid).
A region batch has R rows, each naming its image (`idx_to_group_img`, (R,) int) and the patches its box
overlaps (`image_atts`, (R, 1 + P) {0, 1}, index 0 always 1). `pool_regions` turns the N encoded images into
the rows' inputs without encoding any image twice (the reference `SwinTransformer.forward(x, idx_to_group_img,
image_atts)`):

- region embeddings (R, 1 + P, D) = [mean of the image's patches weighted by `image_atts[:, 1:]`, all P
  patches]; `image_atts` is then the cross-attention mask of the row, so fusion sees token 0 and the region's
  patches only;
- full-image embeddings (R, 1 + P, D) = the row's image as encoded (token 0 = plain mean), for the box head.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


def pool_regions(image_embeds: jax.Array, idx_to_group_img: jax.Array,
                 image_atts: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(region_embeds, full_embeds), each (R, 1 + P, D), from image_embeds (N, 1 + P, D).

    The weighted mean is computed in float32 (sum_l w_l x_l / sum_l w_l) and cast to the embeddings' dtype. A row
    whose mask has no patch gets token 0 = 0 (the data never makes one: every box covers at least one cell).
    """
    full = jnp.take(image_embeds, idx_to_group_img.astype(jnp.int32), axis=0)
    patches = full[:, 1:]
    weights = image_atts[:, 1:].astype(jnp.float32)
    total = jnp.einsum("rl,rld->rd", weights, patches.astype(jnp.float32))
    token = total / jnp.maximum(weights.sum(axis=1, keepdims=True), 1e-12)
    region = jnp.concatenate([token[:, None].astype(full.dtype), patches], axis=1)
    return region, full
