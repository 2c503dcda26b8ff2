"""SFT throughput: useful tokens/s and MFU of our SFT path against TRL's SFTTrainer, in one run.

    python bench/sft_throughput.py                    # both models, fp32 and bf16
    python bench/sft_throughput.py --models tiny      # a quick look
    python bench/sft_throughput.py --precision fp32   # fp32 only (~4 min on 2 CPU cores)

For each model (the tiny asset, ~3M parameters, and an 18M Qwen2 config with the same tokenizer)
and each data shape (every row 512 tokens; lengths drawn uniformly from 32..512) it trains a few
steps with:
  trl         TRL's SFTTrainer used plainly (pads to the batch max, no packing, default metrics)
  trl+pack    the same with packing=True (bfd, padding-free), variable lengths, with --trl-packing
  ours        align's SFT path (align.stages.sft.sft_args + AlignSFTTrainer), sft.packing=false
  ours+pack   the same with sft.packing=true
each in fp32 and/or bf16 (--precision; bf16 is mixed precision over fp32 weights: align with
train.precision=bf16, TRL with bf16=True, both autocasting the forward).
Useful tokens are the non-padding tokens a step trains on. MFU = 6 * params * useful tokens/s
over a matmul peak of the same precision measured in this run (best of repeated 2048^2 torch.mm
in fp32, resp. bf16); attention FLOPs are not counted. Variants run interleaved, round by round,
and each reports its best round, so load from other processes on a shared machine hits them
alike. With both precisions it prints align bf16 / align fp32 (target >= 1.7x) and align bf16 /
TRL bf16 (target >= 1.2x), with the bf16 hardware it ran on: without AMX, AVX512-BF16 or a GPU
bf16 is emulated and slower than fp32, and the first target cannot be met there.
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
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
TARGET_BF16_VS_FP32 = 1.7  # align bf16 / align fp32 useful tokens/s (issue 17)
TARGET_BF16_VS_TRL = 1.2  # align bf16 / TRL bf16 useful tokens/s (issue 17)


def matmul_peak_flops(precision: str, repeats: int = 5) -> float:
    """Best of `repeats` square products in `precision` on the device the trainers use (the CPU
    threads torch has, or the GPU)."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    n = 8192 if device == "cuda" else 2048
    a, b = (torch.randn(n, n, device=device, dtype=DTYPES[precision]) for _ in range(2))
    torch.mm(a, b)
    best = 0.0
    for _ in range(repeats):
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        torch.mm(a, b)
        if device == "cuda":
            torch.cuda.synchronize()
        best = max(best, 2 * n**3 / (time.perf_counter() - start))
    return best


def describe_bf16_hardware() -> str:
    hardware = models.bf16_hardware()
    if hardware:
        return f"bf16 hardware: {hardware}"
    return (
        "bf16 hardware: none, bf16 emulated (no GPU with bf16, a CPU without AMX or AVX512-BF16): slower than "
        f"fp32 here, so a miss of the {TARGET_BF16_VS_FP32}x bf16/fp32 target is this hardware"
    )


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


def our_trainer(path: Path, data: Dataset, packing: bool, precision: str, out: Path, steps: int):
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
            f"train.precision={precision}",
            f"output_dir={out}",
        ]
    )
    tokenizer = models.load_tokenizer(config.model)
    model = models.load_causal_lm(config.model, tokenizer, seed=config.seed, dropout=config.train.dropout)
    args = sft_args(config, has_eval=False)
    args.disable_tqdm = True
    args.save_strategy = "no"  # the final save falls after the timed steps; skipping it only saves wall time
    return counting(AlignSFTTrainer)(model=model, args=args, train_dataset=data, processing_class=tokenizer)


def trl_trainer(path: Path, data: Dataset, packing: bool, precision: str, out: Path, steps: int):
    config = check_overrides(["stage=sft", f"model.name_or_path={path}", "model.init=random", "train.dropout=0.0"])
    tokenizer = models.load_tokenizer(config.model)
    model = models.load_causal_lm(config.model, tokenizer, seed=config.seed, dropout=0.0)
    # TRL's defaults except what a CPU and this comparison need: the precision (TRL's default bf16
    # needs a GPU; transformers accepts bf16 without one only with use_cpu, as align's
    # hf_training_kwargs sets it), the same batch and max length.
    bf16 = precision == "bf16"
    args = SFTConfig(
        output_dir=str(out),
        bf16=bf16,
        use_cpu=bf16 and not torch.cuda.is_available(),
        per_device_train_batch_size=BATCH,
        max_length=MAX_LENGTH,
        max_steps=steps,
        packing=packing,
        report_to=[],
        disable_tqdm=True,
        save_strategy="no",
    )
    return counting(SFTTrainer)(model=model, args=args, train_dataset=data, processing_class=tokenizer)


def watch_compute_dtype(trainer, precision: str) -> None:
    """Record the output dtype of the model's first linear layer in every forward: measure() checks
    that a variant computed in the precision it is labelled with."""
    trainer.expected_dtype = DTYPES[precision]
    trainer.seen_dtypes = set()
    linear = next(m for m in trainer.model.modules() if isinstance(m, torch.nn.Linear))
    linear.register_forward_hook(lambda module, args, out: trainer.seen_dtypes.add(out.dtype))


def measure(trainer, clock: StepClock) -> tuple[float, float]:
    """(useful tokens, seconds) over the steps after the first of one train() call."""
    trainer.useful_tokens = []
    trainer.seen_dtypes.clear()
    trainer.train()
    if trainer.seen_dtypes != {trainer.expected_dtype}:
        raise SystemExit(f"{type(trainer).__name__} computed in {trainer.seen_dtypes}, not {trainer.expected_dtype}")
    seconds = clock.times[-1] - clock.times[1]
    return float(sum(trainer.useful_tokens[1:])), seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["tiny", "18M"], choices=["tiny", "18M"])
    parser.add_argument("--precision", default="both", choices=["fp32", "bf16", "both"])
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    parser.add_argument("--rounds", type=int, default=2, help="interleaved rounds; each variant reports its best")
    parser.add_argument("--steps", type=int, default=2, help="timed steps per round (after one untimed step)")
    parser.add_argument("--trl-packing", action="store_true", help="also time TRL's own packing (variable lengths)")
    cli = parser.parse_args()
    precisions = ["fp32", "bf16"] if cli.precision == "both" else [cli.precision]

    if cli.threads:
        torch.set_num_threads(cli.threads)
    init_distributed(deepspeed=False)
    torch.manual_seed(0)
    peaks = {p: matmul_peak_flops(p) for p in precisions}
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
                # Accelerate keeps one process-wide state: a Trainer's autocast dtype is read from it
                # when train() prepares the model, and an align trainer (use_configured_state) refuses
                # to be built over a state of another precision. Each shape starts with a TRL build
                # (which resets the state), fp32 before bf16, so the state ends in bf16 for the bf16
                # variants and fp32 variants never autocast; watch_compute_dtype checks it.
                trainers = {}
                for precision in precisions:
                    for label, (build, packing) in variants.items():
                        out = root / f"{name}-{shape[:3]}-{label}-{precision}"
                        trainer = build(path, dataset, packing, precision, out, cli.steps + 1)
                        trainer.add_callback(clock := StepClock())
                        trainer.clock = clock
                        watch_compute_dtype(trainer, precision)
                        trainers[precision, label] = trainer
                best = dict.fromkeys(trainers, 0.0)
                for _ in range(cli.rounds):
                    for precision in precisions:
                        peaks[precision] = max(peaks[precision], matmul_peak_flops(precision))
                    for key, trainer in trainers.items():
                        tokens, seconds = measure(trainer, trainer.clock)
                        best[key] = max(best[key], tokens / seconds)
                params = trainers[precisions[0], "ours"].model.num_parameters()
                for (precision, label), tps in best.items():
                    results.append((name, params, shape, precision, label, tps))
                    print(f"  {name} {shape} {precision} {label}: {tps:.0f} useful tok/s", flush=True)
                del trainers
    print_table(results, peaks)


def verdict(ratio: float, target: float) -> str:
    return f"meets {target}x target" if ratio >= target else f"misses {target}x target"


def print_table(results: list[tuple], peaks: dict[str, float]) -> None:
    print()
    for precision, peak in peaks.items():
        print(f"{precision} matmul peak: {peak / 1e9:.1f} GFLOP/s ({torch.get_num_threads()} threads)")
    if len(peaks) == 2:
        print(f"bf16 / fp32 matmul peak: {peaks['bf16'] / peaks['fp32']:.2f}x")
    print(describe_bf16_hardware())
    print(f"batch {BATCH} x max {MAX_LENGTH} tokens; MFU against the peak of the variant's precision\n")
    print(
        f"{'model':6} {'params':>7} {'data':12} {'prec':4} {'variant':10} {'useful tok/s':>12} {'MFU':>6} {'vs trl':>7}"
    )
    tps = {(m, s, p, v): t for m, _, s, p, v, t in results}
    for model, params, shape, precision, variant, rate in results:
        mfu = 6 * params * rate / peaks[precision]
        print(
            f"{model:6} {params / 1e6:6.1f}M {shape:12} {precision:4} {variant:10} {rate:12.0f} {mfu:6.1%} "
            f"{rate / tps[model, shape, precision, 'trl']:6.2f}x"
        )
    if "bf16" not in peaks:
        return
    cells = list(dict.fromkeys((m, s) for m, _, s, *_ in results))
    ours = [v for v in dict.fromkeys(v for *_, v, _ in results) if v.startswith("ours")]
    comparisons = [(f"align bf16 / TRL bf16 useful tokens/s (target >= {TARGET_BF16_VS_TRL}x)", "trl")]
    if "fp32" in peaks:
        comparisons.insert(0, (f"align bf16 / align fp32 useful tokens/s (target >= {TARGET_BF16_VS_FP32}x)", "fp32"))
    for title, against in comparisons:
        print(f"\n{title}:")
        for model, shape in cells:
            for variant in ours:
                bf16 = tps[model, shape, "bf16", variant]
                if against == "fp32":
                    ratio, target = bf16 / tps[model, shape, "fp32", variant], TARGET_BF16_VS_FP32
                else:
                    ratio, target = bf16 / tps[model, shape, "bf16", "trl"], TARGET_BF16_VS_TRL
                print(f"  {model:6} {shape:12} {variant:10} {ratio:6.2f}x -> {verdict(ratio, target)}")
    print(f"\n{describe_bf16_hardware()}")


if __name__ == "__main__":
    main()
