"""On-device image normalisation (JAX, no TensorFlow: accelerator images without TensorFlow run the steps).

`normalize(images)`: uint8 (N, H, W, 3) NHWC -> float32 (N, H, W, 3), `(x / 255 - mean) / std` with the CLIP
statistics; `prepare_batch(batch)` applies it to a batch's uint8 images (`IMAGE_KEYS`) inside the jitted losses
and predictions (host pipelines ship uint8, a quarter of the float32 bytes).
"""
import jax.numpy as jnp
import numpy as np

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGE_KEYS = ("image", "image_2")  # image_2: the right image of an NLVR / MaRVL pair


def normalize(images):
    """uint8 (N, H, W, 3) NHWC -> float32 (N, H, W, 3) normalised with the CLIP mean/std (jit-able)."""
    x = jnp.asarray(images).astype(jnp.float32) / 255.0
    return (x - jnp.asarray(CLIP_MEAN, jnp.float32)) / jnp.asarray(CLIP_STD, jnp.float32)


def prepare_batch(batch):
    """A device batch with its uint8 images (`IMAGE_KEYS`) normalised to float32 (`normalize`); everything
    else, float images included, unchanged."""
    out = dict(batch)
    for key in IMAGE_KEYS:
        if key in out and out[key].dtype == np.uint8:
            out[key] = normalize(out[key])
    return out
