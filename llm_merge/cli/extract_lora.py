"""Command line of ``llm-merge-extract-lora`` / ``tools/extract_lora.py``: ``main(argv) -> exit code``."""

from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

from llm_merge.cli.common import (OneLineParser, add_debug_and_version, add_option_flags, one_blas_thread,
                                  options_from_flags, quiet_logging, run_command)
from llm_merge.lora.extract_options import ExtractConfig

#: Rows of the report table printed on stdout; the rest are counted (extract_report.json has them all).
TABLE_ROWS = 200


def build_parser() -> argparse.ArgumentParser:
    """An argparse parser with one flag per ExtractConfig field (defaults suppressed: the dataclass holds them)."""
    parser = OneLineParser(
        prog="llm-merge-extract-lora",
        description=(
            "Extract a LoRA adapter from a fine-tune: for every 2-D weight of the linear modules, the truncated "
            "SVD of (fine-tune - base) in float32 gives lora_B @ lora_A; changed norms, biases and (by default) "
            "embeddings are stored whole. Writes a Hugging Face PEFT (or PaddleNLP) adapter and a report."
        ),
    )
    add_option_flags(parser, ExtractConfig, required=("base_model_path", "model_path", "output_path"))
    add_debug_and_version(parser)
    return parser


def parse_config(argv: Optional[Sequence[str]] = None) -> ExtractConfig:
    """Parse flags into an unresolved ExtractConfig."""
    return options_from_flags(build_parser(), ExtractConfig, argv)


def format_report(report: dict) -> str:
    """The report as a table: one row per LoRA module, then saved, excluded and summary lines."""
    rows = report["modules"]
    adapted = [row for row in rows if row["status"] in ("lora", "lora_embedding")]
    width = max([len("module")] + [len(row["module"]) for row in adapted[:TABLE_ROWS]])
    lines = [f"{'module':<{width}}  {'shape':>14}  {'rank':>5}  {'rel. error':>10}  {'energy kept':>11}  svd"]
    for row in adapted[:TABLE_ROWS]:
        shape = "x".join(map(str, row["shape"]))
        lines.append(f"{row['module']:<{width}}  {shape:>14}  {row['rank']:>5}  {row['relative_error']:>10.4g}  "
                     f"{row['energy_kept']:>11.4g}  {row['svd']}")
    if len(adapted) > TABLE_ROWS:
        lines.append(f"... and {len(adapted) - TABLE_ROWS} more LoRA modules (see extract_report.json)")
    saved = [row["tensor"] for row in rows if row["status"] == "saved"]
    if saved:
        lines.append(f"saved whole ({len(saved)}): {', '.join(saved[:10])}{' ...' if len(saved) > 10 else ''}")
    summary = report["summary"]
    for key, label in (("excluded_changed_tensors", "changed but excluded"), ("below_sv_epsilon", "below --sv_epsilon")):
        if summary[key]:
            lines.append(f"{label} ({len(summary[key])}): {', '.join(summary[key][:10])}{' ...' if len(summary[key]) > 10 else ''}")
    lines.append(
        f"{summary['lora_modules']} LoRA modules (r={report['r']}), {summary['saved_tensors']} saved tensors, "
        f"{summary['unchanged_tensors']} unchanged; relative error of the update {summary['relative_error']:.4g}, "
        f"energy kept {summary['energy_kept']:.4g}; {report['adapter_file']} {report['adapter_bytes'] / 1e6:.1f} MB "
        f"in {report['seconds']:.1f} s"
    )
    return "\n".join(lines)


def _extract_command(argv: Optional[Sequence[str]]) -> None:
    cfg = parse_config(argv)
    quiet_logging(cfg.quiet)
    from llm_merge.lora.extract import extract_lora  # after parsing: keeps --help fast

    report = extract_lora(cfg)
    if not cfg.quiet:
        print(format_report(report))


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Extract a LoRA adapter from command-line flags; returns the process exit code."""
    return run_command(argv, _extract_command)


def main_entry() -> None:
    """Console-script entry point (``llm-merge-extract-lora``, ``tools/extract_lora.py``): one BLAS thread per
    process (``--n_process`` is the parallelism; set OPENBLAS_NUM_THREADS to choose otherwise), then ``main``."""
    one_blas_thread()
    sys.exit(main())
