"""A checkpoint of one's own through `python -m align`: its pretrained weights, the stage's own
defaults (no demo tuning), and a start-up block that says so."""

from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from tests.own_models import pretrained_tiny

SMALL = ["train.batch_size=2", "train.grad_accum=1", "train.max_length=256", "train.eval_steps=0"]


def first_logits(model_dir) -> torch.Tensor:
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    ids = tokenizer("Sort: 4 7 1", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        return AutoModelForCausalLM.from_pretrained(model_dir)(ids).logits


def test_a_model_path_alone_trains_its_pretrained_weights(run_align, tmp_path):
    mine = pretrained_tiny(tmp_path / "mine")
    out = tmp_path / "sft"
    proc = run_align("stage=sft", f"model.name_or_path={mine}", "train.max_steps=1", *SMALL, f"output_dir={out}")
    log = proc.stdout + proc.stderr
    assert f"model:     {mine} (Qwen2ForCausalLM, 3.3M parameters, pretrained weights, float32)" in log
    # The Qwen SFT numbers, not the tiny demo's lr 1e-3: the first step's lr is 2e-6 / 1430.
    assert "lr:        2e-06 [default], constant_with_warmup [default], warm-up 1430 steps [default]" in log
    assert "no tuning preset" in log
    torch.testing.assert_close(first_logits(out / "final"), first_logits(mine), atol=1e-4, rtol=0)


def test_a_base_model_without_a_template_gets_chatml_through_every_stage(run_align, tmp_path):
    base = pretrained_tiny(tmp_path / "base", template=False)
    sft, rm, ppo = tmp_path / "sft", tmp_path / "rm", tmp_path / "ppo"
    proc = run_align(
        "stage=sft", f"model.name_or_path={base}", "train.max_steps=2", "train.lr=1e-4", *SMALL, f"output_dir={sft}"
    )
    assert "template:  align's ChatML (assistant turns end with '<|im_end|>'" in proc.stdout + proc.stderr
    tokenizer = AutoTokenizer.from_pretrained(sft / "final")
    assert tokenizer.chat_template and tokenizer.eos_token == "<|im_end|>"
    run_align("stage=rm", f"rm.init_from={sft / 'final'}", "train.max_steps=2", *SMALL, f"output_dir={rm}")
    run_align(
        "stage=ppo",
        f"ppo.policy={sft / 'final'}",
        f"ppo.reward_model={rm / 'final'}",
        "train.max_steps=1",
        "train.batch_size=4",
        "ppo.prompts_per_step=2",
        "ppo.max_new_tokens=8",
        f"output_dir={ppo}",
    )
    reloaded = AutoTokenizer.from_pretrained(ppo / "final")
    assert reloaded.chat_template == tokenizer.chat_template
    assert AutoModelForCausalLM.from_pretrained(ppo / "final").config.vocab_size == len(reloaded)
