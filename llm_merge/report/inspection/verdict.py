"""Does a model share the base? The rules, on per-tensor evidence (pure).

Evidence per model: for each matrix (a tensor of two or more dimensions with at least
``MIN_JUDGED_ELEMENTS`` entries and a non-zero base), the weight cosine cos(x, b) and the relative
task-vector norm ||x - b|| / ||b||. The verdict looks at their medians over the matrices, so one
re-initialized tensor (a new head) does not condemn a fine-tune:

| level | rule | why |
|---|---|---|
| mismatch | median cosine < 0.5 (``UNRELATED_COSINE``) | unrelated weights are near-orthogonal (cosine ~ 0); fine-tunes stay above 0.9 |
| mismatch | median relative norm > 1.0 (``UNRELATED_RELATIVE_NORM``) | the task vector is larger than the base itself; unrelated weights of the base's scale give ~ sqrt(2), fine-tunes stay below 0.1-0.3 |
| doubtful | median cosine < 0.9 (``COMPATIBLE_COSINE``) | further from the base than fine-tunes go |
| doubtful | median relative norm > 0.5 (``COMPATIBLE_RELATIVE_NORM``) | likewise (a change orthogonal to the base reaches cosine 0.9 at ~ 0.48) |
| doubtful | some matrices in the mismatch range | part of the model (e.g. a re-initialized head, or layers from another model) does not come from the base |

"""

from __future__ import annotations

import math
from typing import Optional, Sequence

UNRELATED_COSINE = 0.5
UNRELATED_RELATIVE_NORM = 1.0
COMPATIBLE_COSINE = 0.9
COMPATIBLE_RELATIVE_NORM = 0.5
#: Tensors with fewer entries are not judged: the cosine of n unrelated entries spreads by ~ 1/sqrt(n) (0.06 at 256).
MIN_JUDGED_ELEMENTS = 256
#: Tensors named in a finding's message.
NAMED_TENSORS = 3

OK, DOUBTFUL, MISMATCH, UNKNOWN = "ok", "doubtful", "mismatch", "unknown"

#: rule name -> what it says (messages, JSON report)
RULES = {
    "unrelated_cosine": f"median weight cosine < {UNRELATED_COSINE} (unrelated weights ~ 0, fine-tunes > {COMPATIBLE_COSINE})",
    "unrelated_norm": f"median relative norm > {UNRELATED_RELATIVE_NORM} (unrelated weights ~ 1.41, fine-tunes < 0.3)",
    "far_cosine": f"median weight cosine < {COMPATIBLE_COSINE} (fine-tunes stay above)",
    "far_norm": f"median relative norm > {COMPATIBLE_RELATIVE_NORM} (fine-tunes stay below 0.3)",
    "some_unrelated": f"some matrices have weight cosine < {UNRELATED_COSINE} or relative norm > {UNRELATED_RELATIVE_NORM}",
}


class Evidence:
    """One tensor's figures for one model. (Plain classes here, not dataclasses: every merge imports this
    module, and a frozen dataclass costs ~1 ms to define.)"""

    __slots__ = ("tensor", "cosine", "relative_norm", "elements")

    def __init__(self, tensor: str, cosine: float, relative_norm: float, elements: int) -> None:
        self.tensor, self.cosine, self.relative_norm, self.elements = tensor, cosine, relative_norm, elements

    @property
    def judged(self) -> bool:
        return self.elements >= MIN_JUDGED_ELEMENTS and math.isfinite(self.cosine) and math.isfinite(self.relative_norm)

    @property
    def unrelated(self) -> bool:
        return self.cosine < UNRELATED_COSINE or self.relative_norm > UNRELATED_RELATIVE_NORM


class Finding:
    """The verdict on one model: its level, the rules that fired, and the evidence behind them."""

    def __init__(self, model: str, level: str, rules: tuple[str, ...], cosine: Optional[float], relative_norm: Optional[float],
                 judged: int, unrelated_tensors: tuple[str, ...] = (), reference: str = "the base") -> None:
        self.model, self.level, self.rules, self.judged = model, level, rules, judged
        self.cosine, self.relative_norm = cosine, relative_norm
        self.unrelated_tensors, self.reference = unrelated_tensors, reference

    def message(self) -> str:
        """One line naming the model, the rule and the evidence."""
        if self.level == UNKNOWN:
            return f"{self.model}: no matrix large enough to judge against {self.reference}"
        figures = (f"median weight cosine {self.cosine:.3f} and relative task-vector norm ||x - b|| / ||b|| "
                   f"{self.relative_norm:.3f} over {self.judged} matrices")
        if self.level == OK:
            return f"{self.model}: shares {self.reference} ({figures})"
        rules = "; ".join(f"rule {name}: {RULES[name]}" for name in self.rules)
        named = ""
        if self.unrelated_tensors and "some_unrelated" in self.rules:
            shown = ", ".join(self.unrelated_tensors[:NAMED_TENSORS])
            more = f" and {len(self.unrelated_tensors) - NAMED_TENSORS} more" if len(self.unrelated_tensors) > NAMED_TENSORS else ""
            named = f"; unrelated matrices: {shown}{more}"
        what = "does not share" if self.level == MISMATCH else "may not share"
        return f"{self.model} {what} {self.reference}: {figures}; {rules}{named}"

    def as_dict(self) -> dict:
        return {"model": self.model, "level": self.level, "rules": list(self.rules), "median_weight_cosine": self.cosine,
                "median_relative_norm": self.relative_norm, "judged_matrices": self.judged,
                "unrelated_matrices": list(self.unrelated_tensors), "reference": self.reference, "message": self.message()}


def judge(model: str, evidence: Sequence[Evidence], reference: str = "the base") -> Finding:
    """The verdict on ``model`` from its tensors' evidence (see the module's table)."""
    judged = [e for e in evidence if e.judged]
    if not judged:
        return Finding(model, UNKNOWN, (), None, None, 0, reference=reference)
    cosine = median([e.cosine for e in judged])
    relative_norm = median([e.relative_norm for e in judged])
    unrelated = tuple(e.tensor for e in judged if e.unrelated)
    mismatch = [name for name, fired in (("unrelated_cosine", cosine < UNRELATED_COSINE),
                                         ("unrelated_norm", relative_norm > UNRELATED_RELATIVE_NORM)) if fired]
    doubtful = [name for name, fired in (("far_cosine", cosine < COMPATIBLE_COSINE),
                                         ("far_norm", relative_norm > COMPATIBLE_RELATIVE_NORM),
                                         ("some_unrelated", bool(unrelated))) if fired]
    level = MISMATCH if mismatch else DOUBTFUL if doubtful else OK
    rules = tuple(mismatch) if mismatch else tuple(doubtful)
    return Finding(model, level, rules, cosine, relative_norm, len(judged), unrelated, reference)


def median(values: Sequence[float]) -> float:
    """The middle value (the mean of the two middle ones for an even count); ``statistics`` costs 10 ms to import."""
    ordered = sorted(values)
    middle = len(ordered) // 2
    return ordered[middle] if len(ordered) % 2 else (ordered[middle - 1] + ordered[middle]) / 2


def thresholds() -> dict:
    """The rules' constants, for the JSON report."""
    return {"unrelated_cosine": UNRELATED_COSINE, "unrelated_relative_norm": UNRELATED_RELATIVE_NORM,
            "compatible_cosine": COMPATIBLE_COSINE, "compatible_relative_norm": COMPATIBLE_RELATIVE_NORM,
            "min_judged_elements": MIN_JUDGED_ELEMENTS, "rules": dict(RULES)}
