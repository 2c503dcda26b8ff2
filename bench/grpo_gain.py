"""Does GRPO from a verifiable reward improve the SFT policy? The sorting task over several seeds.

For each seed: the default pipeline's SFT stage on the tiny model (`python -m align stage=pipeline
pipeline.stages=[sft]`), then GRPO from that policy with the task's gold score as the reward, no
reward model (`python -m align stage=grpo model=tiny ppo.policy=<sft>/final
ppo.reward_fn=align.tasks.sorting:gold_reward data=demo_prompts`: conf/tuning/grpo_tiny.yaml plus
the overrides given here), written as the pipeline's ppo/ stage. The pipeline is then run again with
`pipeline.stages=[sft,ppo]`: both stages are complete and skipped, and its summary evaluates the
two policies on the 200 held-out prompts (data_recipes/demo_prompts_eval, one sample each, the
pipeline's settings: 32 new tokens, temperature 1, top-p 0.9, the seed) as for the default job:
eval.json's gold_sft / gold_ppo. A second summary with `pipeline.gold_fn=bench.grpo_gain:exact_match`
gives the exact-match rates on the same samples (same seed, same settings).

The baseline is the SFT policy of the same seed; the gain counts as shown when its mean exceeds
three times its seed-to-seed standard deviation and every seed gains (bench/default_job_gain.py).
A seed's folder that already holds a complete sft/ (from an earlier run, or copied there) keeps it:
the pipeline skips a complete stage, so `--reward` or the GRPO overrides can be compared on the
same SFT policies.

    OMP_NUM_THREADS=1 .venv/bin/python bench/grpo_gain.py [--seeds 0 1 2] [--out runs/bench-grpo] \\
        [GRPO overrides, e.g. train.max_steps=40]
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

GOLD = "align.tasks.sorting:gold_reward"


def exact_match(prompts: list[str], responses: list[str]) -> list[float]:
    """1 for the sorted list exactly (the sorting task's gold score is 1.0 there and only there)."""
    from align.tasks.sorting import gold_score

    return [float(gold_score(p, r) == 1.0) for p, r in zip(prompts, responses, strict=True)]


def run_seed(seed: int, out: Path, reward: str, grpo_overrides: list[str]) -> dict:
    started, cpu_before = time.perf_counter(), children_cpu_seconds()
    run_align("stage=pipeline", "pipeline.stages=[sft]", f"seed={seed}", f"output_dir={out}")
    sft_s = time.perf_counter() - started
    t0 = time.perf_counter()
    run_align(
        "stage=grpo",
        # The tiny model's preset, pinned as the pipeline pins it: a checkpoint given without model=
        # would select model=hf and the stage's defaults (lr 1e-6, 1000 steps) instead of grpo_tiny.
        "model=tiny",
        "data=demo_prompts",
        f"ppo.policy={out / 'sft' / 'final'}",
        f"ppo.reward_fn={reward}",
        f"seed={seed}",
        f"output_dir={out / 'ppo'}",
        *grpo_overrides,
    )
    grpo_s = time.perf_counter() - t0
    (out / "ppo" / "wall_time.json").write_text(json.dumps({"seconds": grpo_s}) + "\n")
    t0 = time.perf_counter()
    run_align("stage=pipeline", "pipeline.stages=[sft,ppo]", f"seed={seed}", f"output_dir={out}")
    gold = json.loads((out / "eval.json").read_text())
    (out / "eval_gold.json").write_text(json.dumps(gold, indent=2) + "\n")
    run_align(
        "stage=pipeline",
        "pipeline.stages=[sft,ppo]",
        "pipeline.gold_fn=bench.grpo_gain:exact_match",
        f"seed={seed}",
        f"output_dir={out}",
    )
    exact = json.loads((out / "eval.json").read_text())
    (out / "eval_exact.json").write_text(json.dumps(exact, indent=2) + "\n")
    eval_s = time.perf_counter() - t0
    log = [json.loads(line) for line in (out / "ppo" / "log.jsonl").read_text().splitlines()]
    return {
        "seed": seed,
        "gold_sft": gold["gold_sft"],
        "gold_grpo": gold["gold_ppo"],
        "gain": gold["gold_ppo"] - gold["gold_sft"],
        "exact_sft": exact["gold_sft"],
        "exact_grpo": exact["gold_ppo"],
        "kl": gold["kl"],
        "reward_first": log[0]["ppo/reward_raw"],
        "reward_last": log[-1]["ppo/reward_raw"],
        "steps": len(log),
        "sft_s": sft_s,
        "grpo_s": grpo_s,
        "eval_s": eval_s,
        "minutes": (time.perf_counter() - started) / 60,
        "cpu_minutes": (children_cpu_seconds() - cpu_before) / 60,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--out", type=Path, default=REPO / "runs" / "bench-grpo")
    parser.add_argument(
        "--reward",
        default=GOLD,
        help=f"GRPO's reward function (default {GOLD}, partial credit; bench.grpo_gain:exact_match is 0/1)",
    )
    parser.add_argument("overrides", nargs="*", help="extra Hydra overrides for the GRPO runs")
    args = parser.parse_args()

    rows = [run_seed(seed, args.out / f"seed{seed}", args.reward, args.overrides) for seed in args.seeds]
    cols = ["seed", "gold_sft", "gold_grpo", "gain", "exact_sft", "exact_grpo", "kl", "reward_first"]
    cols += ["reward_last", "steps", "sft_s", "grpo_s", "eval_s", "minutes", "cpu_minutes"]
    print(f"\nGRPO reward: {args.reward}; overrides: {' '.join(args.overrides) or '(none: the grpo_tiny tuning)'}")
    print_rows(rows, cols, width=12)
    report_gains(rows, "GRPO", "grpo")
    (args.out / "gain.json").write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
