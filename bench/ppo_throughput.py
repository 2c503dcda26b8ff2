"""PPO throughput: align's `stage=ppo` against trl==0.24.0's PPOTrainer, in one run.

    .venv/bin/python bench/ppo_throughput.py                 # both sizes, ~8 minutes on 2 CPU cores
    .venv/bin/python bench/ppo_throughput.py --sizes 125k --steps 10
    .venv/bin/python bench/ppo_throughput.py --sizes 20m --precision both   # fp32 and bf16, ~2x as long

Measures episodes per second and where a step's time goes (generation, scoring, update) on a
~125k- and a ~20M-parameter Qwen2, with the same settings on both sides: 8 prompts x 1 response
per step, 32-token responses, 1 PPO epoch in 1 mini-batch of 8, the same precision (--precision:
fp32, bf16 mixed precision over fp32 weights, or both in one run), a reward model built from
the same config on both sides and the value model initialised from it, the same chat-rendered
prompts (data_recipes/demo_prompts). Both sides are started as subprocesses, and the same
outside clock times both: each writes one JSON line per step (align: log.jsonl; TRL:
bench/_trl024_ppo.py's hooks), this script stamps each line as it appears with the wall clock
and the child's CPU time. Episodes/s is the batch over the median step time of the steps after
the warm-up, so start-up (imports, model loading) is excluded and a step slowed by another
process does not count; the sides run in alternating rounds (--rounds) and each keeps its best.
The split is each side's in-process timers (medians too).

bf16: align runs with train.precision=bf16 (autocast over generation, scoring and the update), TRL
with PPOConfig(bf16=True), which autocasts only what Accelerate wraps (see bench/_trl024_ppo.py).
The bf16 hardware is printed beside the ratios: without a GPU, AMX or AVX512-BF16 bf16 is emulated
and slower than fp32.

TRL 0.24 needs transformers 4.x, so its side runs in its own virtual environment,
bench/.venv-trl024, created on first use (pip; torch 2.13.0 CPU comes from the local wheels).

Threads: --threads (default 1) sets OMP_NUM_THREADS for both sides. On a 2-core machine that
other jobs share, two torch threads per process make both sides up to 100x slower and the
numbers meaningless (a spinning OpenMP barrier waits for a descheduled thread).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # `align` from this checkout, as `python -m align` finds it
from bench._timing import SIZES, SPLIT, run_stamped, summarize  # noqa: E402

TRL_VENV = ROOT / "bench" / ".venv-trl024"
TRL_REQUIREMENTS = ["torch==2.13.0", "trl==0.24.0", "transformers==4.57.6"]
TRL_SCRIPT = ROOT / "bench" / "_trl024_ppo.py"

BATCH = 8  # prompts per step = TRL per_device_train_batch_size; 1 response each
RESPONSE_LENGTH = 32


def ensure_trl_venv() -> Path:
    python = TRL_VENV / "bin" / "python"
    check = [str(python), "-c", "import trl, sys; sys.exit(trl.__version__ != '0.24.0')"]
    if python.exists() and subprocess.run(check, capture_output=True).returncode == 0:
        return python
    print(f"creating {TRL_VENV.relative_to(ROOT)} with {' '.join(TRL_REQUIREMENTS)} ...", flush=True)
    subprocess.run([sys.executable, "-m", "venv", str(TRL_VENV)], check=True)
    subprocess.run([str(python), "-m", "pip", "install", "-q", *TRL_REQUIREMENTS], check=True)
    subprocess.run(check, check=True)
    return python


def build_models(work: Path, sizes: list[str]) -> dict[str, dict[str, Path]]:
    """A policy and a reward model per size, random weights, our tiny tokenizer beside each."""
    import torch
    from transformers import (
        AutoTokenizer,
        Qwen2Config,
        Qwen2ForCausalLM,
        Qwen2ForSequenceClassification,
    )

    tokenizer = AutoTokenizer.from_pretrained(ROOT / "align" / "assets" / "tiny")
    dirs = {}
    for name in sizes:
        shape = SIZES[name]
        config = Qwen2Config(
            vocab_size=len(tokenizer),
            max_position_embeddings=1024,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            bos_token_id=None,
            **shape,
        )
        torch.manual_seed(0)
        policy = Qwen2ForCausalLM(config)
        config.num_labels = 1
        reward = Qwen2ForSequenceClassification(config)
        dirs[name] = {"policy": work / name / "policy", "rm": work / name / "rm"}
        for model, path in ((policy, dirs[name]["policy"]), (reward, dirs[name]["rm"])):
            model.save_pretrained(path)
            tokenizer.save_pretrained(path)
        dirs[name]["params"] = sum(p.numel() for p in policy.parameters())
    return dirs


def write_prompts(work: Path, policy_dir: Path) -> Path:
    """The demo prompts, chat-rendered and tokenised by align, for TRL to read as they are."""
    from align.config import ModelConfig
    from align.data import load_recipe_data
    from align.modeling import models

    tokenizer = models.load_tokenizer(ModelConfig(name_or_path=str(policy_dir), init="pretrained"))
    rows = load_recipe_data("demo_prompts", "prompt", tokenizer, seed=42).train
    path = work / "prompts.jsonl"
    with path.open("w") as f:
        for row in rows:
            f.write(json.dumps({"input_ids": row["prompt_input_ids"]}) + "\n")
    return path


def run_trl(python: Path, dirs: dict, prompts: Path, work: Path, total: int, precision: str, env: dict) -> list[dict]:
    lines = work / "trl_steps.jsonl"
    cmd = [
        str(python),
        str(TRL_SCRIPT),
        "--policy", str(dirs["policy"]),
        "--reward-model", str(dirs["rm"]),
        "--prompts", str(prompts),
        "--steps", str(total),
        "--batch", str(BATCH),
        "--response-length", str(RESPONSE_LENGTH),
        "--output-dir", str(work / "trl_out"),
        "--out", str(lines),
        "--precision", precision,
    ]  # fmt: skip
    return run_stamped(cmd, lines, work / "trl.log", env)[0]


def run_ours(dirs: dict, work: Path, total: int, precision: str, env: dict) -> list[dict]:
    out = work / "align_out"
    cmd = [
        sys.executable, "-m", "align",
        "stage=ppo",
        "data=demo_prompts",
        f"model.name_or_path={dirs['policy']}",
        "model.init=pretrained",
        f"ppo.reward_model={dirs['rm']}",
        f"ppo.prompts_per_step={BATCH}",
        "ppo.responses_per_prompt=1",
        f"ppo.max_new_tokens={RESPONSE_LENGTH}",
        "ppo.epochs=1",
        "ppo.mini_batches=1",
        f"train.batch_size={BATCH}",
        "ppo.value_warmup_steps=0",
        # TRL 0.24 samples with top_p=1.0 and no top-k, whatever its config says.
        "ppo.temperature=1.0",
        "ppo.top_p=1.0",
        "ppo.sample_every=0",
        f"train.precision={precision}",
        f"train.max_steps={total}",
        "train.save_steps=0",
        "seed=42",
        f"output_dir={out}",
        "resume=never",
    ]  # fmt: skip
    return run_stamped(cmd, out / "log.jsonl", work / "align.log", env)[0]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", default="125k,20m", help=f"comma-separated, of {', '.join(SIZES)}")
    ap.add_argument("--steps", type=int, default=20, help="timed steps per run")
    ap.add_argument("--warmup", type=int, default=3, help="steps run before the timing starts")
    ap.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS for both sides")
    ap.add_argument("--rounds", type=int, default=2, help="runs per side, interleaved; each side's best counts")
    ap.add_argument(
        "--precision", default="fp32", choices=["fp32", "bf16", "both"], help="both sides' precision (default fp32)"
    )
    ap.add_argument("--workdir", default=None, help="keep models and logs here (default: a temp dir)")
    args = ap.parse_args()
    sizes = args.sizes.split(",")
    precisions = ["fp32", "bf16"] if args.precision == "both" else [args.precision]
    total = args.warmup + args.steps

    trl_python = ensure_trl_venv()
    env = {
        **os.environ,
        "OMP_NUM_THREADS": str(args.threads),
        "MKL_NUM_THREADS": str(args.threads),
        "TOKENIZERS_PARALLELISM": "false",
        "TRL_EXPERIMENTAL_SILENCE": "1",
        "HF_HUB_OFFLINE": "1",
        "PYTHONPATH": str(ROOT),
    }
    tmp = tempfile.TemporaryDirectory(prefix="ppo_bench_") if args.workdir is None else None
    work = Path(args.workdir or tmp.name)
    work.mkdir(parents=True, exist_ok=True)
    dirs = build_models(work, sizes)
    prompts = write_prompts(work, dirs[sizes[0]]["policy"])

    # Rounds alternate the sides (and precisions), so a stretch of load from other processes hits
    # all of them; each is then judged by its best round (as timeit takes the minimum).
    rounds: dict[tuple[str, str, str], list[dict[str, float]]] = {}
    for size in sizes:
        size_dir = work / f"run_{size}"
        size_dir.mkdir(exist_ok=True)
        for round_ in range(1, args.rounds + 1):
            for precision in precisions:
                for side in ("trl", "align"):
                    side_dir = size_dir / f"{side}_{precision}"
                    side_dir.mkdir(exist_ok=True)
                    t0 = time.perf_counter()
                    rows = (
                        run_trl(trl_python, dirs[size], prompts, side_dir, total, precision, env)
                        if side == "trl"
                        else run_ours(dirs[size], side_dir, total, precision, env)
                    )
                    result = summarize(rows, args.warmup, args.steps, BATCH)
                    if side == "align":
                        result["ratio_first_epoch"] = rows[-1].get("ppo/ratio", float("nan"))
                    rounds.setdefault((size, precision, side), []).append(result)
                    print(
                        f"{size:>5} {precision} {side:<5} round {round_}: {result['eps']:7.2f} episodes/s "
                        f"(mean over the window {result['eps_mean']:.2f}; "
                        f"{time.perf_counter() - t0:.0f} s with start-up)",
                        flush=True,
                    )
    print(
        f"\nPPO throughput: {BATCH} prompts x 1 response, {RESPONSE_LENGTH} new tokens, 1 epoch, "
        f"1 mini-batch, {' and '.join(precisions)}, {args.steps} steps after {args.warmup} warm-up, "
        f"OMP_NUM_THREADS={args.threads}, best of {args.rounds} interleaved rounds per side\n"
    )
    report(rounds, {size: dirs[size]["params"] for size in sizes}, sizes, precisions)
    if tmp is not None:
        tmp.cleanup()


def bf16_hardware_line() -> str:
    from align.modeling.models import bf16_hardware

    hardware = bf16_hardware()
    if hardware:
        return f"bf16 hardware: {hardware}"
    return (
        "bf16 hardware: none, bf16 emulated (no GPU with bf16, a CPU without AMX or AVX512-BF16): slower "
        "than fp32 here, so bf16 ratios on this host say nothing about bf16 hardware"
    )


def report(rounds: dict, params: dict[str, int], sizes: list[str], precisions: list[str]) -> None:
    """The table of each (size, precision, side)'s best round, then the ratios."""
    results = {key: max(runs, key=lambda r: r["eps"]) for key, runs in rounds.items()}
    head = (
        f"{'model':<14}{'prec':<6}{'side':<10}{'ep/s':>8}{'ep/cpu-s':>10}{'step s':>9}"
        f"{'generate':>10}{'score':>8}{'update':>8}{'other':>8}"
    )
    print(head)
    print("-" * len(head))
    for size in sizes:
        label = f"{size} ({params[size] / 1e6:.2f}M)"
        for precision in precisions:
            for side, name in (("trl", "TRL 0.24"), ("align", "align")):
                r = results[size, precision, side]
                print(
                    f"{label:<14}{precision:<6}{name:<10}{r['eps']:8.2f}{r['eps_cpu']:10.2f}{r['step_s']:9.3f}"
                    f"{r['time/generate']:10.3f}{r['time/score']:8.3f}{r['time/update']:8.3f}{r['other']:8.3f}"
                )
                label = ""
    print()
    for size in sizes:
        for precision in precisions:
            ours, trl = results[size, precision, "align"], results[size, precision, "trl"]
            ratio = ours["eps"] / trl["eps"]
            verdict = "meets 2x" if ratio >= 2 else "passes 1.5x" if ratio >= 1.5 else "below 1.5x"
            faster = ", ".join(f"{key[5:]} {trl[key] / ours[key]:.2f}x" for key in SPLIT)
            print(
                f"{size:>5} {precision}: align / TRL = {ratio:.2f}x episodes/s "
                f"({ours['eps_cpu'] / trl['eps_cpu']:.2f}x per CPU-second; {faster} faster) -> {verdict}"
            )
            paired = [
                a["eps"] / t["eps"]
                for a, t in zip(rounds[size, precision, "align"], rounds[size, precision, "trl"], strict=True)
            ]
            if len(paired) > 1:
                print(f"{'':>12}round by round: {', '.join(f'{r:.2f}x' for r in paired)}")
        if len(precisions) == 2:
            for side, name in (("align", "align"), ("trl", "TRL 0.24")):
                ratio = results[size, "bf16", side]["eps"] / results[size, "fp32", side]["eps"]
                print(f"{size:>5}: {name} bf16 / fp32 = {ratio:.2f}x episodes/s")
    if "bf16" in precisions:
        print(bf16_hardware_line())
    first_ratio = [r["ratio_first_epoch"] for (_, _, side), runs in rounds.items() if side == "align" for r in runs]
    print(f"\nalign's first-epoch policy ratio (must be exactly 1): {first_ratio}")


if __name__ == "__main__":
    main()
