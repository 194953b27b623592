"""CCLM-X2VLM large pre-training: BEiT-v2-L/16 + XLM-R large + a 6-layer, 1024-wide cross encoder.

The recipe of `configs/cclm_x2vlm_base.py` (joint updates, per-tower learning rates, clipping 1.0) at the large
sizes (1,225,073,817 parameters); `get_config('runlocal')` is the same tiny model as the base config's.
"""
import importlib.util
import pathlib

# The recipe lives in the base config file (config files are not a package).
_spec = importlib.util.spec_from_file_location("cclm_x2vlm_base",
                                               pathlib.Path(__file__).with_name("cclm_x2vlm_base.py"))
_base = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_base)


def get_config(arg: str = ""):
    config = _base.x2vlm_run_config("large", arg, "cclm_x2vlm_large.py")
    if not arg:
        config.data.tokenizer = "xlm-roberta-large/sentencepiece.bpe.model"
    return config
