"""mergekit's Reinforced Agent Merging: ram and ramplus_tl (mergekit/merge_methods/ram.py).

Task vectors t_i (a base is required). An entry of model i takes part when |t_i| > ε
(``ram_epsilon``, compared in float32); count = how many models take part at that entry.

* **ram**: result b + Σ_i t_i·[takes part]·(1 where count = 1, else 1/count): an entry only one
  model changes keeps that change, an entry several change gets their mean (over those models), an
  entry none changes stays the base.
* **ramplus_tl** (tensor-local RAM+): per model, over the whole tensor, shared_i = #entries where it
  takes part and count > 1, unique_i = #entries where it takes part and count = 1 (a reduce pass of
  integer counts, so any chunking gives the same numbers); ρ_i = shared_i / max(unique_i, ε),
  λ_i = 1 + r·clamp(ρ_i, 0, α) (``ramplus_r``, ``ramplus_alpha``), all in float32 as mergekit; the
  unique entries of model i are scaled by λ_i, the shared ones divided by count as in ram.

mergekit's per-model ``weight`` plays no part (its ram takes none). Elementwise NumPy on the host
(``ops.to_numpy``), so the Paddle backend gives the same bits; compiled, both run in the fused apply pass
(kernel ``ram``: ``kernels.method_blocks.ram_elements``, the same operations in the same order), ramplus_tl
with the factors λ_i from its counts.
"""

from __future__ import annotations

import numpy as np

from llm_merge.methods.registry import register


def _participation(ys, ram_epsilon: float, ops) -> tuple[list[np.ndarray], list[np.ndarray], np.ndarray]:
    """(task-vector chunks, which entries of each take part, how many models take part per entry)."""
    ts = [ops.to_numpy(y) for y in ys]
    threshold = np.float32(ram_epsilon)
    taking_part = [np.abs(t) > threshold for t in ts]
    count = np.zeros(ts[0].shape, np.int32)
    for part in taking_part:
        count += part
    return ts, taking_part, count


def _merged(ts, taking_part, count, unique_scales) -> np.ndarray:
    """Σ_i of t_i·λ_i where only model i takes part, t_i / count where several do (mergekit's sum, in model order)."""
    unique = count == 1
    divisor = np.maximum(count, 1).astype(np.float32)
    total = np.zeros(ts[0].shape, np.float32)
    for t, part, scale in zip(ts, taking_part, unique_scales):
        alone = t if scale is None else t * scale
        total += np.where(part, np.where(unique, alone, t / divisor), np.float32(0.0))
    return total


@register("merge", "ram", kernel="ram", numpy_seconds_per_gb=1.1, fused=True)
def ram(ys, *, ram_epsilon, ops):
    """RAM: entries one model changes keep its change, entries several change get their mean."""
    ts, taking_part, count = _participation(ys, ram_epsilon, ops)
    return ops.from_numpy(_merged(ts, taking_part, count, [None] * len(ts)))


def ramplus_counts(ys, *, ram_epsilon, ops):
    """Additive per-model counts of shared entries (it and another model take part) and unique ones (it alone)."""
    _, taking_part, count = _participation(ys, ram_epsilon, ops)
    shared, unique = count > 1, count == 1
    return {"ram_shared_counts": tuple(int(np.count_nonzero(p & shared)) for p in taking_part),
            "ram_unique_counts": tuple(int(np.count_nonzero(p & unique)) for p in taking_part)}


def ramplus_scales(shared_counts, unique_counts, ramplus_r: float, ramplus_alpha: float, ram_epsilon: float) -> list[np.float32]:
    """λ_i = 1 + r·clamp(shared_i / max(unique_i, ε), 0, α), in float32 as mergekit computes it."""
    scales = []
    for shared, unique in zip(shared_counts, unique_counts):
        rho = np.float32(shared) / max(np.float32(unique), np.float32(ram_epsilon))
        clamped = min(max(rho, np.float32(0.0)), np.float32(ramplus_alpha))
        scales.append(np.float32(1.0) + np.float32(ramplus_r) * np.float32(clamped))
    return scales


def _ramplus_factors(reduced: dict, options: dict) -> list[np.float32]:
    """ramplus_tl in the fused pass: ram with each model's unique entries scaled by its λ_i."""
    return ramplus_scales(reduced["ram_shared_counts"], reduced["ram_unique_counts"], options["ramplus_r"],
                          options["ramplus_alpha"], options["ram_epsilon"])


@register("merge", "ramplus_tl", reduce=ramplus_counts, produces=("ram_shared_counts", "ram_unique_counts"),
          kernel="ram", numpy_seconds_per_gb=2.5, fused=True, fused_coefficients=_ramplus_factors)
def ramplus_tl(ys, *, ram_shared_counts, ram_unique_counts, ramplus_r, ramplus_alpha, ram_epsilon, ops):
    """RAM+ (tensor-local): as ram, with each model's unique entries scaled by its λ_i."""
    ts, taking_part, count = _participation(ys, ram_epsilon, ops)
    scales = ramplus_scales(ram_shared_counts, ram_unique_counts, ramplus_r, ramplus_alpha, ram_epsilon)
    return ops.from_numpy(_merged(ts, taking_part, count, scales))
