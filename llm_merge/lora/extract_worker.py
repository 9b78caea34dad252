"""One extraction task in a worker: fine-tune - base read in float32, then factored or compared.

A ``lora`` / ``lora_embedding`` task leaves its factors, already laid out as the adapter format
stores them, in ``{parts}/{file}.safetensors`` (tensors ``A`` and ``B``: PEFT lora_A [r, in] and
lora_B [out, r], transposed for embeddings; PaddleNLP lora_A [in, r] and lora_B [r, out], where
"in" and "out" are the stored dimensions of the weight); every task leaves its figures in
``{parts}/{file}.json``. The main process assembles the adapter from these once all tasks are done
(``llm_merge.lora.extract``): the final ranks, and so the adapter's layout, are only known then.

Memory: the update is held whole in float32 (the SVD needs it), with the SVD's own arrays beside
it; both inputs are read in chunks. Updates larger than ``EXCLUSIVE_BYTES`` are factored one at a
time across workers.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Optional

import numpy as np
from safetensors.numpy import save_file

from llm_merge.errors import MergeError
from llm_merge.io import dtypes
from llm_merge.io.reader import TensorReader
from llm_merge.io.safetensors_format import TensorInfo
from llm_merge.lora import lowrank
from llm_merge.lora.adapter import PEFT
from llm_merge.lora.extract_options import RankRule
from llm_merge.lora.extract_plan import LORA, LORA_EMBEDDING, ExtractTask

#: Elements read per chunk (4 MiB of float32).
CHUNK_ELEMENTS = 1 << 20
#: Updates of more float32 bytes than this are factored one at a time across workers (pool's lock).
EXCLUSIVE_BYTES = 1 << 30


class ExtractWorker:
    """Runs extraction tasks, leaving results in ``parts``; one instance per worker process."""

    def __init__(self, parts: Path, rule: RankRule, adapter_format: str, factor_dtype: str,
                 chunk_elements: Optional[int] = None) -> None:
        self.parts = Path(parts)
        self.rule = rule
        self.format = adapter_format
        self.factor_dtype = dtypes.to_numpy(dtypes.OUTPUT_DTYPES[factor_dtype])
        self.chunk = chunk_elements or CHUNK_ELEMENTS
        self.reader = TensorReader()
        self._scratch = np.empty(0, dtype=np.float32)

    def exclusive(self, task: ExtractTask) -> bool:
        return task.kind in (LORA, LORA_EMBEDDING) and task.base.numel * 4 > EXCLUSIVE_BYTES

    def close(self) -> None:
        self.reader.close()

    def run(self, task: ExtractTask) -> int:
        """Factor or compare one tensor; returns the bytes read (the progress bar's unit)."""
        if task.kind in (LORA, LORA_EMBEDDING):
            result = self._factor(task)
        else:
            result = {"differs": self._differs(task)}
        (self.parts / f"{task.out.file}.json").write_text(json.dumps(result))
        return task.in_bytes

    def _factor(self, task: ExtractTask) -> dict:
        delta = self._delta(task)
        total = lowrank.squared_norm(delta)
        if not math.isfinite(total):
            raise MergeError(f"tensor {task.name}: the update (fine-tune - base) holds NaN/Inf values or overflows "
                             "float32; it has no low-rank approximation (--exclude it)")
        if total == 0.0:
            return {"rank": 0, "delta_norm": 0.0, "max_singular_value": 0.0, "relative_error": 0.0, "energy_kept": 1.0,
                    "svd": None}
        u, s, vt, exact = lowrank.truncated_svd(delta, self.rule.candidates(delta.shape), lowrank.name_seed(task.name))
        rank = lowrank.choose_rank(s, total, rank=self.rule.rank, energy=self.rule.energy, sv_epsilon=self.rule.sv_epsilon)
        result = {"rank": rank, "delta_norm": math.sqrt(total), "max_singular_value": float(s[0]),
                  "energy_kept": lowrank.energy_kept(s, rank, total), "svd": "exact" if exact else "randomized"}
        if rank == 0:  # every singular value at or below --sv_epsilon
            return {**result, "relative_error": 1.0}
        left, right = lowrank.split_factors(u, s, vt, rank)
        del u, vt
        left, right = left.astype(self.factor_dtype), right.astype(self.factor_dtype)
        # the error of the factors as stored (after rounding to the factor dtype)
        residual = lowrank.squared_residual(delta, left.astype(np.float32), right.astype(np.float32))
        result["relative_error"] = math.sqrt(residual / total)
        save_file(self._oriented(task, left, right), str(self.parts / f"{task.out.file}.safetensors"))
        return result

    def _oriented(self, task: ExtractTask, left: np.ndarray, right: np.ndarray) -> dict[str, np.ndarray]:
        """A and B as the format stores them, from left @ right = the update as stored ([rows, cols])."""
        if self.format != PEFT:  # PaddleNLP: lora_A @ lora_B
            a, b = left, right
        elif task.kind == LORA_EMBEDDING:  # PEFT embeddings: (lora_B @ lora_A).T
            a, b = left.T, right.T
        else:  # PEFT linear: lora_B @ lora_A
            a, b = right, left
        return {"A": np.ascontiguousarray(a), "B": np.ascontiguousarray(b)}

    def _delta(self, task: ExtractTask) -> np.ndarray:
        """fine-tune - base as a float32 matrix, both read a chunk at a time."""
        numel = task.base.numel
        delta = np.empty(numel, dtype=np.float32)
        for start in range(0, numel, self.chunk):
            stop = min(numel, start + self.chunk)
            self.reader.read_f32(task.tuned, start, delta[start:stop])
            delta[start:stop] -= self._read_f32(task.base, start, stop - start)
        return delta.reshape(task.shape)

    def _differs(self, task: ExtractTask) -> bool:
        """Whether the fine-tune's tensor differs from the base's: bytes (one dtype) or values (two)."""
        numel = task.base.numel
        same_dtype = task.base.dtype == task.tuned.dtype
        floats = task.base.dtype in dtypes.MERGEABLE
        for start in range(0, numel, self.chunk):
            count = min(self.chunk, numel - start)
            if same_dtype:
                ours = self.reader.read_raw(task.tuned, start, count).view(np.uint8)
                theirs = self.reader.read_raw(task.base, start, count).view(np.uint8)
            elif floats:
                ours = self.reader.read_f32(task.tuned, start, np.empty(count, dtype=np.float32))
                theirs = self._read_f32(task.base, start, count)
            else:
                ours, theirs = self.reader.read_raw(task.tuned, start, count), self.reader.read_raw(task.base, start, count)
            if not np.array_equal(ours, theirs):
                return True
        return False

    def _read_f32(self, info: TensorInfo, start: int, count: int) -> np.ndarray:
        """Elements [start, start+count) as float32 in a reused buffer (valid until the next call)."""
        if self._scratch.size < count:
            self._scratch = np.empty(max(count, self.chunk), dtype=np.float32)
        return self.reader.read_f32(info, start, self._scratch[:count])
