"""Does the default job show alignment working? The full default pipeline over several seeds.

Runs `python -m align seed=S output_dir=...` (SFT -> RM -> PPO on the tiny model and the sorting
demo task) for each seed and prints, per seed and overall, the gold score of the SFT policy and
of the PPO policy on the held-out prompts, the gain, the proxy reward, the KL to the reference,
the RM's held-out accuracy, the SFT eval loss, the wall time per stage and the job's CPU time
(which other jobs on a shared machine barely move). The baseline is the SFT policy of the same
run; the gain counts as shown when its mean exceeds three times its seed-to-seed standard
deviation and every seed gains.

    OMP_NUM_THREADS=1 python bench/default_job_gain.py [--seeds 0 1 2] [--out runs/bench-default]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # bench._gain
from bench._gain import children_cpu_seconds, print_rows  # noqa: E402


def run_seed(seed: int, out: Path, extra: list[str]) -> dict:
    started, cpu_before = time.perf_counter(), children_cpu_seconds()
    subprocess.run(
        [sys.executable, "-m", "align", f"seed={seed}", f"output_dir={out}", *extra],
        cwd=REPO,
        check=True,
    )
    evaluation = json.loads((out / "eval.json").read_text())
    ppo = json.loads((out / "ppo" / "metrics.json").read_text())
    rm = json.loads((out / "rm" / "metrics.json").read_text())
    sft = json.loads((out / "sft" / "metrics.json").read_text())
    walls = {
        stage: json.loads((out / stage / "wall_time.json").read_text())["seconds"] for stage in ("sft", "rm", "ppo")
    }
    return {
        "seed": seed,
        "gold_sft": evaluation["gold_sft"],
        "gold_ppo": evaluation["gold_ppo"],
        "gain": evaluation["gold_ppo"] - evaluation["gold_sft"],
        "proxy_sft": evaluation["proxy_sft"],
        "proxy_ppo": evaluation["proxy_ppo"],
        "kl": evaluation["kl"],
        "rm_accuracy": rm["eval/accuracy"],
        "sft_loss": sft["eval/loss"],
        "train_kl": ppo["ppo/kl"],
        **{f"{stage}_s": seconds for stage, seconds in walls.items()},
        "minutes": (time.perf_counter() - started) / 60,
        "cpu_minutes": (children_cpu_seconds() - cpu_before) / 60,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--out", type=Path, default=REPO / "runs" / "bench-default")
    parser.add_argument("overrides", nargs="*", help="extra Hydra overrides for every run")
    args = parser.parse_args()

    rows = [run_seed(seed, args.out / f"seed{seed}", args.overrides) for seed in args.seeds]
    cols = ["seed", "gold_sft", "gold_ppo", "gain", "proxy_sft", "proxy_ppo", "kl", "rm_accuracy", "sft_loss"]
    cols += ["sft_s", "rm_s", "ppo_s", "minutes", "cpu_minutes"]
    print()
    print_rows(rows, cols)
    gains = [r["gain"] for r in rows]
    mean = statistics.mean(gains)
    spread = statistics.stdev(gains) if len(gains) > 1 else float("nan")
    print(
        f"\ngold gain of PPO over its SFT policy (baseline): mean {mean:+.3f}, seed-to-seed std {spread:.3f}, "
        f"ratio {mean / spread if spread else float('inf'):.1f}; every seed gains: {all(g > 0 for g in gains)}"
    )
    print(
        f"max wall time per default job: {max(r['minutes'] for r in rows):.1f} min (target <= 10), "
        f"max CPU time {max(r['cpu_minutes'] for r in rows):.1f} min"
    )
    (args.out / "gain.json").write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
