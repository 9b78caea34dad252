"""The JSON and text records written over a merge's copied model files."""

from __future__ import annotations

import dataclasses

from llm_merge.config.options import MergeConfig
from llm_merge.plan.layout import MergePlan
from llm_merge.report.card import model_card
from llm_merge.run.ranks import RANK_OPTIONS


def merge_record(cfg: MergeConfig, plan: MergePlan) -> dict:
    """merge_config.json: the options, and the resolved per-tensor values when any.

    The multi-rank options are recorded at their defaults: they never change the output, so
    replaying the record in one process gives the same model.
    """
    defaults = {f.name: f.default for f in dataclasses.fields(MergeConfig) if f.name in RANK_OPTIONS}
    record = dataclasses.asdict(dataclasses.replace(cfg, **defaults))
    if plan.tensor_parameters:
        record["resolved_tensor_parameters"] = plan.tensor_parameters
    return record


def output_records(cfg: MergeConfig, plan: MergePlan) -> dict[str, object]:
    """Every record of a merge: config.json when it must change, the model card (``--model_card``), merge_config.json."""
    card = {"README.md": model_card(cfg, cfg.recipe_text)} if cfg.model_card else {}
    return {**plan.records, **card, "merge_config.json": merge_record(cfg, plan)}
