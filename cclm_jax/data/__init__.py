"""Input data for CCLM: tokenizer, text and image preprocessing, sources, pipelines, mixture, demo, and the
downstream (fine-tuning and evaluation) data.

Entry points (import the modules for the rest):
    default_data_config(), validate_data_config(cfg)   -- ``config.data`` keys (config.py)
    pipeline.load_tokenizer(cfg), pipeline.build_train_pipelines(cfg, tokenizer, ...),
    pipeline.build_host_pipelines(cfg, tokenizer, ...)  -- one process's input shards (data.host_shards)
    pipeline.build_retrieval_eval(cfg, tokenizer)       -- tf.data pipelines (import TensorFlow)
    mixture.Mixture(ratios).kind_at(step)               -- batch-kind schedule
    image.normalize(images), image.prepare_batch(batch) -- on-device CLIP normalisation
Pre-training data preparation:
    builders.prepare(recipe, data_dir, beam_options=...) -- TFDS datasets, in-process or with Apache Beam
    prepare.prepare_config(cfg, out_dir), check.check_config(cfg) -- `cclm-jax data prepare|check`
    img2dataset.examples(path), converters.wikimatrix_examples(path) -- readers of public releases
Downstream data:
    retrieval_sets.read_*, iglue.read_*, iglue.read_iglue -- annotation readers per benchmark family
                                                           (records and errors in annotations.py)
    finetune_data.load_task_data(config)                -- a fine-tuning config's training rows and test sets
    finetune_input.TrainBatches, finetune_input.load_images, encode_texts, vqa_targets -- host batches
"""
from cclm_jax.data.config import default_data_config, validate_data_config

__all__ = ["default_data_config", "validate_data_config"]
