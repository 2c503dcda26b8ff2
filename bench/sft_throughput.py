"""SFT throughput: useful tokens/s and MFU of our SFT path against TRL's SFTTrainer, in one run.

    python bench/sft_throughput.py                 # both models, ~4 min on 2 CPU cores
    python bench/sft_throughput.py --models tiny   # a quick look

For each model (the tiny asset, ~3M parameters, and an 18M Qwen2 config with the same tokenizer)
and each data shape (every row 512 tokens; lengths drawn uniformly from 32..512) it trains a few
steps with:
  trl         TRL's SFTTrainer used plainly (pads to the batch max, no packing, default metrics)
  trl+pack    the same with packing=True (bfd, padding-free), variable lengths, with --trl-packing
  ours        align's SFT path (align.stages.sft.sft_args + AlignSFTTrainer), sft.packing=false
  ours+pack   the same with sft.packing=true
Useful tokens are the non-padding tokens a step trains on. MFU = 6 * params * useful tokens/s
over an fp32 matmul peak measured in this run (best of repeated 2048^2 torch.mm); attention
FLOPs are not counted. Variants run interleaved, round by round, and each reports its best
round, so load from other processes on a shared machine hits them alike.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script from anywhere

import torch
from datasets import Dataset
from transformers import TrainerCallback
from trl import SFTConfig, SFTTrainer

from align.cli import check_overrides
from align.config import REPO_ROOT
from align.hf.sft_trainer import AlignSFTTrainer
from align.modeling import models
from align.run.distributed import init_distributed
from align.stages.sft import sft_args

TINY = REPO_ROOT / "align" / "assets" / "tiny"
# ~18M parameters: Qwen2 shape (GQA 8:2, SwiGLU, tied embeddings) with the tiny tokenizer.
MODEL_18M = {
    "hidden_size": 512,
    "intermediate_size": 1408,
    "num_hidden_layers": 6,
    "num_attention_heads": 8,
    "num_key_value_heads": 2,
}
BATCH = 4
MAX_LENGTH = 512
PROMPT_FRACTION = 0.25  # leading tokens of each conversation masked out of the loss, as user turns are


def matmul_peak_flops(n: int = 2048, repeats: int = 5) -> float:
    a, b = torch.randn(n, n), torch.randn(n, n)
    torch.mm(a, b)
    best = 0.0
    for _ in range(repeats):
        start = time.perf_counter()
        torch.mm(a, b)
        best = max(best, 2 * n**3 / (time.perf_counter() - start))
    return best


def conversations(lengths: list[int], seed: int) -> Dataset:
    """Rows as load_recipe_data gives them: token ids plus the assistant mask."""
    rng = random.Random(seed)
    rows = []
    for length in lengths:
        prompt = max(1, int(length * PROMPT_FRACTION))
        ids = [rng.randrange(3, 1440) for _ in range(length)]  # never the pad id (0)
        rows.append({"input_ids": ids, "assistant_masks": [0] * prompt + [1] * (length - prompt)})
    return Dataset.from_list(rows)


def datasets_for(rows: int, seed: int = 0) -> dict[str, Dataset]:
    rng = random.Random(seed)
    return {
        "uniform 512": conversations([MAX_LENGTH] * rows, seed),
        "var 32..512": conversations([rng.randint(32, MAX_LENGTH) for _ in range(rows)], seed),
    }


def model_dir(name: str, root: Path) -> Path:
    if name == "tiny":
        return TINY
    path = root / name
    path.mkdir()
    config = json.loads((TINY / "config.json").read_text()) | MODEL_18M
    (path / "config.json").write_text(json.dumps(config))
    for file in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(TINY / file, path)
    return path


class StepClock(TrainerCallback):
    """Wall time between consecutive optimizer steps (data, forward, backward, optimizer, logging)."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def on_train_begin(self, args, state, control, **kwargs):
        self.times = [time.perf_counter()]

    def on_step_end(self, args, state, control, **kwargs):
        self.times.append(time.perf_counter())


def counting(trainer_cls: type) -> type:
    """The trainer class, also recording the non-padding tokens of each micro-batch (nothing else changes)."""

    def training_step(self, model, inputs, *args, **kwargs):
        self.useful_tokens.append(int((inputs["input_ids"] != self.processing_class.pad_token_id).sum()))
        return trainer_cls.training_step(self, model, inputs, *args, **kwargs)

    return type(f"Counting{trainer_cls.__name__}", (trainer_cls,), {"training_step": training_step})


def our_trainer(path: Path, data: Dataset, packing: bool, out: Path, steps: int):
    config = check_overrides(
        [
            "stage=sft",
            f"model.name_or_path={path}",
            "model.init=random",
            f"train.batch_size={BATCH}",
            "train.grad_accum=1",
            f"train.max_length={MAX_LENGTH}",
            f"train.max_steps={steps}",
            "train.dropout=0.0",
            "train.save_steps=100000",
            f"sft.packing={str(packing).lower()}",
            f"output_dir={out}",
        ]
    )
    tokenizer = models.load_tokenizer(config.model)
    model = models.load_causal_lm(config.model, tokenizer, seed=config.seed, dropout=config.train.dropout)
    args = sft_args(config, has_eval=False)
    args.disable_tqdm = True
    args.save_strategy = "no"  # the final save falls after the timed steps; skipping it only saves wall time
    return counting(AlignSFTTrainer)(model=model, args=args, train_dataset=data, processing_class=tokenizer)


def trl_trainer(path: Path, data: Dataset, packing: bool, out: Path, steps: int):
    config = check_overrides(["stage=sft", f"model.name_or_path={path}", "model.init=random", "train.dropout=0.0"])
    tokenizer = models.load_tokenizer(config.model)
    model = models.load_causal_lm(config.model, tokenizer, seed=config.seed, dropout=0.0)
    # TRL's defaults except what a CPU and this comparison need: fp32, the same batch and max length.
    args = SFTConfig(
        output_dir=str(out),
        bf16=False,
        per_device_train_batch_size=BATCH,
        max_length=MAX_LENGTH,
        max_steps=steps,
        packing=packing,
        report_to=[],
        disable_tqdm=True,
        save_strategy="no",
    )
    return counting(SFTTrainer)(model=model, args=args, train_dataset=data, processing_class=tokenizer)


def measure(trainer, clock: StepClock) -> tuple[float, float]:
    """(useful tokens, seconds) over the steps after the first of one train() call."""
    trainer.useful_tokens = []
    trainer.train()
    seconds = clock.times[-1] - clock.times[1]
    return float(sum(trainer.useful_tokens[1:])), seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["tiny", "18M"], choices=["tiny", "18M"])
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    parser.add_argument("--rounds", type=int, default=2, help="interleaved rounds; each variant reports its best")
    parser.add_argument("--steps", type=int, default=2, help="timed steps per round (after one untimed step)")
    parser.add_argument("--trl-packing", action="store_true", help="also time TRL's own packing (variable lengths)")
    cli = parser.parse_args()

    if cli.threads:
        torch.set_num_threads(cli.threads)
    init_distributed(deepspeed=False)
    torch.manual_seed(0)
    peak = matmul_peak_flops()
    data = datasets_for(rows=BATCH * 2 * (cli.steps + 1) * 2)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        for name in cli.models:
            path = model_dir(name, root)
            for shape, dataset in data.items():
                variants = {"trl": (trl_trainer, False)}
                if shape.startswith("var") and cli.trl_packing:
                    variants["trl+pack"] = (trl_trainer, True)
                variants |= {"ours": (our_trainer, False), "ours+pack": (our_trainer, True)}
                trainers = {}
                for label, (build, packing) in variants.items():
                    out = root / f"{name}-{shape[:3]}-{label}"
                    trainers[label] = build(path, dataset, packing, out, cli.steps + 1)
                    trainers[label].add_callback(clock := StepClock())
                    trainers[label].clock = clock
                best = dict.fromkeys(trainers, 0.0)
                for _ in range(cli.rounds):
                    peak = max(peak, matmul_peak_flops())
                    for label, trainer in trainers.items():
                        tokens, seconds = measure(trainer, trainer.clock)
                        best[label] = max(best[label], tokens / seconds)
                params = trainers["ours"].model.num_parameters()
                for label, tps in best.items():
                    results.append((name, params, shape, label, tps))
                    print(f"  {name} {shape} {label}: {tps:.0f} useful tok/s", flush=True)
    print_table(results, peak)


def print_table(results: list[tuple], peak: float) -> None:
    print(
        f"\nfp32 matmul peak: {peak / 1e9:.1f} GFLOP/s ({torch.get_num_threads()} threads); "
        f"batch {BATCH} x max {MAX_LENGTH} tokens\n"
    )
    print(f"{'model':6} {'params':>7} {'data':12} {'variant':10} {'useful tok/s':>12} {'MFU':>6} {'vs trl':>7}")
    base = {(m, s): tps for m, _, s, v, tps in results if v == "trl"}
    for model, params, shape, variant, tps in results:
        mfu = 6 * params * tps / peak
        print(
            f"{model:6} {params / 1e6:6.1f}M {shape:12} {variant:10} {tps:12.0f} {mfu:6.1%} "
            f"{tps / base[(model, shape)]:6.2f}x"
        )


if __name__ == "__main__":
    main()
