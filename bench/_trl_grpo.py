"""The TRL side of bench/grpo_throughput.py: TRL 1.x's GRPOTrainer (HF generate, no vLLM), timed per step.

Runs in align's own venv (TRL 1.16 works with transformers 5). It reads the policy and the
chat-rendered prompts that grpo_throughput.py wrote and writes one JSON line per optimizer step:
when the step ended and how long generation, scoring and the update took.

    python bench/_trl_grpo.py --policy DIR --prompts FILE --steps N --prompts-per-step P --group G \\
        --response-length T --out FILE --output-dir DIR

One step is one rollout and one optimizer step on it, as align's `ppo.epochs=1 ppo.mini_batches=1`:
`per_device_train_batch_size = P x G` completions, `gradient_accumulation_steps=1`,
`steps_per_generation=1`, `num_iterations=1` (so TRL, like align, takes the old log-probs from the
update's own forward). Gradient checkpointing, on in GRPOConfig's defaults, is off unless
--gradient-checkpointing (align's `train.gradient_checkpointing` is off by default). The loss is
TRL's `loss_type="grpo"` (each completion's token mean, then the mean: align's
`ppo.loss_agg=seq_mean`), advantages scaled by the group's std (`scale_rewards="group"`, align's
`ppo.advantage=grpo`), the k3 KL in the loss with `beta` = align's `ppo.kl_coef`.

The split is taken by wrapping two of the trainer's methods on the instance, not by editing TRL:
generation is `_generate` (tokenising the prompts, `model.generate`, decoding), scoring is the
rest of `_generate_and_score_completions` (rewards, group advantages, the reference's forward),
and the update is the rest of the step (the policy's forward, the loss, backward, the optimizer).
"""

from __future__ import annotations

import argparse
import json
import os
import time

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")

import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
from trl import GRPOConfig, GRPOTrainer


def brevity(prompts, completions, **kwargs) -> list[float]:
    """The rule-based reward both sides train on (align: bench.grpo_throughput:brevity)."""
    return [max(0.0, 1.0 - 0.1 * len(c.split())) for c in completions]


class StepTimer(TrainerCallback):
    def __init__(self, out_path: str) -> None:
        self.out = open(out_path, "w")  # noqa: SIM115
        self.gen = 0.0
        self.gen_and_score = 0.0
        self.step_start = None

    def on_step_begin(self, args, state, control, **kwargs):
        self.step_start = time.perf_counter()
        self.gen = self.gen_and_score = 0.0

    def on_step_end(self, args, state, control, **kwargs):
        now = time.perf_counter()
        row = {
            "step": state.global_step,
            "t_end": now,
            "time/generate": self.gen,
            "time/score": self.gen_and_score - self.gen,
            "time/update": now - self.step_start - self.gen_and_score,
        }
        self.out.write(json.dumps(row) + "\n")
        self.out.flush()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--policy", required=True)
    ap.add_argument("--prompts", required=True, help="jsonl of {prompt: text}, already chat-rendered")
    ap.add_argument("--steps", type=int, required=True)
    ap.add_argument("--prompts-per-step", type=int, required=True)
    ap.add_argument("--group", type=int, required=True)
    ap.add_argument("--response-length", type=int, required=True)
    ap.add_argument("--beta", type=float, default=0.04)
    ap.add_argument("--lr", type=float, default=1e-6)
    ap.add_argument("--output-dir", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--gradient-checkpointing", action="store_true", help="TRL 1.16's GRPOConfig default; off here")
    args = ap.parse_args()

    tokenizer = AutoTokenizer.from_pretrained(args.policy)
    tokenizer.padding_side = "left"
    with open(args.prompts) as f:
        dataset = Dataset.from_list([json.loads(line) for line in f])
    policy = AutoModelForCausalLM.from_pretrained(args.policy, dtype=torch.float32)

    config = GRPOConfig(
        output_dir=args.output_dir,
        per_device_train_batch_size=args.prompts_per_step * args.group,
        gradient_accumulation_steps=1,
        steps_per_generation=1,
        num_iterations=1,
        num_generations=args.group,
        max_completion_length=args.response_length,
        temperature=1.0,
        top_p=1.0,
        top_k=0,
        beta=args.beta,
        epsilon=0.2,
        loss_type="grpo",
        scale_rewards="group",
        learning_rate=args.lr,
        lr_scheduler_type="constant",
        warmup_steps=0,
        weight_decay=0.0,
        disable_dropout=True,
        # GRPOConfig turns it on by default (recomputing activations in backward); align's default is
        # off, and both sides get the same (grpo_throughput.py --gradient-checkpointing: both on).
        gradient_checkpointing=args.gradient_checkpointing,
        max_steps=args.steps,
        save_strategy="no",
        report_to="none",
        logging_steps=1,
        disable_tqdm=True,
        use_cpu=not torch.cuda.is_available(),
        bf16=False,
        fp16=False,
        seed=args.seed,
        use_vllm=False,
        log_completions=False,
    )
    timer = StepTimer(args.out)
    trainer = GRPOTrainer(
        model=policy,
        reward_funcs=brevity,
        args=config,
        train_dataset=dataset,
        processing_class=tokenizer,
        callbacks=[timer],
    )

    generate, generate_and_score = trainer._generate, trainer._generate_and_score_completions

    def timed_generate(*a, **kw):
        t0 = time.perf_counter()
        out = generate(*a, **kw)
        timer.gen += time.perf_counter() - t0
        return out

    def timed_generate_and_score(*a, **kw):
        t0 = time.perf_counter()
        out = generate_and_score(*a, **kw)
        timer.gen_and_score += time.perf_counter() - t0
        return out

    trainer._generate = timed_generate
    trainer._generate_and_score_completions = timed_generate_and_score
    trainer.train()


if __name__ == "__main__":
    main()
