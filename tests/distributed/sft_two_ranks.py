"""One rank of a tiny SFTTrainer run under DeepSpeed on CPU; launched by test_deepspeed_cpu.py.

    torchrun --nproc_per_node 2 tests/distributed/sft_two_ranks.py --zero 2 --out DIR [--no-fix]

Each rank writes DIR/rank{N}.json with what accelerate believes about the world, the training and
evaluation samples its DataLoaders yield, what `gather_for_metrics` returns and the eval loss.
`--no-fix` skips `init_distributed` and stops after building the SFTConfig: it records the broken
state without training (which would crash in `gather_for_metrics`: gloo allgather "expected length
2, got 1").
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import torch
from accelerate.state import PartialState
from datasets import Dataset
from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM
from trl import SFTConfig, SFTTrainer

from align.run.distributed import (
    REUSE_DISTRIBUTED_STATE,
    build_deepspeed_config,
    check_world,
    init_distributed,
    world_info,
)

TINY = Path(__file__).resolve().parents[2] / "align" / "assets" / "tiny"
N_TRAIN, N_EVAL, SEQ_LEN = 16, 8, 12
ID_BASE = 100
"""Row i starts with token ID_BASE + i, so a batch tells which rows a rank was given."""


def rows(n: int, offset: int) -> Dataset:
    ids = [[ID_BASE + offset + i] + [5 + (i + j) % 50 for j in range(SEQ_LEN - 1)] for i in range(n)]
    return Dataset.from_dict({"input_ids": ids})


def row_ids(dataloader: torch.utils.data.DataLoader) -> list[int]:
    return [int(first) - ID_BASE for batch in dataloader for first in batch["input_ids"][:, 0]]


def tiny_model(vocab_size: int) -> Qwen2ForCausalLM:
    torch.manual_seed(0)
    config = json.loads((TINY / "config.json").read_text())
    config.update(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2)
    return Qwen2ForCausalLM(Qwen2Config(**config))


def state_record() -> dict[str, Any]:
    state = PartialState()
    return {
        "process_index": state.process_index,
        "num_processes": state.num_processes,
        "is_main_process": state.is_main_process,
        "distributed_type": str(state.distributed_type),
        "torch_world_size": torch.distributed.get_world_size(),
        "torch_rank": torch.distributed.get_rank(),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--zero", type=int, choices=(2, 3), required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--no-fix", action="store_true")
    cli = parser.parse_args()

    rank, world_size, _ = world_info()
    micro_batch, grad_accum = 2, 1
    ds_config = build_deepspeed_config(
        cli.zero,
        False,
        False,
        precision="fp32",
        grad_clip=1.0,
        micro_batch=micro_batch,
        grad_accum=grad_accum,
        world_size=world_size,
    )
    if not cli.no_fix:
        init_distributed(deepspeed=True)
    record: dict[str, Any] = {"rank_env": rank, "world_size_env": world_size}
    args = SFTConfig(
        output_dir=str(cli.out / "run"),
        deepspeed=ds_config,
        accelerator_config=None if cli.no_fix else REUSE_DISTRIBUTED_STATE,
        max_steps=3,
        per_device_train_batch_size=micro_batch,
        per_device_eval_batch_size=micro_batch,
        gradient_accumulation_steps=grad_accum,
        max_grad_norm=1.0,
        bf16=False,  # TRL turns bf16 on unless told; fp32 matches the DeepSpeed config
        learning_rate=1e-3,
        eval_strategy="no",
        save_strategy="no",
        logging_steps=1,
        report_to=[],
        dataloader_drop_last=False,
        dataloader_pin_memory=False,  # nothing to pin for on CPU
        seed=0,
    )
    if cli.no_fix:
        record.update(state_record())
        (cli.out / f"rank{rank}.json").write_text(json.dumps(record, indent=1))
        return

    tokenizer = AutoTokenizer.from_pretrained(TINY)
    trainer = SFTTrainer(
        model=tiny_model(len(tokenizer)),
        args=args,
        train_dataset=rows(N_TRAIN, 0),
        eval_dataset=rows(N_EVAL, N_TRAIN),
        processing_class=tokenizer,
    )
    check_world(trainer.accelerator.state)
    record.update(state_record())
    record["accelerator_is_main"] = trainer.accelerator.is_main_process
    record["world_process_zero"] = trainer.is_world_process_zero()
    record["train_rows"] = row_ids(trainer.get_train_dataloader())
    record["eval_rows"] = row_ids(trainer.get_eval_dataloader())
    record["gathered_ranks"] = trainer.accelerator.gather_for_metrics(torch.tensor([rank])).tolist()

    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.numel() > 0}
    train_result = trainer.train()
    metrics = trainer.evaluate()
    record["train_loss"] = train_result.training_loss
    record["global_step"] = trainer.state.global_step
    record["eval_loss"] = metrics["eval_loss"]
    record["eval_metrics"] = metrics
    # Under ZeRO-3 each rank holds only its shard, so compare what this rank holds.
    after = dict(trainer.model.named_parameters())
    record["params_changed"] = any(not torch.equal(before[n], after[n].detach()) for n in before)
    trainer.save_model(str(cli.out / "final"))
    (cli.out / f"rank{rank}.json").write_text(json.dumps(record, indent=1))


if __name__ == "__main__":
    main()
