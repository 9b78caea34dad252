"""mergekit's nearswap and multislerp (mergekit/merge_methods/nearswap.py, multislerp.py).

Same contract as ``extra.py``: float32 chunks in, a new chunk out; whole-tensor statistics come from a
registered ``reduce`` (additive sums over the chunks). Compiled, multislerp's
apply pass is the fused linear kernel with its coefficients (kernel ``gram``), nearswap's the fused clip
(kernel ``clip``).

* **nearswap** (base b, one model x, threshold t > 0): mergekit's w = clamp(t / |b − x|, 0, 1) (1 where
  b = x), result w·x + (1 − w)·b. On the task vector y = x − b that is b + w·y = b + clip(y, −t, t): the
  engine adds the base, so the merge is a clip of the task vector.
* **multislerp** (any number of inputs y_i, task vectors when there is a base): with weights w (divided
  by their sum when ``multislerp_normalize_weights``), n_i = ‖y_i‖, u_i = y_i / (n_i + eps),
  mean = Σ w_i u_i, mergekit projects the u_i on the tangent space at mean/‖mean‖, sums them with the
  weights there and maps back. That tangent sum is Σ w_i u_i − ⟨Σ w_i u_i, m⟩·m = 0 exactly (m the unit
  mean), so its exponential map returns m (mergekit's result differs by float rounding only):
  result = m · Σ w_i n_i = Σ c_i y_i, c_i = w_i / (n_i + eps) · Σ_j w_j n_j / ‖mean‖. When ‖mean‖ < eps:
  two inputs fall back to Σ w_i y_i, more are an error (as mergekit). One input is returned as is.
"""

from __future__ import annotations

import math

from llm_merge.errors import MergeError
from llm_merge.methods.merge import gram_matrix, gram_sums, weighted_sum
from llm_merge.methods.registry import register


@register("merge", "nearswap", inputs=1, kernel="clip", numpy_seconds_per_gb=1.3, fused=True)
def nearswap(ys, *, nearswap_t, ops):
    """mergekit nearswap on the task vector: clip(y, −t, t) (the engine adds the base)."""
    y = ys[0]
    t = ops.float32(nearswap_t)
    return ops.where(y > t, t, ops.where(y < -t, -t, y))


def multislerp_coefficients(sums, weight_list, multislerp_normalize_weights: bool, multislerp_eps: float) -> list[float]:
    """The c_i of result = Σ c_i y_i (see the module docstring), from the Gram entries of ``merge.gram_sums``."""
    k = len(weight_list)
    if k == 1:
        return [1.0]
    g = gram_matrix(sums, k)
    total = math.fsum(weight_list)
    w = [x / total for x in weight_list] if multislerp_normalize_weights else [float(x) for x in weight_list]
    norms = [math.sqrt(max(g[i][i], 0.0)) for i in range(k)]
    a = [w[i] / (norms[i] + multislerp_eps) for i in range(k)]  # mean = Σ a_i y_i
    mean_norm = math.sqrt(max(math.fsum(a[i] * a[j] * g[i][j] for i in range(k) for j in range(k)), 0.0))
    if mean_norm < multislerp_eps:
        if not any(norms):  # every input is zero (a tensor no fine-tune changed): so is the result
            return [0.0] * k
        if k == 2:
            return w
        raise MergeError("multislerp: the weighted sum of the normalized inputs is zero (antipodal inputs with "
                         "balancing weights); use other weights")
    avg_norm = math.fsum(wi * ni for wi, ni in zip(w, norms))
    return [ai * avg_norm / mean_norm for ai in a]


def _multislerp_fused_coefficients(reduced: dict, options: dict) -> list[float]:
    """multislerp in the fused pass: a linear merge (not normalized) with its coefficients."""
    return multislerp_coefficients(reduced["sums"], options["weight_list"], options["multislerp_normalize_weights"],
                                   options["multislerp_eps"])


@register("merge", "multislerp", reduce=gram_sums, produces=("sums",), kernel="gram", numpy_seconds_per_gb=1.1,
          fused=True, fused_coefficients=_multislerp_fused_coefficients)
def multislerp(ys, *, sums, weight_list, multislerp_normalize_weights, multislerp_eps, ops):
    """mergekit multislerp: barycentric interpolation on the hypersphere of the whole tensors."""
    return weighted_sum(ys, multislerp_coefficients(sums, weight_list, multislerp_normalize_weights, multislerp_eps), ops)
