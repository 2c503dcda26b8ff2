"""What a recipe load returns: the datasets, a per-source report and a fingerprint for lineage."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import datasets

# Rows dropped for these reasons are filtered by design, under either on_error policy; every other
# reason is a malformed row, which stops the run under on_error: raise.
FILTER_REASONS = ("too_long", "duplicate", "chosen_equals_rejected", "tied_scores")


@dataclass
class SourceReport:
    """One source's accounting: rows_read = rows_kept + sum(dropped) for one-row-per-row formats.

    Ranked formats make several pairs of one row, so there rows_kept counts pairs. rows_train and
    rows_eval count what the source contributes after the eval split and the mixture's sampling.
    """

    name: str
    recipe: str
    format: str
    role: str = "train"  # "train" or "eval" (a source listed under eval.sources)
    rows_read: int = 0
    rows_kept: int = 0
    dropped: dict[str, int] = field(default_factory=dict)
    rows_train: int = 0
    rows_eval: int = 0

    def drop(self, reason: str) -> None:
        self.dropped[reason] = self.dropped.get(reason, 0) + 1

    def line(self) -> str:
        dropped = sum(self.dropped.values())
        reasons = ", ".join(f"{k} {v}" for k, v in sorted(self.dropped.items()))
        return (
            f"{self.role} source {self.name!r} ({self.format}, {self.recipe}): read {self.rows_read}, "
            f"kept {self.rows_kept}, dropped {dropped}{f' ({reasons})' if reasons else ''}"
            f" -> train {self.rows_train}, eval {self.rows_eval}"
        )


@dataclass
class RecipeData:
    train: datasets.Dataset
    eval: datasets.Dataset | None
    reports: list[SourceReport]
    fingerprint: str  # sha256 of the processed rows, in order; lineage manifests record it

    def summary(self) -> str:
        dropped = sum((Counter(r.dropped) for r in self.reports), Counter())
        return (
            f"{len(self.train)} train rows, {len(self.eval) if self.eval is not None else 0} eval rows, "
            f"{sum(dropped.values())} dropped; fingerprint {self.fingerprint[:12]}"
        )
