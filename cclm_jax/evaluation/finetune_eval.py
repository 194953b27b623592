"""Test-set evaluation of a fine-tuned model, one language at a time, as the reference scores each task:

- retrieval: `RetrievalEvaluator` (ITC similarities, the top-`eval.k_test` candidates re-scored by the ITM head
  unless `eval.rerank` is False), R@1/5/10 both ways and their means (`metrics.retrieval_metrics`); with
  re-ranking, the first stage's dual-encoder recalls come for free and are reported as a second table,
  `<name>_itc` (the same key `eval.rerank=False` reports under);
- xvnli / marvl: `accuracy` of the argmax of the classifier logits;
- xgqa: `accuracy` of the best of the answer list (top-`k_test` by first-token probability, re-ranked by
  likelihood) against the gold answer (`metrics.vqa_accuracy`).

Values are in percent. Every function is compiled once per `TaskEvaluator` (build it once per run and call it
at every evaluation). Batches hold `eval.batch_size` examples (global; the last one is filled up by repeating
its last example, whose predictions are dropped); with a mesh each process passes the full batch, laid out over
the mesh's batch axes, and gets the full predictions back.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import ml_collections
import numpy as np
from jax.sharding import Mesh

from cclm_jax import parallel
from cclm_jax.data.finetune_data import report_name
from cclm_jax.data.finetune_input import (
    answer_candidates,
    encode_texts,
    eval_image_batches,
    image_source,
    load_images,
    text_fields,
)
from cclm_jax.data.iglue import ImagePairExample
from cclm_jax.data.retrieval_sets import RetrievalSet
from cclm_jax.data.text import pre_question
from cclm_jax.data.tokenizer import Tokenizer
from cclm_jax.evaluation import metrics
from cclm_jax.evaluation.retrieval import RetrievalEvaluator
from cclm_jax.models import build_model
from cclm_jax.tasks import make_predict_fn

Results = dict[str, dict[str, float]]


class TaskEvaluator:
    """`evaluator(params) -> {table: {language: {metric: value}}}` over the test sets of a fine-tuning run.

    Tables: `data.finetune_data.report_name(config)`, and for re-ranked retrieval also its dual-encoder `<name>_itc`.
    config: the fine-tuning config (task, eval, data sections); model_config: the run's resolved model config;
    tests: language -> `RetrievalSet` or list of examples (`data.finetune_data.TaskData.tests`); answers: the xGQA
    answer list.
    """

    def __init__(self, config: ml_collections.ConfigDict, model_config: ml_collections.ConfigDict,
                 tests: Mapping[str, Any], tokenizer: Tokenizer, mesh: Mesh | None = None,
                 answers: tuple[str, ...] = ()):
        self.task, self.tests, self.tokenizer, self.mesh = config.task, dict(tests), tokenizer, mesh
        self.eval, self.data = config.eval, config.data
        self.name = report_name(config)
        self.rerank = self.task == "retrieval" and bool(config.eval.get("rerank", True))
        self.image_res = model_config.vision.image_res
        self.batch_size = int(config.eval.batch_size)
        shards = 1 if mesh is None else parallel.num_batch_shards(mesh)
        if self.batch_size % shards:
            raise ValueError(f"config.eval.batch_size {self.batch_size} must be a multiple of the mesh's {shards} "
                             "batch shards (data x fsdp)")
        out = {} if mesh is None else {"out_shardings": parallel.replicated(mesh)}
        if self.task == "retrieval":
            self.retrieval = RetrievalEvaluator(build_model(model_config), batch_size=self.batch_size, mesh=mesh,
                                                pairs_per_block=config.eval.get("pairs_per_block"))
        elif self.task == "xgqa":
            if not answers:
                raise ValueError("xgqa evaluation needs the answer list (config.data.answer_list)")
            self.answers = list(answers)
            self.answer_ids, self.answer_atts = answer_candidates(answers, tokenizer, int(config.data.answer_tokens))
            k = min(int(config.eval.k_test), len(answers))
            self.predict = jax.jit(make_predict_fn("xgqa", model_config, k_test=k), **out)
        else:
            self.predict = jax.jit(make_predict_fn(self.task, model_config), **out)

    def __call__(self, params) -> dict[str, Results]:
        tables: dict[str, Results] = {}
        for lang, test in self.tests.items():
            for suffix, values in self.evaluate(params, test).items():
                tables.setdefault(self.name + suffix, {})[lang] = values
        return tables

    def evaluate(self, params, test) -> dict[str, dict[str, float]]:
        """Metrics of one test set by table suffix: {"": metrics}, and for re-ranked retrieval also "_itc"
        (the dual-encoder recalls of its first stage)."""
        if self.task == "retrieval":
            return self._retrieval(params, test)
        if self.task == "xgqa":
            return {"": self._vqa(params, test)}
        return {"": self._classification(params, test)}

    # ------------------------------------------------------------------------------------------ tasks

    def _retrieval(self, params, test: RetrievalSet) -> dict[str, dict[str, float]]:
        images = load_images([image_source(image) for image in test.images], self.image_res)
        ids, atts = encode_texts(self.tokenizer, test.texts, max_tokens=self.data.max_tokens,
                                 max_words=self.data.max_words)
        scores = self.retrieval.image_text_scores(params, images, ids, atts, k_test=int(self.eval.k_test),
                                                  rerank=self.rerank)
        recalls = metrics.retrieval_metrics(scores.score_i2t, scores.score_t2i, test.txt2img, test.img2txt)
        if not self.rerank:
            return {"": recalls}
        dual = metrics.retrieval_metrics(scores.sims, np.ascontiguousarray(scores.sims.T), test.txt2img, test.img2txt)
        return {"": recalls, "_itc": dual}

    def _batches(self, examples: list):
        """(host batch, number of real examples) of padded evaluation batches (images of the examples in order)."""
        two = isinstance(examples[0], ImagePairExample)
        padded = examples + examples[-1:] * (-len(examples) % self.batch_size)
        if two:
            sources = [image_source(p) for e in padded for p in e.image_paths]
        else:
            sources = [image_source(e.image_path) for e in padded]
        per = 2 if two else 1
        for j, pixels in enumerate(eval_image_batches(sources, self.image_res, self.batch_size * per)):
            rows = padded[j * self.batch_size:(j + 1) * self.batch_size]
            if self.task == "xgqa":
                ids, atts = encode_texts(self.tokenizer, [e.question for e in rows], max_tokens=self.data.max_tokens,
                                         max_words=self.data.get("test_max_words", self.data.max_words),
                                         clean=pre_question)
                batch = {"text_ids": ids, "text_atts": atts}
            else:
                batch = text_fields(self.task, rows, self.tokenizer, max_tokens=self.data.max_tokens,
                                    max_words=self.data.max_words)
                del batch["label"]
            if two:
                batch.update(image=pixels[0::2], image_2=pixels[1::2])
            else:
                batch["image"] = pixels
            yield self._put(batch), min(self.batch_size, len(examples) - j * self.batch_size)

    def _put(self, batch: dict[str, np.ndarray]) -> dict:
        if self.mesh is None:
            return batch
        sharding = parallel.batch_sharding(self.mesh)
        return {k: jax.make_array_from_callback(v.shape, sharding, lambda index, v=v: v[index])
                for k, v in batch.items()}

    def _classification(self, params, examples: list) -> dict[str, float]:
        predictions = [np.asarray(self.predict(params, batch)).argmax(axis=1)[:count]
                       for batch, count in self._batches(examples)]
        return {"accuracy": metrics.accuracy(np.concatenate(predictions), [e.label for e in examples])}

    def _vqa(self, params, examples: list) -> dict[str, float]:
        best = [np.asarray(self.predict(params, batch, self.answer_ids, self.answer_atts))[:count]
                for batch, count in self._batches(examples)]
        chosen = np.concatenate(best)
        predictions = {e.question_id: self.answers[i] for e, i in zip(examples, chosen)}
        return {"accuracy": metrics.vqa_accuracy(predictions, {e.question_id: e.answer for e in examples})}
