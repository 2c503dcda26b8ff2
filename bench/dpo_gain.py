"""Does DPO improve the SFT policy? The sorting task's preference pairs over several seeds.

For each seed: the default pipeline's SFT stage on the tiny model, then `python -m align
stage=pipeline pipeline.stages=[sft,dpo] seed=S` (SFT complete and skipped; DPO from sft/final on
the demo preference pairs, conf/tuning/dpo_tiny.yaml plus the overrides given, as
`pipeline.dpo=[...]`). Its summary evaluates both policies on the 200 held-out prompts
(data_recipes/demo_prompts_eval, one sample each, the pipeline's settings) with the gold score:
eval.json's gold_sft / gold_dpo; a second summary with `pipeline.gold_fn=bench.grpo_gain:exact_match`
gives the exact-match rates on the same samples. DPO's held-out preference accuracy (the share of
held-out pairs whose chosen response gains more log-probability over the reference than the
rejected one) is read from its metrics.json.

The baseline is the SFT policy of the same seed; a gain counts as shown when its mean exceeds
three times its seed-to-seed standard deviation and every seed gains. A seed folder that holds a
complete sft/ keeps it (the pipeline skips a complete stage), so the SFT policies can be those of
bench/grpo_gain.py (copy its seed folders' sft/).

    OMP_NUM_THREADS=1 .venv/bin/python bench/dpo_gain.py [--seeds 0 1 2] [--out runs/bench-dpo] \\
        [DPO overrides, e.g. train.max_steps=160]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # bench._gain, and `align` from this checkout
from bench._gain import children_cpu_seconds, print_rows, report_gains, run_align  # noqa: E402


def run_seed(seed: int, out: Path, dpo_overrides: list[str]) -> dict:
    started, cpu_before = time.perf_counter(), children_cpu_seconds()
    run_align("stage=pipeline", "pipeline.stages=[sft]", f"seed={seed}", f"output_dir={out}")
    sft_s = time.perf_counter() - started
    pipeline = ["stage=pipeline", "pipeline.stages=[sft,dpo]", f"seed={seed}", f"output_dir={out}"]
    if dpo_overrides:
        pipeline.append(f"pipeline.dpo=[{','.join(repr(o) for o in dpo_overrides)}]")  # quoted: Hydra's list syntax
    t0 = time.perf_counter()
    run_align(*pipeline)
    dpo_and_eval_s = time.perf_counter() - t0
    gold = json.loads((out / "eval.json").read_text())
    (out / "eval_gold.json").write_text(json.dumps(gold, indent=2) + "\n")
    run_align(*pipeline, "pipeline.gold_fn=bench.grpo_gain:exact_match")
    exact = json.loads((out / "eval.json").read_text())
    (out / "eval_exact.json").write_text(json.dumps(exact, indent=2) + "\n")
    metrics = json.loads((out / "dpo" / "metrics.json").read_text())
    return {
        "seed": seed,
        "gold_sft": gold["gold_sft"],
        "gold_dpo": gold["gold_dpo"],
        "exact_sft": exact["gold_sft"],
        "exact_dpo": exact["gold_dpo"],
        "kl": gold["kl"],
        "pref_acc": metrics["eval/rewards/accuracies"],
        "margin": metrics["eval/rewards/margins"],
        "steps": int(metrics["train/steps"]),
        "dpo_s": json.loads((out / "dpo" / "wall_time.json").read_text())["seconds"],
        "sft_s": sft_s,
        "dpo_eval_s": dpo_and_eval_s,
        "minutes": (time.perf_counter() - started) / 60,
        "cpu_minutes": (children_cpu_seconds() - cpu_before) / 60,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--out", type=Path, default=REPO / "runs" / "bench-dpo")
    parser.add_argument("overrides", nargs="*", help="extra Hydra overrides for the DPO stage")
    args = parser.parse_args()

    rows = [run_seed(seed, args.out / f"seed{seed}", args.overrides) for seed in args.seeds]
    cols = ["seed", "gold_sft", "gold_dpo", "exact_sft", "exact_dpo", "kl", "pref_acc", "margin", "steps"]
    cols += ["dpo_s", "sft_s", "dpo_eval_s", "minutes", "cpu_minutes"]
    print(f"\nDPO overrides: {' '.join(args.overrides) or '(none: the dpo_tiny tuning)'}")
    print_rows(rows, cols)
    report_gains(rows, "DPO", "dpo")
    (args.out / "gain.json").write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
