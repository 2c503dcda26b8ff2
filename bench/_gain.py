"""What the gain benches share: running align, CPU time, the per-seed table and the gain verdict."""

from __future__ import annotations

import os
import resource
import statistics
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def run_align(*overrides: str) -> None:
    """`python -m align ...` from the checkout, with bench/ importable (e.g. a `pipeline.gold_fn` of it)."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    subprocess.run([sys.executable, "-m", "align", *overrides], cwd=REPO, env=env, check=True)


def children_cpu_seconds() -> float:
    """CPU time of finished child processes: unlike the wall clock, other jobs on the machine barely move it."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def print_rows(rows: list[dict], cols: list[str], width: int = 11) -> None:
    print(" | ".join(f"{c:>{width}}" for c in cols))
    for row in rows:
        print(" | ".join(f"{row[c]:>{width}.3f}" if isinstance(row[c], float) else f"{row[c]:>{width}}" for c in cols))


def report_gains(rows: list[dict], name: str, key: str) -> None:
    """Gold and exact-match gains over the SFT policy per seed, and whether each is shown (mean above
    three times the seed-to-seed std, every seed gaining)."""
    for metric, label in (("gold", "gold"), ("exact", "exact-match")):
        gains = [r[f"{metric}_{key}"] - r[f"{metric}_sft"] for r in rows]
        mean = statistics.mean(gains)
        spread = statistics.stdev(gains) if len(gains) > 1 else float("nan")
        shown = len(gains) > 1 and mean > 3 * spread and all(g > 0 for g in gains)
        print(
            f"{label} gain of {name} over its SFT policy (held-out): per seed {', '.join(f'{g:+.3f}' for g in gains)}; "
            f"mean {mean:+.3f}, seed-to-seed std {spread:.3f}, 3 x std {3 * spread:.3f}; "
            f"mean > 3 x std and every seed gains: {shown}"
        )
