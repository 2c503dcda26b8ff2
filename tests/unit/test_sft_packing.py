"""Packed rows: conversations sharing a row never attend to each other (transformers' SDPA path)."""

import json

import pytest
import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoTokenizer, Qwen2Config
from trl import SFTConfig

from align.config import REPO_ROOT
from align.hf.sft_trainer import AlignSFTTrainer, PackedRowsCollator

TINY = REPO_ROOT / "align" / "assets" / "tiny"


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    config = Qwen2Config(**json.loads((TINY / "config.json").read_text()))
    return AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").eval()


def _conversation(length: int, seed: int) -> dict[str, list[int]]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 1440, (length,), generator=g).tolist()
    prompt = length // 3
    return {"input_ids": ids, "labels": [-100] * prompt + ids[prompt:]}


def _packed(conversations: list[dict[str, list[int]]]) -> dict[str, list[int]]:
    return {
        "input_ids": [t for c in conversations for t in c["input_ids"]],
        "labels": [t for c in conversations for t in c["labels"]],
        "seq_lengths": [len(c["input_ids"]) for c in conversations],
    }


def test_collator_restarts_positions_and_masks_boundaries():
    batch = PackedRowsCollator(pad_token_id=0)(
        [_packed([_conversation(4, 0), _conversation(3, 1)]), _conversation(2, 2)]
    )
    assert batch["position_ids"].tolist() == [[0, 1, 2, 3, 0, 1, 2], [0, 1, 0, 0, 0, 0, 0]]
    assert "attention_mask" not in batch
    # Each conversation's first token and all padding are never targets.
    assert (batch["labels"][batch["position_ids"] == 0] == -100).all()
    assert batch["input_ids"][1, 2:].tolist() == [0] * 5


def _loss_alone(model, conversations) -> torch.Tensor:
    """Mean NLL over the target tokens of all conversations, each run in a batch of its own."""
    nll, count = 0.0, 0
    for c in conversations:
        out = model(input_ids=torch.tensor([c["input_ids"]]), labels=torch.tensor([c["labels"]]))
        n = sum(label != -100 for label in c["labels"][1:])
        nll, count = nll + out.loss * n, count + n
    return nll / count


def test_packed_row_equals_conversations_run_alone(model):
    conversations = [_conversation(n, seed) for seed, n in enumerate((37, 64, 21))]
    batch = PackedRowsCollator(pad_token_id=0)([_packed(conversations), conversations[1]])
    with torch.no_grad():
        # use_cache=False as in training: with a cache, transformers 5 ignores the position_ids
        # boundaries and builds a plain causal mask over the whole row.
        logits = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits
        start = 0
        for c in conversations:
            n = len(c["input_ids"])
            alone = model(input_ids=torch.tensor([c["input_ids"]])).logits[0]
            torch.testing.assert_close(logits[0, start : start + n], alone, atol=1e-4, rtol=1e-4)
            start += n
        # The second row is conversations[1] followed by padding, which must not change it.
        torch.testing.assert_close(logits[1, :64], logits[0, 37 : 37 + 64], atol=1e-4, rtol=1e-4)
        packed_loss = model(**batch, use_cache=False).loss
        expected = _loss_alone(model, [*conversations, conversations[1]])
    torch.testing.assert_close(packed_loss, expected, atol=1e-5, rtol=1e-5)


def test_without_position_resets_conversations_would_leak(model):
    # The control: the same row with one running position sequence lets the second conversation
    # see the first, so its logits change. Without this the test above could pass vacuously.
    first, second = _conversation(30, 0), _conversation(30, 1)
    row = torch.tensor([first["input_ids"] + second["input_ids"]])
    with torch.no_grad():
        leaked = model(input_ids=row).logits[0, 30:]
        alone = model(input_ids=torch.tensor([second["input_ids"]])).logits[0]
    assert not torch.allclose(leaked, alone, atol=1e-3)


def test_trainer_packs_into_rows_without_a_batch_wide_mask(model, tmp_path):
    conversations = [_conversation(n, n) for n in (50, 90, 30, 70, 40, 60)]
    rows = [
        {"input_ids": c["input_ids"], "assistant_masks": [int(x != -100) for x in c["labels"]]} for c in conversations
    ]
    args = SFTConfig(
        output_dir=str(tmp_path),
        report_to=[],
        bf16=False,
        use_cpu=True,
        per_device_train_batch_size=2,
        max_length=128,
        packing=True,
        packing_strategy="bfd",
        max_steps=1,
    )
    tokenizer = AutoTokenizer.from_pretrained(TINY)
    trainer = AlignSFTTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows), processing_class=tokenizer)
    assert isinstance(trainer.data_collator, PackedRowsCollator)
    batch = next(iter(trainer.get_train_dataloader()))
    assert batch["input_ids"].shape[0] == 2 and batch["input_ids"].shape[1] <= 128
    assert "attention_mask" not in batch
    by_ids = {tuple(c["input_ids"]): c for c in conversations}
    in_batch = []
    for ids, positions in zip(batch["input_ids"].tolist(), batch["position_ids"].tolist(), strict=True):
        segment: list[int] = []
        for token, position in zip(ids, positions, strict=True):
            if position == 0 and len(segment) > 1:
                in_batch.append(by_ids[tuple(segment)])  # KeyError: a conversation was cut or merged
            segment = [token] if position == 0 else [*segment, token]
        if len(segment) > 1:
            in_batch.append(by_ids[tuple(segment)])
    with torch.no_grad():
        loss = trainer.compute_loss(trainer.model, dict(batch))
        expected = _loss_alone(model, in_batch)
    # The trainer's own loss path (no cache) sees each conversation alone, as in the test above.
    torch.testing.assert_close(loss, expected, atol=1e-5, rtol=1e-5)
