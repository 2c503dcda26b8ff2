"""align.modeling.reward_model: the reward is read at the last real token, whatever the padding."""

import math

import pytest
import torch

from align.config import REPO_ROOT, ModelConfig, PeftConfig
from align.errors import ModelError
from align.modeling import models
from align.modeling import reward_model as rm
from align.modeling.chat import encode, render

TINY = ModelConfig(name_or_path=str(REPO_ROOT / "align" / "assets" / "tiny"), init="random")
PAD = 0


@pytest.fixture(scope="module")
def tokenizer():
    return models.load_tokenizer(TINY)


@pytest.fixture(scope="module")
def model(tokenizer):
    return rm.load_reward_model(TINY, tokenizer, seed=0).eval()


def _pair(tokenizer):
    chat = [{"role": "user", "content": "Sort: 5 3 9"}]
    ids = [
        rm.trim_to_end_of_turn(
            encode(tokenizer, render(tokenizer, [*chat, {"role": "assistant", "content": a}], False)),
            tokenizer.eos_token_id,
        )
        for a in ("3 5 9", "Sure! The sorted list is 3, 5, 9.")
    ]
    assert len(ids[0]) != len(ids[1])
    return ids


def _alone(model, seqs):
    return torch.stack([rm.rewards_at_last_token(model, torch.tensor([s]), torch.ones(1, len(s)))[0] for s in seqs])


def _padded(model, seqs, pad_id, side, extra=0):
    ids, mask = rm.pad_batch(seqs, pad_id, side)
    if extra:  # more padding than the batch needs, on both sides
        ids = torch.nn.functional.pad(ids, (extra, extra), value=pad_id)
        mask = torch.nn.functional.pad(mask, (extra, extra), value=0)
    with torch.no_grad():
        return rm.rewards_at_last_token(model, ids, mask)


@torch.no_grad()
def test_same_pair_scores_the_same_with_left_right_and_extra_padding(model, tokenizer):
    seqs = _pair(tokenizer)
    expected = _alone(model, seqs)
    for side in ("left", "right"):
        torch.testing.assert_close(_padded(model, seqs, PAD, side), expected, atol=1e-5, rtol=0)
        torch.testing.assert_close(_padded(model, seqs, PAD, side, extra=7), expected, atol=1e-5, rtol=0)


@torch.no_grad()
def test_pad_equal_to_eos_still_reads_the_eos(model, tokenizer):
    seqs = _pair(tokenizer)
    eos = tokenizer.eos_token_id
    assert all(s[-1] == eos for s in seqs)  # the reward is read at the end-of-turn token
    expected = _alone(model, seqs)
    for side in ("left", "right"):
        torch.testing.assert_close(_padded(model, seqs, eos, side), expected, atol=1e-5, rtol=0)
    # Why we do not use transformers' pooled logits: with pad == EOS it reads the token before EOS.
    ids, mask = rm.pad_batch(seqs, eos, "right")
    model.config.pad_token_id = eos
    try:
        pooled = model(input_ids=ids, attention_mask=mask).logits.squeeze(-1)
    finally:
        model.config.pad_token_id = PAD
    assert not torch.allclose(pooled, expected, atol=1e-4)


def test_pairwise_loss_and_metrics_by_hand():
    chosen, rejected = torch.tensor([1.0, 0.0, 2.0]), torch.tensor([0.0, 0.5, -1.0])
    diffs = [1.0, -0.5, 3.0]
    by_hand = sum(-math.log(1 / (1 + math.exp(-d))) for d in diffs) / 3
    assert rm.pairwise_loss(chosen, rejected).item() == pytest.approx(by_hand, abs=1e-6)
    with_margin = sum(-math.log(1 / (1 + math.exp(-(d - 0.5)))) for d in diffs) / 3
    assert rm.pairwise_loss(chosen, rejected, torch.full((3,), 0.5)).item() == pytest.approx(with_margin, abs=1e-6)
    metrics = rm.pair_metrics(chosen, rejected)
    assert metrics["accuracy"] == pytest.approx(2 / 3)
    assert metrics["margin"] == pytest.approx(3.5 / 3)
    assert metrics["reward_mean"] == pytest.approx(2.5 / 6)
    assert metrics["loss"] == pytest.approx(by_hand, abs=1e-6)


def test_trim_to_end_of_turn():
    assert rm.trim_to_end_of_turn([1, 5, 2, 7, 2, 9], end_of_turn=2) == [1, 5, 2, 7, 2]
    assert rm.trim_to_end_of_turn([1, 5, 7], end_of_turn=2) == [1, 5, 7]


@torch.no_grad()
def test_lora_head_is_saved_and_reloads_to_the_same_scores(tmp_path, tokenizer):
    base = rm.load_reward_model(TINY, tokenizer, seed=0)
    base.save_pretrained(tmp_path / "base")
    peft_cfg = PeftConfig(enabled=True, r=4, alpha=8, dropout=0.0)
    lora = rm.apply_lora(base, peft_cfg, new_tokens=False)
    for _name, param in lora.named_parameters():  # stand-in for training: move adapter and head
        if param.requires_grad:
            param.add_(0.05 * torch.randn_like(param))
    assert any("score.modules_to_save" in n for n, p in lora.named_parameters() if p.requires_grad)
    seqs = _pair(tokenizer)
    before = _padded(lora.eval(), seqs, PAD, "right")
    lora.save_pretrained(tmp_path / "final")
    config = (tmp_path / "final" / "adapter_config.json").read_text()
    (tmp_path / "final" / "adapter_config.json").write_text(
        config.replace(str(TINY.name_or_path), str(tmp_path / "base"))
    )
    reloaded = rm.load_reward_model(tmp_path / "final", tokenizer).eval()
    torch.testing.assert_close(_padded(reloaded, seqs, PAD, "right"), before, atol=1e-5, rtol=0)


def test_a_checkpoint_without_the_backbone_is_refused(tmp_path, tokenizer):
    from safetensors.torch import save_file

    base = rm.load_reward_model(TINY, tokenizer, seed=0)
    base.config.save_pretrained(tmp_path)
    save_file({"score.weight": base.score.weight.detach().clone()}, str(tmp_path / "model.safetensors"))
    with pytest.raises(ModelError, match="backbone"):
        rm.load_reward_model(tmp_path, tokenizer)
