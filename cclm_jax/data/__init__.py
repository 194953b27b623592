"""Input data for CCLM: tokenizer, text and image preprocessing, sources, pipelines, mixture, demo.

Entry points (import the modules for the rest):
    default_data_config(), validate_data_config(cfg)   -- ``config.data`` keys (config.py)
    pipeline.load_tokenizer(cfg), pipeline.build_train_pipelines(cfg, tokenizer, ...),
    pipeline.build_host_pipelines(cfg, tokenizer, ...)  -- one process's input shards (data.host_shards)
    pipeline.build_retrieval_eval(cfg, tokenizer)       -- tf.data pipelines (import TensorFlow)
    mixture.Mixture(ratios).kind_at(step)               -- batch-kind schedule
    image.normalize(images)                             -- on-device CLIP normalisation
"""
from cclm_jax.data.config import default_data_config, validate_data_config

__all__ = ["default_data_config", "validate_data_config"]
