"""The tracker's bounded history: merging adjacent windows, and copying entries.

``ClassCostTracker`` keeps at most ``max_windows`` history entries; past that, two adjacent
entries merge into one spanning both (sample-weighted means), equal spans first and the
oldest first among equals, so the history covers the whole stream at a resolution that
halves as it grows.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

__all__ = ["copy_entry", "merge_entries", "merge_means", "pair_to_merge"]


def pair_to_merge(spans: list[int]) -> int:
    """Index of the first entry of the adjacent pair to merge (see ``ClassCostTracker``)."""
    pairs = range(len(spans) - 1)
    equal = [i for i in pairs if spans[i] == spans[i + 1]]
    if equal:
        return min(equal, key=lambda i: (spans[i], i))
    return min(pairs, key=lambda i: (spans[i] + spans[i + 1], i))


def merge_entries(first: Mapping[str, Any], second: Mapping[str, Any]) -> dict[str, Any]:
    """One history entry spanning two adjacent ones (sample-weighted means)."""
    sizes = (sum(first["exit_histogram"]), sum(second["exit_histogram"]))
    merged = {"start": first["start"], "end": second["end"], **merge_means(first, second, "")}
    merged["exit_histogram"] = [a + b for a, b in zip(first["exit_histogram"],
                                                      second["exit_histogram"], strict=True)]
    merged["mean_flops_all"] = ((first["mean_flops_all"] * sizes[0]
                                 + second["mean_flops_all"] * sizes[1]) / sum(sizes))
    if "counts_true" in first or "counts_true" in second:
        merged.update(merge_means(first, second, "_true"))
    return merged


def merge_means(first: Mapping[str, Any], second: Mapping[str, Any],
                 suffix: str) -> dict[str, dict[int, float | int]]:
    """Per-class counts and sample-weighted mean FLOPs of two entries together."""
    parts = [(entry.get(f"counts{suffix}", {}), entry.get(f"mean_flops{suffix}", {}))
             for entry in (first, second)]
    counts: dict[int, int] = {}
    totals: dict[int, float] = {}
    for part_counts, part_means in parts:
        for c, n in part_counts.items():
            counts[c] = counts.get(c, 0) + n
            totals[c] = totals.get(c, 0.0) + part_means[c] * n
    classes = sorted(counts)
    return {f"mean_flops{suffix}": {c: totals[c] / counts[c] for c in classes},
            f"counts{suffix}": {c: counts[c] for c in classes}}


def copy_entry(entry: Mapping[str, Any]) -> dict[str, Any]:
    """Copy a history entry; class-keyed dicts get int keys back (JSON turns them into str)."""
    copied = {}
    for key, value in entry.items():
        if isinstance(value, Mapping):
            value = {int(c): v for c, v in value.items()}
        elif isinstance(value, list):
            value = list(value)
        copied[key] = value
    return copied
