"""The summary of a finished run: metrics with bootstrap CIs over the scored samples, errors counted."""

from __future__ import annotations

import csv
import io
import json
import platform
from collections import Counter
from collections.abc import Sequence
from importlib import metadata

from grounding.metrics import rec_columns, summarize_scores, vqa_columns


def package_versions(*extra: str) -> dict[str, str]:
    """Python's and the toolkit's core packages' versions, and those of the `extra` packages named."""
    versions = {"python": platform.python_version()}
    for package in ("gap-toolkit", "torch", "transformers", "tokenizers", "numpy", "pyarrow", *extra):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = "not installed"
    return versions


def summarize(records: Sequence[dict], task: str, *, resamples: int = 1000, seed: int = 0) -> dict:
    """`records` in sample order; errors are counted by kind and left out of the metrics."""
    scored = [record for record in records if record.get("error") is None]
    errors = [record for record in records if record.get("error") is not None]
    columns = rec_columns(scored) if task == "rec" else vqa_columns(scored)
    summary = {
        "task": task,
        "n_samples": len(records),
        "n_scored": len(scored),
        "n_errors": len(errors),
        "errors_by_kind": dict(sorted(Counter(record["error_kind"] for record in errors).items())),
        "metrics": summarize_scores(columns, resamples=resamples, seed=seed),
    }
    summary["cost"] = cost_summary(scored)
    if task == "rec":
        summary["n_unparsed"] = sum(not record["parsed"] for record in scored)
        summary["lmms_eval_parse_disagreements"] = sum(not record["lmms_eval_agrees"] for record in scored)
    return summary


COST_FIELDS = ("num_visual_fed", "num_visual_layer_mean", "prefill_flops", "prefill_seconds", "decode_seconds_per_step")
# Wall-clock and memory readings: the fields of a record that two identical runs do not reproduce.
MEASURED_FIELDS = ("prefill_seconds", "decode_seconds_per_step", "peak_memory_bytes")


def cost_summary(records: Sequence[dict]) -> dict:
    """Means of the per-sample cost fields, and the largest peak memory, over the records that have them.

    Records written before a field existed (a run resumed across versions) are left out of its mean.
    """
    cost = {}
    for name in COST_FIELDS:
        values = [record[name] for record in records if record.get(name) is not None]
        cost[name] = sum(values) / len(values) if values else None
    peaks = [record["peak_memory_bytes"] for record in records if record.get("peak_memory_bytes") is not None]
    cost["peak_memory_bytes"] = max(peaks) if peaks else None
    return cost


def metrics_csv(summary: dict) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["metric", "value", "ci95_low", "ci95_high", "n"])
    for name, entry in summary["metrics"].items():
        writer.writerow([name, f"{entry['value']:.6f}", f"{entry['ci95'][0]:.6f}", f"{entry['ci95'][1]:.6f}",
                         entry["n"]])
    return buffer.getvalue()


def summary_json(summary: dict) -> str:
    return json.dumps(summary, indent=2, ensure_ascii=False) + "\n"
