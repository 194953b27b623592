"""Deterministic fixed-ratio schedule over batch kinds.

``Mixture({"image_caption": 2, "parallel_text": 1})`` repeats a cycle of ``sum(ratios)``
steps in which each kind appears exactly ``ratio`` times, spread evenly (smooth weighted
round-robin; ties go to the kind listed first). ``kind_at(step)`` depends only on the ratios
(in the given order) and the step, so every host computes the same schedule without talking
to the others, and a resumed run continues it from its step. Kinds with ratio 0 are dropped.

``iterations_per_cycle()`` counts the reference's iterations (learning-rate schedule steps) in a cycle: one
per cycle for the 3M mixture (a parallel-text and an image–caption update); with ``region`` batches (the 4M
setting: each iteration a parallel-text update, then a region *or* an image–caption update) one per image-side
update, e.g. ``{"image_caption": 1, "parallel_text": 2, "region": 1}`` is the cycle parallel_text,
image_caption, region, parallel_text of two iterations.
"""
from collections.abc import Mapping


def _check_ratios(ratios: Mapping[str, int]) -> dict[str, int]:
    if not ratios:
        raise ValueError("mix: at least one batch kind is needed")
    for kind, ratio in ratios.items():
        if isinstance(ratio, bool) or not isinstance(ratio, int) or ratio < 0:
            raise ValueError(f"mix[{kind!r}] must be a non-negative integer, got {ratio!r}")
    active = {kind: ratio for kind, ratio in ratios.items() if ratio > 0}
    if not active:
        raise ValueError(f"mix: every ratio is 0 in {dict(ratios)}")
    return active


def _cycle(ratios: dict[str, int]) -> list[str]:
    total = sum(ratios.values())
    credit = {kind: 0 for kind in ratios}
    order = []
    for _ in range(total):
        for kind, ratio in ratios.items():
            credit[kind] += ratio
        chosen = max(credit, key=lambda k: credit[k])  # first maximum wins ties
        credit[chosen] -= total
        order.append(chosen)
    return order


class Mixture:
    """Fixed-ratio schedule: ``kind_at(step)``, ``counts_before(step)``, ``cycle``."""

    def __init__(self, ratios: Mapping[str, int]):
        self.ratios = _check_ratios(dict(ratios))
        self.cycle = _cycle(self.ratios)

    @property
    def kinds(self) -> list[str]:
        return list(self.ratios)

    def iterations_per_cycle(self) -> int:
        """Reference iterations per cycle (see the module docstring); ValueError when a cycle is not a whole
        number of them."""
        if "region" not in self.ratios:
            return 1
        image_side = self.ratios.get("image_caption", 0) + self.ratios["region"]
        if len(self.cycle) % image_side:
            raise ValueError(f"mix: a cycle of {len(self.cycle)} updates is not a whole number of iterations of "
                             f"{image_side} image-side (image_caption + region) updates each; e.g. "
                             "{'image_caption': 1, 'parallel_text': 2, 'region': 1}")
        return image_side

    def kind_at(self, step: int) -> str:
        """The batch kind of global step ``step`` (>= 0)."""
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}")
        return self.cycle[step % len(self.cycle)]

    def counts_before(self, step: int) -> dict[str, int]:
        """How many batches of each kind steps 0..step-1 consume."""
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}")
        full, rest = divmod(step, len(self.cycle))
        counts = {kind: full * ratio for kind, ratio in self.ratios.items()}
        for kind in self.cycle[:rest]:
            counts[kind] += 1
        return counts
