"""A self-contained PyTorch CCLM and CCLM-X2VLM (no JAX needed) for downstream users of exported or official
checkpoints; ``load`` builds the family the checkpoint holds (``X2VLM`` for X2-VLM ``CrossViewLM`` files).

>>> from cclm_jax.torch import load
>>> model = load("cclm_3m_epoch_29.th")                     # or an export dir with model.safetensors + config.json
>>> image_embeds, image_atts = model.encode_image(image)      # image: (B, 3, 224, 224) CLIP-normalised
>>> text_embeds = model.encode_text(ids, atts)
>>> itm = model.itm_scores(model.fuse(image_embeds, image_atts, text_embeds, atts)[:, 0])
"""
from cclm_jax.torch.config import ConfigError, config_from_state_dict, state_dict_family, validate_config
from cclm_jax.torch.loading import StateDictMismatchError, build, complete_state_dict, from_state_dict, load
from cclm_jax.torch.model import CCLM
from cclm_jax.torch.x2vlm import X2VLM

__all__ = ["CCLM", "X2VLM", "ConfigError", "StateDictMismatchError", "build", "complete_state_dict",
           "config_from_state_dict", "from_state_dict", "load", "state_dict_family", "validate_config"]
