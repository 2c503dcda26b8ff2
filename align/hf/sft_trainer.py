"""TRL's SFTTrainer with two CPU-friendly changes, measured in bench/sft_throughput.py.

- The loss is the model's own (assistant-token cross-entropy). TRL's `compute_loss` also computes
  the entropy and top-1 accuracy of every position over the whole vocabulary at every step, and
  recomputes the LM head in the backward pass, for metrics only.
- Packed rows stay rows. TRL's padding-free collator concatenates the whole batch into one
  sequence, which suits flash-attention's varlen kernels; under SDPA (the default, and all a CPU
  has) that one sequence gets a dense (B*L)^2 attention mask, B times the work of B rows of L.
  Here each packed row keeps its own position_ids, restarting at 0 for every conversation, and
  transformers turns them into a block-diagonal causal mask per row
  (tests/unit/test_sft_packing.py checks that conversations in one row never see each other).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from transformers import Trainer
from trl import SFTTrainer
from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

from align.hf.trainer import AlignTrainerMixin


@dataclass
class PackedRowsCollator:
    """Packed examples (input_ids, labels, seq_lengths) -> [batch, longest row] tensors, no attention_mask."""

    pad_token_id: int

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        width = max(len(e["input_ids"]) for e in examples)
        input_ids = torch.full((len(examples), width), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(examples), width), -100, dtype=torch.long)
        # Padding gets position 0 too: each pad token is then a one-token "conversation" of its own.
        position_ids = torch.zeros((len(examples), width), dtype=torch.long)
        for row, example in enumerate(examples):
            n = len(example["input_ids"])
            input_ids[row, :n] = torch.tensor(example["input_ids"])
            labels[row, :n] = torch.tensor(example["labels"])
            lengths = example.get("seq_lengths", [n])
            position_ids[row, :n] = torch.cat([torch.arange(length) for length in lengths])
        # A conversation's first token must not be the target of the previous conversation's last.
        labels[position_ids == 0] = -100
        return {"input_ids": input_ids, "labels": labels, "position_ids": position_ids}


class AlignSFTTrainer(AlignTrainerMixin, SFTTrainer):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        varlen = "flash" in str(self.model.config._attn_implementation)
        if self.padding_free and not varlen and isinstance(self.data_collator, DataCollatorForLanguageModeling):
            self.data_collator = PackedRowsCollator(pad_token_id=self.data_collator.pad_token_id)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        # Trainer's own: the model's loss, normalised by num_items_in_batch under gradient accumulation.
        inputs["use_cache"] = False
        return Trainer.compute_loss(self, model, inputs, return_outputs, num_items_in_batch)
