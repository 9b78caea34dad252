"""Extract a LoRA adapter from a fine-tune: the inverse of the fold, streamed module by module.

For every selected 2-D weight the workers factor fine-tune - base (``extract_worker``); every other
tensor is compared and, when it differs, stored whole. The main process then lays out the adapter
(``extract_layout``) and copies the factors and saved tensors into one safetensors file, all in a
staging directory beside ``output_path`` that is renamed into place only when complete, with the
adapter config, ``extract_report.json`` and the fine-tune's tokenizer files.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
import shutil
import time
from pathlib import Path
import numpy as np

from llm_merge.io import dtypes, side_files, writer
from llm_merge.io.reader import TensorReader
from llm_merge.io.safetensors_format import encode_header, read_header
from llm_merge.io.shards import ShardWriter, create_shards, verify_shards
from llm_merge.io.signals import stop_signals_raise
from llm_merge.lora.extract_layout import CONFIG_FILE, WEIGHTS_FILE, AdapterLayout, layout_adapter
from llm_merge.lora.extract_options import ExtractConfig, resolve_extract_config
from llm_merge.lora.extract_plan import LORA, LORA_EMBEDDING, ExtractPlan, build_extract_plan
from llm_merge.lora.extract_worker import CHUNK_ELEMENTS, ExtractWorker
from llm_merge.plan.layout import Shard
from llm_merge.run.pool import run_tasks

log = logging.getLogger(__name__)

#: The report written beside the adapter.
REPORT_FILE = "extract_report.json"
#: Directory of the workers' results inside the staging directory (removed before publishing).
_PARTS = ".parts"


def extract_lora(cfg: ExtractConfig) -> dict:
    """Extract the adapter described by ``cfg``; returns the report (also written to ``extract_report.json``).

    Every check runs before any work; the output is staged beside ``output_path`` and renamed into
    place only when complete.
    """
    cfg = resolve_extract_config(cfg)
    plan = build_extract_plan(cfg)
    output = Path(cfg.output_path)
    writer.check_output_path(output, cfg.overwrite)
    started = time.perf_counter()
    with stop_signals_raise(), writer.staging_directory(output) as staging:
        parts = staging / _PARTS
        parts.mkdir()
        make_worker = functools.partial(ExtractWorker, parts, cfg.rank_rule(), cfg.format, cfg.output_dtype)
        run_tasks(plan.tasks, make_worker, cfg.n_process, cfg.quiet, "extracting")
        layout = layout_adapter(plan, _results(parts, plan), _factors(parts, plan), cfg.format,
                                str(Path(cfg.base_model_path).resolve()))
        adapter_bytes = _write_adapter(staging / WEIGHTS_FILE[cfg.format], layout)
        shutil.rmtree(parts)
        report = _report(cfg, layout, adapter_bytes, time.perf_counter() - started)
        writer.write_json(staging / CONFIG_FILE[cfg.format], layout.config)
        writer.write_json(staging / REPORT_FILE, report)
        writer.copy_model_files(plan.tuned.path, staging, keep=lambda name: name in writer.TOKENIZER_FILES)
        writer.fsync_directory(staging)
        writer.publish(staging, output, cfg.overwrite)
    summary = report["summary"]
    log.info("extracted %d LoRA module(s) (r=%d, relative error %.4g) and %d saved tensor(s) into %s (%.1f MB) in %.1f s",
             summary["lora_modules"], layout.config["r"], summary["relative_error"], summary["saved_tensors"], output,
             adapter_bytes / 1e6, report["seconds"])
    return report


def _results(parts: Path, plan: ExtractPlan) -> dict[int, dict]:
    return {task.index: side_files.read_json(parts / f"{task.out.file}.json") for task in plan.tasks}


def _factors(parts: Path, plan: ExtractPlan) -> dict[int, dict]:
    """The headers of the factor files the workers left (modules of rank 0 have none)."""
    found = {}
    for task in plan.tasks:
        path = parts / f"{task.out.file}.safetensors"
        if task.kind in (LORA, LORA_EMBEDDING) and path.exists():
            found[task.index] = read_header(path).tensors
    return found


def _write_adapter(path: Path, layout: AdapterLayout) -> int:
    """Write the adapter's one safetensors file (header first, then each tensor at its offset); returns its size."""
    entries, offset = {}, 0
    for entry in layout.entries:
        nbytes = math.prod(entry.shape) * dtypes.itemsize(entry.dtype)
        entries[entry.name] = {"dtype": entry.dtype, "shape": list(entry.shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    header = encode_header(entries, {"format": "pt"})
    shard = Shard(file=path.name, header=header, size=len(header) + offset, names=tuple(entries))
    create_shards(path.parent, [shard])
    with TensorReader() as reader:
        out = ShardWriter(path.parent)
        try:
            for entry in layout.entries:
                _copy_entry(reader, out, path.name, len(header) + entries[entry.name]["data_offsets"][0], entry)
        finally:
            out.close()
    verify_shards(path.parent, [shard])
    return shard.size


def _copy_entry(reader: TensorReader, out: ShardWriter, file: str, start: int, entry) -> None:
    """Copy one tensor's bytes in chunks, or (a small factor) whole: transposed, or zero-padded to the common rank."""
    source = entry.source
    if tuple(entry.shape) == tuple(source.shape) and not entry.transpose:
        itemsize = dtypes.itemsize(source.dtype)
        for first in range(0, source.numel, CHUNK_ELEMENTS):
            count = min(CHUNK_ELEMENTS, source.numel - first)
            out.write(file, start + first * itemsize, reader.read_raw(source, first, count))
        return
    values = reader.read_raw(source).reshape(source.shape)
    if entry.transpose:
        out.write(file, start, np.ascontiguousarray(values.T))
        return
    padded = np.zeros(entry.shape, dtype=values.dtype)
    padded[: values.shape[0], : values.shape[1]] = values
    out.write(file, start, padded)


def _report(cfg: ExtractConfig, layout: AdapterLayout, adapter_bytes: int, seconds: float) -> dict:
    """extract_report.json: options, the adapter's r, per-tensor rows and a summary."""
    rows = layout.rows
    adapted = [row for row in rows if row["status"] in (LORA, LORA_EMBEDDING)]
    factored = adapted + [row for row in rows if row["status"] == "below_sv_epsilon"]  # these miss all of it
    norms = sum(row["delta_norm"] ** 2 for row in factored)
    missed = sum((row["relative_error"] * row["delta_norm"]) ** 2 for row in factored)
    kept = sum(row["energy_kept"] * row["delta_norm"] ** 2 for row in factored)
    summary = {
        "lora_modules": len(adapted),
        "saved_tensors": sum(row["status"] == "saved" for row in rows),
        "unchanged_tensors": sum(row["status"] == "unchanged" for row in rows),
        "excluded_changed_tensors": [row["tensor"] for row in rows if row["status"] == "excluded" and row["differs"]],
        "below_sv_epsilon": [row["module"] for row in rows if row["status"] == "below_sv_epsilon"],
        "relative_error": math.sqrt(missed / norms) if norms else 0.0,
        "energy_kept": kept / norms if norms else 1.0,
    }
    return {
        "options": dataclasses.asdict(cfg),
        "rank_rule": dataclasses.asdict(cfg.rank_rule()),
        "format": cfg.format,
        "adapter_file": WEIGHTS_FILE[cfg.format],
        "adapter_bytes": adapter_bytes,
        "r": layout.config["r"],
        "seconds": round(seconds, 3),
        "summary": summary,
        "modules": list(rows),
    }
