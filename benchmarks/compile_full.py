"""Ahead-of-time compile of the full-size model on this machine, from abstract inputs only (nothing allocated).

    python benchmarks/compile_full.py [--config configs/cclm_base.py] [--batch 2] [--set model.dtype=bfloat16 ...]
        [--parts forward,image_caption,parallel_text] [--label NAME] [--results benchmarks/RESULTS.md]

Parts: `forward` (the image–caption losses without gradients) and the two jitted train steps (donated state,
reference AdamW) built by `steps.make_train_steps` exactly as training builds them. For each part: lowering and
compile seconds, `memory_analysis()` (temp = XLA's scratch buffers, args, outputs, peak), XLA's
`cost_analysis()` FLOPs against the analytic count (`cclm_jax.flops`: forward, or 3 x forward for a step), and
the largest array with a vocabulary-sized dimension in the optimised program: the MLM loss must never hold
logits for every token (B x L x vocab), only for the B x max_masks gathered positions. Writes `### NAME` in the
`## Full-size compile` section of `--results`.
"""
from __future__ import annotations

import argparse
import datetime
import os
import re
import sys
import time

import jax
import jax.numpy as jnp
from flax import linen as nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import train_step  # noqa: E402  (shared config / report helpers; puts the repository on sys.path)

from cclm_jax import flops, objectives  # noqa: E402
from cclm_jax.models import build_model  # noqa: E402
from cclm_jax.optimizer import make_optimizer  # noqa: E402
from cclm_jax.train.steps import StepConfig, make_train_steps  # noqa: E402
from cclm_jax.train_state import create_train_state  # noqa: E402

SECTION = "## Full-size compile"
PARTS = ("forward", "image_caption", "parallel_text")
_ARRAY = re.compile(r"\b(f32|bf16|f16|s32)\[([0-9,]+)\]")


def abstract_batch(config, kind: str, batch: int) -> dict[str, jax.ShapeDtypeStruct]:
    """ShapeDtypeStructs of a batch of `kind` with the config's padded shapes (float32 normalised images)."""
    host = train_step.synthetic_batch(config, kind, 2)
    return {k: jax.ShapeDtypeStruct((batch,) + v.shape[1:], v.dtype) for k, v in host.items()}


def largest_vocab_array(hlo_text: str, vocab: int) -> tuple[str, int]:
    """(shape, elements) of the largest array in an HLO text that has a `vocab`-sized dimension."""
    best, best_n = "none", 0
    for dtype, dims in _ARRAY.findall(hlo_text):
        shape = [int(d) for d in dims.split(",")]
        n = 1
        for d in shape:
            n *= d
        if vocab in shape and n > best_n:
            best, best_n = f"{dtype}[{dims}]", n
    return best, best_n


def compile_parts(config, batch: int, parts: list[str], log=print) -> list[dict]:
    model = build_model(config.model)
    res = config.model.vision.image_res
    ids = jnp.zeros((1, 8), jnp.int32)
    params = nn.meta.unbox(jax.eval_shape(
        lambda k: model.init(k, jnp.zeros((1, res, res, 3)), ids, ids)["params"], jax.random.PRNGKey(0)))
    optimizer = make_optimizer(config.optimizer, config.schedule, params, updates_per_schedule_step=2)
    state = jax.eval_shape(lambda p, r: create_train_state(p, optimizer, r), params, jax.random.PRNGKey(0))
    step_config = StepConfig(config.model, config.objectives, dropout=config.train.dropout)
    steps = make_train_steps(step_config, optimizer, "alternate")
    shapes = flops.run_config_shapes(config)
    vocab = config.model.text.vocab_size

    def forward(p, b):
        losses = objectives.image_text_losses(model, p, b, jax.random.PRNGKey(0), config=config.objectives)
        return sum(v for k, v in losses.items() if k != "negatives")

    rows = []
    for part in parts:
        kind = "image_caption" if part == "forward" else part
        batches = abstract_batch(config, kind, batch)
        if part == "forward":
            fn, args = jax.jit(forward), (params, batches)
        else:
            fn, args = steps[kind], (state, {kind: batches})
        t0 = time.perf_counter()
        lowered = fn.lower(*args)
        t1 = time.perf_counter()
        compiled = lowered.compile()
        t2 = time.perf_counter()
        cost = compiled.cost_analysis()
        cost = cost[0] if isinstance(cost, (list, tuple)) else cost
        analytic = batch * flops.forward_flops(config.model, kind, shapes[kind], config.model.cache_cross_kv)
        analytic *= 1 if part == "forward" else 3
        shape, elements = largest_vocab_array(compiled.as_text(), vocab)
        row = {"part": part, "lower_s": t1 - t0, "compile_s": t2 - t1, **train_step.memory_stats(compiled),
               "xla_gflop": float(cost.get("flops", 0.0)) / 1e9, "analytic_gflop": analytic / 1e9,
               "vocab_array": shape, "vocab_array_gib": elements * 4 / train_step.GiB,
               "all_token_logits": f"{batch},{shapes[kind].tokens},{vocab}]" in compiled.as_text()}
        log(f"{part}: lower {row['lower_s']:.1f}s compile {row['compile_s']:.1f}s temp {row['temp_gib']:.2f} GiB "
            f"xla/analytic {row['xla_gflop'] / row['analytic_gflop']:.3f} largest vocab array {shape}")
        rows.append(row)
        del compiled, lowered
    return rows


def markdown(rows: list[dict]) -> str:
    lines = ["| part | lower s | compile s | temp GiB | args GiB | total GiB | XLA GFLOP | analytic GFLOP | "
             "largest vocab-sized array | (B, L, vocab) logits |", "|" + "---|" * 10]
    for r in rows:
        lines.append(f"| {r['part']} | {r['lower_s']:.1f} | {r['compile_s']:.1f} | {r['temp_gib']:.2f} | "
                     f"{r['args_gib']:.2f} | {r['total_gib']:.2f} | {r['xla_gflop']:,.0f} | "
                     f"{r['analytic_gflop']:,.0f} | "
                     f"`{r['vocab_array']}` | {'PRESENT' if r['all_token_logits'] else 'absent'} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default=os.path.join(train_step.REPO, "configs", "cclm_base.py"))
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--parts", default=",".join(PARTS))
    parser.add_argument("--label", default="")
    parser.add_argument("--results", default=os.path.join(train_step.REPO, "benchmarks", "RESULTS.md"))
    args = parser.parse_args(argv)
    config = train_step.load_config(args.config)
    train_step.resolve_vocab_without_tokenizer(config)
    config = train_step.apply_overrides(config, args.set)
    parts = [p for p in args.parts.split(",") if p]
    for part in parts:
        if part not in PARTS:
            raise ValueError(f"--parts: {part!r} is not one of {PARTS}")
    machine = train_step.machine_description({})
    print(machine, flush=True)
    rows = compile_parts(config, args.batch, parts)
    table = markdown(rows)
    print(table)
    command = "python benchmarks/compile_full.py " + " ".join(argv if argv is not None else sys.argv[1:])
    if args.label:
        body = (f"{datetime.date.today().isoformat()}, commit `{train_step.git_head()}`, jax {jax.__version__}; "
                f"{machine}; model dtype {config.model.dtype}, batch {args.batch}.\n`{command}`\n\n{table}\n")
        train_step.write_subsection(args.results, SECTION, args.label, body)
    return rows


if __name__ == "__main__":
    main()
