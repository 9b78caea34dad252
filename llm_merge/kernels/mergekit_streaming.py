"""mergekit's whole-tensor statistics streamed over raw input chunks (numba): no full-size copies.

``StreamingRandomL1``: random's L1 factor over its draws (one pass). ``StreamingMagnitude``: magnitude's
selection (the k-th largest |t|, from the trim histogram of ``kernels.streaming``, and the index where
entries equal to it start to be kept: one more counting pass, which stops at that index) and its L1
factor, from the histogram alone. della_magprune's per-row statistics are in ``kernels.row_ranks``.
The interface is ``kernels.streaming``'s (``wants``, ``feed``, ``end_pass``, ``statistics``); the results
are those of ``methods.mergekit_sparsify``'s prepare functions, bit for bit: L1 sums are exact
(``kernels.l1_sums``) and selections follow ``band_selection``.
"""

from __future__ import annotations

import math
from typing import Optional

import numpy as np
from numba import njit

from llm_merge.kernels import blocks, counter_rng, draws, l1_sums, streaming
from llm_merge.kernels.blocks import JIT_OPTIONS, TaskVectorBuffers, prefetch_inputs, task_vector_row, widen_block
from llm_merge.kernels.cache import configure_kernel_caches
from llm_merge.kernels.counter_rng import GAMMA, keep_threshold
from llm_merge.kernels.counts import magnitude_count
from llm_merge.kernels.draws import draw_state, keep_flags, mix53
from llm_merge.kernels.l1_sums import NAN_SLOT, SLOTS
from llm_merge.kernels.streaming import _LOWS, StreamingTrim, chunk_inputs, float_of_bits, kth_bucket

#: Copies of the slot sums, picked by element index, so that consecutive entries of one exponent do not
#: queue on one counter (0.8 against 3 ns per entry with one copy).
SLOT_COPIES = 4
_MAGNITUDE = np.uint32(0x7FFFFFFF)


@njit(inline="always", **JIT_OPTIONS)
def add_slot_sums(bits, count, flags, sums):
    """Add the magnitudes of the float32 bit patterns ``bits[:count]`` to ``sums`` (``(SLOT_COPIES, 2 * SLOTS)``
    int64): as ``kernels.l1_sums.slot_sums`` lays them out, entry j in the kept half where ``flags[j]``."""
    for j in range(count):
        key = bits[j] & _MAGNITUDE
        exponent = key >> np.uint32(23)
        slot = np.int64(NAN_SLOT) if key > np.uint32(0x7F800000) else np.int64(exponent)
        significand = (key & np.uint32(0x7FFFFF)) | (np.uint32(0x800000) if exponent else np.uint32(0))
        sums[j & (SLOT_COPIES - 1), slot + SLOTS * np.int64(flags[j])] += np.int64(significand)


#: Exponent fields summed together as int64 in ``add_block_sums``: 1024 significands (2^24) shifted by up
#: to 28 places stay below 2^63.
_WINDOW = 29
_WINDOW_MASK = (1 << _WINDOW) - 1
#: Exponent fields summed together in float64 where a block has no entry outside them: 1024 significands
#: shifted by up to 19 places stay below 2^53, so every partial sum is exact, in any order.
_FLOAT_WINDOW = 20
#: Entries per window sum (2^10).
_WINDOW_BLOCK = 1024


@njit(inline="always", **JIT_OPTIONS)
def _add_window(sums, half, low, units):
    """Add ``units`` multiples of slot ``low``'s unit to slot sums: the low bits to slot ``low``, the rest to
    slot ``low + _WINDOW`` (whose unit is 2^_WINDOW times larger), so no slot nears 2^63."""
    sums[0, half + low] += units & _WINDOW_MASK
    sums[0, half + low + _WINDOW] += units >> _WINDOW


@njit(fastmath={"reassoc"}, **JIT_OPTIONS)
def _float_window_sums(bits, count, flags):
    """(Σ|t|, Σ|t| where ``flags[j]``) of float32 bits in float64. Exact, so the order of the additions
    (which ``reassoc`` lets the loop vectorize) cannot matter, when all |t| lie within ``_FLOAT_WINDOW``
    exponent fields and ``count`` <= 1024."""
    total = 0.0
    kept = 0.0
    for j in range(count):
        size = np.float64(np.uint32(bits[j] & _MAGNITUDE).view(np.float32))
        total += size
        kept += size if flags[j] else 0.0
    return total, kept


@njit(fastmath={"reassoc"}, **JIT_OPTIONS)
def _float_drawn_sums(bits, count, key, offset, threshold):
    """``_float_window_sums`` with entry j kept where draw ``offset + j`` of stream ``key`` is below
    ``threshold``: the draws in the summing loop, not stored."""
    total = 0.0
    kept = 0.0
    z = draw_state(key, offset)
    for j in range(count):
        size = np.float64(np.uint32(bits[j] & _MAGNITUDE).view(np.float32))
        total += size
        kept += size if mix53(z) < np.uint64(threshold) else 0.0
        z += np.uint64(GAMMA)
    return total, kept


@njit(inline="always", **JIT_OPTIONS)
def _float_window(bits, count):
    """The lowest exponent field of a float window holding every nonzero |t| of the block, or -1 (no such
    window, or NaN, Inf or values from 2^126 on), and the largest exponent field."""
    top = np.uint32(0)
    bottom = np.uint32(0xFFFFFFFF)  # the smallest nonzero |t|
    for j in range(count):
        key = bits[j] & _MAGNITUDE
        top = max(top, key)
        bottom = min(bottom, key if key else np.uint32(0xFFFFFFFF))
    top_exponent = np.int64(top >> np.uint32(23))
    low = max(top_exponent - (_FLOAT_WINDOW - 1), 1)  # exponent fields 0 and 1 share one unit
    fits = top_exponent < 254 and (max(np.int64(bottom >> np.uint32(23)), 1) >= low or top == 0)
    return (low if fits else -1), top_exponent


@njit(inline="always", **JIT_OPTIONS)
def _add_float_window(sums, low, total, kept):
    """Add float window sums (whole multiples of 2^(low - 150), below 2^53 of them) to the slot sums."""
    unit = 150 - low
    kept_units = np.int64(math.ldexp(kept, unit))
    _add_window(sums, 0, low, np.int64(math.ldexp(total, unit)) - kept_units)
    _add_window(sums, SLOTS, low, kept_units)


@njit(**JIT_OPTIONS)
def _add_wide_block(bits, count, flags, sums, top_exponent):
    """``add_block_sums`` of a block whose |t| span more than ``_FLOAT_WINDOW`` exponent fields: those within
    ``_WINDOW`` fields of the largest as exact int64 multiples of the window's smallest unit, the others
    (and blocks holding NaN, Inf or values from 2^126 on) entry by entry (``add_slot_sums``)."""
    if top_exponent >= 254:
        add_slot_sums(bits, count, flags, sums)
        return
    low = max(top_exponent - (_WINDOW - 1), 1)
    total_units = np.int64(0)
    kept_units = np.int64(0)
    outside = 0
    for j in range(count):
        key = bits[j] & _MAGNITUDE
        exponent = np.int64(key >> np.uint32(23))
        field = max(exponent, 1)
        significand = np.int64((key & np.uint32(0x7FFFFF)) | (np.uint32(0x800000) if exponent else np.uint32(0)))
        inside = field >= low
        units = (significand << max(field - low, 0)) if inside else np.int64(0)
        total_units += units
        kept_units += units if flags[j] else np.int64(0)
        outside += (not inside) and key != 0
    if outside:
        for j in range(count):
            key = bits[j] & _MAGNITUDE
            if key != 0 and max(np.int64(key >> np.uint32(23)), 1) < low:
                add_slot_sums(bits[j : j + 1], 1, flags[j : j + 1], sums)
    _add_window(sums, 0, low, total_units - kept_units)
    _add_window(sums, SLOTS, low, kept_units)


@njit(**JIT_OPTIONS)
def add_block_sums(bits, count, flags, sums):
    """``add_slot_sums``, vectorized, per 1024 entries: where all nonzero |t| lie within ``_FLOAT_WINDOW``
    exponent fields (the usual case) they are summed in float64, else by ``_add_wide_block`` (0.3 and 0.4
    against 1.1 ns per entry)."""
    for s in range(0, count, _WINDOW_BLOCK):
        m = min(_WINDOW_BLOCK, count - s)
        block_bits, block_flags = bits[s : s + m], flags[s : s + m]
        low, top_exponent = _float_window(block_bits, m)
        if low > 0:
            total, kept = _float_window_sums(block_bits, m, block_flags)
            _add_float_window(sums, low, total, kept)
        else:
            _add_wide_block(block_bits, m, block_flags, sums, top_exponent)


@njit(**JIT_OPTIONS)
def add_drawn_sums(bits, count, key, offset, threshold, flags, sums):
    """``add_block_sums`` with entry j kept where draw ``offset + j`` of stream ``key`` is below ``threshold``
    (DARE's draws), drawn inside the summing loop where the float window holds (``flags``: scratch)."""
    for s in range(0, count, _WINDOW_BLOCK):
        m = min(_WINDOW_BLOCK, count - s)
        block_bits = bits[s : s + m]
        low, top_exponent = _float_window(block_bits, m)
        if low > 0:
            total, kept = _float_drawn_sums(block_bits, m, key, offset + s, threshold)
            _add_float_window(sums, low, total, kept)
        else:
            keep_flags(flags, m, key, offset + s, threshold)
            _add_wide_block(block_bits, m, flags, sums, top_exponent)


def l1_factor(sums: np.ndarray) -> float:
    """mergekit's L1 rescale factor from ``(SLOT_COPIES, 2 * SLOTS)`` slot sums."""
    return l1_sums.l1_rescale_factor(*l1_sums.total_and_kept(sums.sum(axis=0)))


@njit(**JIT_OPTIONS)
def _random_sums(raws, base_raw, has_base, n, buffers, position, keys, thresholds, active, flags, sums):
    """Slot sums of |t_i| and of its entries kept by random's draws (element ``position + j`` of the tensor
    for chunk element j), for every model i that is ``active``."""
    rows, rows_bits, base, base_bits = buffers
    row, bits = rows[0], rows_bits[0]
    block = row.size
    for s in range(0, n, block):
        m = min(block, n - s)
        prefetch_inputs(raws, base_raw, has_base, s, block)
        if has_base:
            widen_block(base_raw, s, m, base_bits)
        for i in range(len(raws)):
            if active[i]:
                task_vector_row(raws[i], s, m, base, has_base, row, bits)
                add_drawn_sums(bits, m, keys[i], position + s, thresholds[i], flags, sums[i])


class StreamingRandomL1:
    """mergekit random's L1 factors of k task vectors in one pass over raw chunks (``methods.mergekit_sparsify.
    bernoulli_rescale``): ‖t‖₁ and ‖kept‖₁ over the same draws as the apply pass, summed exactly."""

    def __init__(self, keys, model_options: list[dict], rescale: bool, block: int) -> None:
        self.keys = np.asarray(keys, np.uint64)
        self.thresholds = np.array([keep_threshold(o["reserve_p"]) for o in model_options], np.uint64)
        self.active = np.array([rescale and o["reserve_p"] < 1.0 for o in model_options], np.bool_)
        self.buffers = TaskVectorBuffers.allocate(1, block)
        self.flags = np.empty(block, np.uint8)
        self.sums = np.zeros((len(self.keys), SLOT_COPIES, 2 * SLOTS), np.int64)
        self.position = 0

    def wants(self, pass_index: int) -> bool:
        return pass_index == 0 and bool(self.active.any())

    def feed(self, pass_index: int, raws, base_raw) -> None:
        """Add one chunk (raw bits, as ``FusedChunks.run`` takes them); chunks come in order."""
        inputs = chunk_inputs(raws, base_raw)
        _random_sums(*inputs, self.buffers, self.position, self.keys, self.thresholds, self.active, self.flags,
                     self.sums)
        self.position += inputs[3]

    def end_pass(self, pass_index: int) -> None:
        pass

    def statistics(self) -> list[dict]:
        """Per model {"l1_scale"}, as ``bernoulli_rescale`` gives it."""
        return [{"l1_scale": l1_factor(sums) if active else 1.0} for sums, active in zip(self.sums, self.active)]


def _significands(keys: np.ndarray) -> np.ndarray:
    """int64 24-bit significands (implicit bit included) of float32 magnitude keys."""
    keys = np.asarray(keys, np.int64)
    return (keys & 0x7FFFFF) | np.where(keys >> 23 > 0, 0x800000, 0)


#: Bucket of the magnitude key of +Inf (its plain entry); buckets above it, and its mixed entries, are NaN.
_INF_BUCKET = 0x7F800000 >> 16


class StreamingMagnitude(StreamingTrim):
    """mergekit magnitude's selection and L1 factor of k task vectors from passes over raw chunks.

    Pass 1 (and 2, where the k-th largest |t| has nonzero low bits) find the k-th largest |t|, L, as
    ``StreamingTrim`` does, with mergekit's k = max(1, int(density·n)). Entries above L are kept, and of
    the entries equal to L the last k − #{above} in index order: the selection says how many of them are
    dropped (a negative low cut, which the fused apply pass turns into an index as it meets them:
    ``kernels.mergekit_blocks.band_block``), not where they end. The L1 sums come from the histogram:
    plain entries are count × bucket value, mixed ones their exact float64 sums per bucket (exact below
    2^29 entries per bucket). Where some |t| is NaN the statistics give up (None): the NumPy method runs.
    """

    def __init__(self, numel: int, model_options: list[dict], rescale: bool, block: int) -> None:
        super().__init__(len(model_options), numel, [o["reserve_p"] for o in model_options], rescale, block)
        self.numel = numel
        self.gave_up = False
        self.targets = np.zeros(len(model_options), np.uint32)  # the bits of L
        self.dropped = np.zeros(len(model_options), np.int64)  # entries equal to L dropped (the first ones)
        self.kept_equal = np.zeros(len(model_options), np.int64)

    @staticmethod
    def keep_count(reserve_p: float, numel: int) -> int:
        return magnitude_count(reserve_p, numel) if reserve_p < 1.0 else 0

    def wants(self, pass_index: int) -> bool:
        return not self.gave_up and bool(self.keep.any()) and super().wants(pass_index)

    def end_pass(self, pass_index: int) -> None:
        super().end_pass(pass_index)
        if pass_index == 0:
            nan = (self.counts[:, _INF_BUCKET + 1 :].sum(axis=1) + self.mixed[:, _INF_BUCKET]) > 0
            self.gave_up = bool((nan & (self.keep > 0)).any())
        if not self.gave_up and not self.wants(pass_index + 1):
            self._select()

    def _select(self) -> None:
        """Per selecting model: L's bits, how many entries equal to L are kept and how many skipped."""
        refined = self._refined()
        for i in np.flatnonzero(self.keep):
            high = int(self.high[i])
            above = int(self.counts[i, high + 1 :].sum())
            if refined[i]:
                low_counts = self.low_counts[i, :_LOWS]
                low = int(kth_bucket(low_counts, self.rank_in_high[i])[0])
                above += int(low_counts[low + 1 :].sum())
                equal = int(low_counts[low])
            else:
                low = 0
                above += int(self.mixed[i, high])
                equal = int(self.counts[i, high] - self.mixed[i, high])
            self.targets[i] = (high << 16) | low
            self.kept_equal[i] = self.keep[i] - above
            self.dropped[i] = equal - self.kept_equal[i]

    def _slots(self, i: int, buckets: np.ndarray) -> np.ndarray:
        """Slot sums (``kernels.l1_sums``) of model i's |t| in ``buckets``: plain entries count × significand,
        mixed ones their exact float64 sum in units of the bucket's exponent (an Inf lands in slot 255)."""
        exponent = buckets >> 7
        slots = np.zeros(SLOTS, np.int64)
        plain = self.counts[i, buckets] - self.mixed[i, buckets]
        np.add.at(slots, exponent, plain * _significands(buckets << 16))
        units = np.ldexp(self.mixed_sums[i, buckets], 150 - np.maximum(exponent, 1))
        np.add.at(slots, exponent, units.astype(np.int64))
        return slots

    def _l1_factor(self, i: int) -> float:
        """Model i's L1 factor: ‖t‖₁ / ‖kept‖₁, both sums exact, then correctly rounded."""
        occupied = np.flatnonzero(self.counts[i])
        target = int(self.targets[i])
        high = target >> 16
        kept = self._slots(i, occupied[occupied > high])
        if self.low_counts is not None and self._refined()[i]:  # bucket high's entries above L, by low bits
            low_counts = self.low_counts[i, :_LOWS]
            above = (target & 0xFFFF) + 1 + np.flatnonzero(low_counts[(target & 0xFFFF) + 1 :])
            kept[high >> 7] += int(np.sum(low_counts[above] * _significands((high << 16) | above)))
        else:  # bucket high's mixed entries, all above its plain value L
            kept[high >> 7] += int(np.ldexp(self.mixed_sums[i, high], 150 - max(high >> 7, 1)))
        kept[target >> 23] += self.kept_equal[i] * _significands(np.array([target]))[0]
        total = self._slots(i, occupied)
        return l1_sums.l1_rescale_factor(l1_sums.exact_sum(total), l1_sums.exact_sum(kept))

    def statistics(self) -> Optional[list[dict]]:
        """Per model {"selection", "l1_scale"} as ``methods.mergekit_sparsify.magnitude_selection`` gives them,
        or None (NaN). The selection's upper end is +Inf and the tensor's end (every entry is below it), its
        low cut -1 - (entries equal to L dropped) where some are (``band_block``)."""
        if self.gave_up:
            return None
        stats = []
        for i in range(len(self.keep)):
            if not self.keep[i]:
                stats.append({"selection": None, "l1_scale": 1.0})
                continue
            low_cut = -1 - int(self.dropped[i]) if self.dropped[i] else 0
            selection = (float_of_bits(int(self.targets[i])), low_cut, math.inf, self.numel)
            stats.append({"selection": selection, "l1_scale": self._l1_factor(i) if self.rescale else 1.0})
        return stats


#: Modules whose compiled code the kernels here inline or call, for their cache stamps.
KERNEL_DEPENDENCIES = (blocks, counter_rng, draws, l1_sums, streaming)
configure_kernel_caches(globals(), [module.__file__ for module in KERNEL_DEPENDENCIES])
