"""CCLM and CCLM-X2VLM models: `build_model(model_config)` returns the Flax Linen module."""
from cclm_jax.models.cclm import CCLM, build_model, is_x2vlm, vision_width
from cclm_jax.models.config import (
    base_model_config,
    tiny_model_config,
    validate_model_config,
    vit_vision_config,
    x2vlm_model_config,
)

__all__ = ["CCLM", "build_model", "is_x2vlm", "vision_width", "base_model_config", "tiny_model_config",
           "validate_model_config", "vit_vision_config", "x2vlm_model_config"]
