"""The TRL side of bench/ppo_throughput.py: trl==0.24.0's PPOTrainer, timed per step.

Runs inside bench/.venv-trl024 (trl 0.24.0, transformers 4.x), never in align's venv. It reads
the models and the tokenised prompts that ppo_throughput.py wrote and writes one JSON line per
PPO step: when the step ended and how long generation, scoring and the update took.

    python bench/_trl024_ppo.py --policy DIR --reward-model DIR --prompts FILE --steps N --out FILE [--precision bf16]

--precision bf16 sets PPOConfig(bf16=True) over the fp32 weights loaded here (use_cpu=True without
a GPU: transformers 4.x accepts bf16 there only with it; with a GPU TRL runs on it, as align
does). TrainingArguments passes
bf16 to Accelerate (ACCELERATE_MIXED_PRECISION), so the autocast is where TRL 0.24 puts it: the
accelerator-prepared policy+value wrapper, i.e. the update's forward; generation and the
reference, value and reward forwards of scoring call the inner models directly (read from TRL
0.24's ppo_trainer.py, not measured here).

The split is taken with hooks, not by editing TRL: generation is the `batch_generation` call,
the update starts at the first `accelerator.accumulate` of the step and ends at `on_step_end`,
and scoring (reference and value forwards, reward model, GAE) is what lies between.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import time

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")

import torch
import trl.trainer.ppo_trainer as ppo_module
from datasets import Dataset
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    PreTrainedTokenizerFast,
    TrainerCallback,
)
from trl import PPOConfig, PPOTrainer


class StepTimer(TrainerCallback):
    def __init__(self, out_path: str) -> None:
        self.out = open(out_path, "w")  # noqa: SIM115
        self.gen = 0.0
        self.gen_end = None
        self.update_start = None
        self.step_start = None

    def on_train_begin(self, args, state, control, **kwargs):
        self.step_start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        now = time.perf_counter()
        row = {
            "step": state.global_step,
            "t_end": now,
            "wall": now - self.step_start,
            "time/generate": self.gen,
            "time/score": self.update_start - self.gen_end,
            "time/update": now - self.update_start,
        }
        self.out.write(json.dumps(row) + "\n")
        self.out.flush()
        self.step_start, self.gen, self.update_start = now, 0.0, None


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--policy", required=True)
    ap.add_argument("--reward-model", required=True)
    ap.add_argument("--prompts", required=True, help="jsonl of {input_ids: [...]}, already chat-rendered")
    ap.add_argument("--steps", type=int, required=True)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--response-length", type=int, default=32)
    ap.add_argument("--output-dir", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    ap.add_argument("--eos-token", default="<|im_end|>")
    ap.add_argument("--pad-token", default="<|endoftext|>")
    args = ap.parse_args()

    # transformers 5 writes a tokenizer_config.json that transformers 4 cannot read; the
    # tokenizer.json itself is shared, and TRL needs only padding and the EOS/pad ids.
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_file=os.path.join(args.policy, "tokenizer.json"),
        eos_token=args.eos_token,
        pad_token=args.pad_token,
        padding_side="left",
    )
    with open(args.prompts) as f:
        rows = [json.loads(line) for line in f]
    dataset = Dataset.from_dict({"input_ids": [r["input_ids"] for r in rows]})

    policy = AutoModelForCausalLM.from_pretrained(args.policy, dtype=torch.float32)
    ref_policy = AutoModelForCausalLM.from_pretrained(args.policy, dtype=torch.float32)
    reward_model = AutoModelForSequenceClassification.from_pretrained(
        args.reward_model, num_labels=1, dtype=torch.float32
    )
    value_model = AutoModelForSequenceClassification.from_pretrained(
        args.reward_model, num_labels=1, dtype=torch.float32
    )
    config = PPOConfig(
        output_dir=args.output_dir,
        per_device_train_batch_size=args.batch,
        gradient_accumulation_steps=1,
        num_ppo_epochs=1,
        num_mini_batches=1,
        response_length=args.response_length,
        total_episodes=args.batch * args.steps,
        stop_token="eos",
        temperature=1.0,
        kl_coef=0.04,
        cliprange_value=0.15,
        learning_rate=1e-6,
        num_sample_generations=0,
        save_strategy="no",
        report_to="none",
        logging_steps=1,
        disable_tqdm=True,
        use_cpu=not torch.cuda.is_available(),
        bf16=args.precision == "bf16",
        fp16=False,
        seed=args.seed,
    )
    timer = StepTimer(args.out)
    trainer = PPOTrainer(
        args=config,
        processing_class=tokenizer,
        model=policy,
        ref_model=ref_policy,
        reward_model=reward_model,
        train_dataset=dataset,
        value_model=value_model,
        callbacks=[timer],
    )

    generate = ppo_module.batch_generation

    def timed_generation(*a, **kw):
        t0 = time.perf_counter()
        out = generate(*a, **kw)
        timer.gen_end = time.perf_counter()
        timer.gen += timer.gen_end - t0
        return out

    ppo_module.batch_generation = timed_generation
    accumulate = trainer.accelerator.accumulate

    @contextlib.contextmanager
    def timed_accumulate(*a, **kw):
        if timer.update_start is None:
            timer.update_start = time.perf_counter()
        with accumulate(*a, **kw):
            yield

    trainer.accelerator.accumulate = timed_accumulate
    trainer.train()


if __name__ == "__main__":
    main()
