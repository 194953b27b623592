"""A self-contained PyTorch CCLM (no JAX needed) for downstream users of exported or official checkpoints.

>>> from cclm_jax.torch import load
>>> model = load("cclm_3m_epoch_29.th")                     # or an export dir with model.safetensors + config.json
>>> image_embeds, image_atts = model.encode_image(image)      # image: (B, 3, 224, 224) CLIP-normalised
>>> text_embeds = model.encode_text(ids, atts)
>>> itm = model.itm_scores(model.fuse(image_embeds, image_atts, text_embeds, atts)[:, 0])
"""
from cclm_jax.torch.config import ConfigError, config_from_state_dict, validate_config
from cclm_jax.torch.loading import StateDictMismatchError, complete_state_dict, from_state_dict, load
from cclm_jax.torch.model import CCLM

__all__ = ["CCLM", "ConfigError", "StateDictMismatchError", "complete_state_dict", "config_from_state_dict",
           "from_state_dict", "load", "validate_config"]
