"""Rollouts with vLLM against align's own sampler (`rollout.engine=vllm` vs `hf`), in one run.

    .venv-vllm/bin/python bench/vllm_rollout.py                   # a GPU: random 0.5B Qwen2 in bf16, < 10 minutes
    .venv-vllm/bin/python bench/vllm_rollout.py --size 1.5b
    .venv-vllm/bin/python bench/vllm_rollout.py --size 20m --precision fp32 --prompts 16 --new-tokens 64 --steps 3
    .venv-vllm/bin/python bench/vllm_rollout.py --model ~/.cache/align/real_models/SmolLM2-135M-Instruct \
        --precision fp32 --prompts 16 --new-tokens 64 --steps 3     # a real model on a CPU

Needs the vLLM environment (README: `.venv-vllm`). Two measurements, each engine in a process of
its own, the HF path first:
1. Sampling: --prompts demo prompts (data_recipes/demo_prompts, chat-rendered), one response each
   of up to --new-tokens tokens at temperature 1, top-p 1. Response tokens per second over one
   timed batch after a warm-up batch; vLLM's start-up and its first weight load are timed apart.
2. A GRPO step: `python -m align stage=grpo` on the same policy with each engine, groups of 4,
   --steps steps: the step's time split (generate, score, update; medians after the first step) and
   the peak memory (on a GPU, the device's used memory polled from nvidia-smi; on a CPU, the run's
   peak RSS).
A random policy (--size) has the architecture of Qwen2.5 at that size with align's tiny tokenizer
(a 1,440-token vocabulary: the LM head is smaller than the real model's) and never ends a
response early, so every response has --new-tokens tokens.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # `align` from this checkout, as `python -m align` finds it
from bench._timing import SIZES as SMALL_SIZES  # noqa: E402
from bench._timing import SPLIT, run_stamped  # noqa: E402

HUB_CONFIGS = ROOT / "align" / "assets" / "hub_configs"
SIZES = {"0.5b": "Qwen--Qwen2.5-0.5B.json", "1.5b": "Qwen--Qwen2.5-1.5B.json", **{k: None for k in SMALL_SIZES}}
GROUP = 4


def policy_dir(work: Path, args) -> tuple[Path, str]:
    """A folder with the policy's config and tokenizer; `init` is 'random' for --size."""
    if args.model:
        return Path(args.model).expanduser(), "pretrained"
    from transformers import AutoTokenizer, Qwen2Config

    tokenizer = AutoTokenizer.from_pretrained(ROOT / "align" / "assets" / "tiny")
    hub = SIZES[args.size]
    shape = SMALL_SIZES[args.size] if hub is None else json.loads((HUB_CONFIGS / hub).read_text())
    keep = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads")
    config = Qwen2Config(
        vocab_size=len(tokenizer),
        max_position_embeddings=4096,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=None,
        tie_word_embeddings=True,
        **{k: v for k, v in shape.items() if k in keep},
    )
    path = work / "policy"
    config.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path, "random"


def sample_child(args) -> None:
    """One engine's sampling measurement; prints a JSON line."""
    import torch

    from align.config import ModelConfig, RolloutConfig
    from align.data import load_recipe_data
    from align.modeling import models
    from align.modeling.chat import stop_token_ids
    from align.rl.rollout import sample
    from align.rl.vllm_engine import VLLMEngine, request_seeds
    from align.rl.weights import checkpoint_weights

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cfg = ModelConfig(name_or_path=args.policy, init=args.init)
    tokenizer = models.load_tokenizer(cfg)
    model = models.load_causal_lm(cfg, tokenizer, seed=0).to(device).eval()
    rows = load_recipe_data("demo_prompts", "prompt", tokenizer, seed=42).train
    prompts = [rows[i % len(rows)]["prompt_input_ids"] for i in range(args.prompts)]
    how = dict(
        pad_id=tokenizer.pad_token_id,
        eos_ids=stop_token_ids(tokenizer),
        max_new_tokens=args.new_tokens,
        temperature=1.0,
        top_p=1.0,
        device=device,
    )
    out: dict[str, float] = {}
    if args.child == "hf":

        def once(step: int):
            with models.autocast(args.precision, device):
                return sample(model, prompts, **how)
    else:
        began = time.perf_counter()
        dtype = {"bf16": "bfloat16", "fp32": "float32"}[args.precision]
        engine = VLLMEngine(
            model.config,
            cfg=RolloutConfig(engine="vllm"),
            dtype=dtype,
            temperature=1.0,
            max_model_len=args.new_tokens + 512,
            device=device,
            rank=0,
            local_rank=0,
            world_size=1,
        )
        out["startup_s"] = time.perf_counter() - began
        began = time.perf_counter()
        engine.load(checkpoint_weights(model))
        out["load_s"] = time.perf_counter() - began

        def once(step: int):
            return engine.sample(
                prompts, lambda: checkpoint_weights(model), seeds=request_seeds(0, step, 0, len(prompts)), **how
            )[0]

    once(0)
    if device.type == "cuda":
        torch.cuda.synchronize()
    began = time.perf_counter()
    rollout = once(1)
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - began
    tokens = float(rollout.response_mask.sum())
    print(json.dumps({**out, "tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / seconds}))


class GPUMemoryPeak:
    """The device's used memory in MiB, polled from nvidia-smi while a run lasts (None without one)."""

    def __init__(self) -> None:
        self.peak: float | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)

    def _poll(self) -> None:
        while not self._stop.wait(0.5):
            try:
                used = subprocess.run(
                    ["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
                    capture_output=True,
                    text=True,
                    timeout=10,
                ).stdout.split()
            except (OSError, subprocess.TimeoutExpired):
                return
            if used:
                self.peak = max(self.peak or 0.0, float(used[0]))

    def __enter__(self) -> GPUMemoryPeak:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def grpo_run(engine: str, policy: Path, init: str, work: Path, args, env: dict) -> dict[str, float]:
    out = work / f"grpo_{engine}"
    episodes = args.prompts
    cmd = [
        sys.executable,
        "-m",
        "align",
        "stage=grpo",
        f"model.name_or_path={policy}",
        f"model.init={init}",
        "ppo.reward_fn=tests.rewards:brevity",
        f"rollout.engine={engine}",
        f"train.precision={args.precision}",
        f"train.max_steps={args.steps}",
        f"ppo.prompts_per_step={episodes // GROUP}",
        f"ppo.responses_per_prompt={GROUP}",
        f"ppo.max_new_tokens={args.new_tokens}",
        f"train.max_length={args.new_tokens + 512}",
        f"train.batch_size={min(episodes, 16)}",
        "train.lr=1e-6",
        "train.warmup_steps=0",
        "train.save_steps=0",
        "train.logging_steps=1",
        "ppo.sample_every=0",
        "resume=never",
        f"output_dir={out}",
    ]
    with GPUMemoryPeak() as gpu:
        rows, rss_mib = run_stamped(cmd, out / "log.jsonl", work / f"grpo_{engine}.log", env)
    if len(rows) < 2:
        raise SystemExit(f"the {engine} GRPO run logged {len(rows)} steps; see {work / f'grpo_{engine}.log'}")
    split = {key: statistics.median(r[key] for r in rows[1:]) for key in SPLIT}
    peak = {"peak_gpu_mib": gpu.peak} if gpu.peak is not None else {"peak_rss_mib": rss_mib}
    return {**split, "step_s": sum(split.values()), **peak}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", choices=sorted(SIZES), default="0.5b", help="a random Qwen2 policy of this size")
    parser.add_argument("--model", help="a Hugging Face model folder instead of --size (its own weights)")
    parser.add_argument("--precision", choices=("bf16", "fp32"), default="bf16")
    parser.add_argument("--prompts", type=int, default=64, help="rollout batch (a multiple of 4)")
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--steps", type=int, default=4, help="GRPO steps per engine (the first is a warm-up)")
    parser.add_argument("--workdir", help="keep the runs here (default: a temporary folder)")
    parser.add_argument("--child", choices=("hf", "vllm"), help=argparse.SUPPRESS)
    parser.add_argument("--policy", help=argparse.SUPPRESS)
    parser.add_argument("--init", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return sample_child(args)
    if args.prompts % GROUP:
        parser.error(f"--prompts must be a multiple of {GROUP}")

    import torch

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled", "TOKENIZERS_PARALLELISM": "false"}
    with tempfile.TemporaryDirectory(prefix="align-vllm-bench-") as tmp:
        work = Path(args.workdir or tmp)
        work.mkdir(parents=True, exist_ok=True)
        policy, init = policy_dir(work, args)
        name = args.model or f"random Qwen2 {args.size}"
        print(
            f"{name}, {args.precision}, on {gpu or f'CPU ({os.cpu_count()} cores)'}; {args.prompts} prompts x "
            f"{args.new_tokens} new tokens"
        )
        sampled = {}
        for engine in ("hf", "vllm"):
            cmd = [
                sys.executable,
                __file__,
                "--child",
                engine,
                "--policy",
                str(policy),
                "--init",
                init,
                "--precision",
                args.precision,
                "--prompts",
                str(args.prompts),
                "--new-tokens",
                str(args.new_tokens),
            ]
            proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
            if proc.returncode:
                raise SystemExit(f"{engine} sampling failed:\n{proc.stderr[-4000:]}")
            sampled[engine] = json.loads(proc.stdout.strip().splitlines()[-1])
        hf, vl = sampled["hf"], sampled["vllm"]
        print(
            f"sampling: hf {hf['tokens_per_s']:.0f} tokens/s, vllm {vl['tokens_per_s']:.0f} tokens/s: "
            f"vllm/hf {vl['tokens_per_s'] / hf['tokens_per_s']:.2f}x (vLLM start-up {vl['startup_s']:.1f} s, "
            f"first weight load {vl['load_s']:.2f} s)"
        )
        runs = {engine: grpo_run(engine, policy, init, work, args, env) for engine in ("hf", "vllm")}
        for engine, r in runs.items():
            memory = (
                f"peak GPU {r['peak_gpu_mib']:.0f} MiB"
                if "peak_gpu_mib" in r
                else f"peak RSS {r['peak_rss_mib']:.0f} MiB"
            )
            print(
                f"grpo step ({engine}): {r['step_s']:.2f} s = generate {r['time/generate']:.2f} + score "
                f"{r['time/score']:.2f} + update {r['time/update']:.2f}; {memory}"
            )
        print(f"grpo step time hf/vllm: {runs['hf']['step_s'] / runs['vllm']['step_s']:.2f}x")


if __name__ == "__main__":
    main()
