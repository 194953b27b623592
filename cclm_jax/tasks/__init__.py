"""The fine-tuning tasks (retrieval, xvnli, marvl, xgqa): what a fine-tuning run is, without the training loop.

- `definitions`: configs (`default_finetune_config`, protocols, validation), task models, new parameters, losses
  (`make_loss_fn`) and predictions (`make_predict_fn`); the names below are re-exported from it.
- `start`: where a run starts (`config.init`): the model config, the tokenizer and the first task parameters.

Training (`train.finetuning`) and evaluation (`evaluation.finetune_eval`) build on these; the data they read is
in `data.finetune_data` / `data.finetune_input`.
"""
from cclm_jax.tasks.definitions import (
                                        PROTOCOLS,
                                        TASK_HEADS,
                                        TASK_LOSSES,
                                        TASKS,
                                        apply_protocol,
                                        build_task_model,
                                        default_finetune_config,
                                        init_task_params,
                                        json_retrieval_config,
                                        make_loss_fn,
                                        make_predict_fn,
                                        validate_finetune_config,
)

__all__ = ["PROTOCOLS", "TASK_HEADS", "TASK_LOSSES", "TASKS", "apply_protocol", "build_task_model",
           "default_finetune_config", "init_task_params", "json_retrieval_config", "make_loss_fn",
           "make_predict_fn", "validate_finetune_config"]
