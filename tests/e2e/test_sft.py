"""`python -m align stage=sft` on the tiny model, through the real entry point."""

import json

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from tests.conftest import read_log, read_metrics
from tests.wandb_files import history


def _losses(run_dir):
    return [row["train/loss"] for row in read_log(run_dir) if "train/loss" in row]


def _generates(model_dir):
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    prompt = tok.apply_chat_template(
        [{"role": "user", "content": "Sort: 5 3 9"}], tokenize=False, add_generation_prompt=True
    )
    ids = tok(prompt, return_tensors="pt", add_special_tokens=False)
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=8, do_sample=False)
    assert out.shape[1] > ids["input_ids"].shape[1]
    return tok.decode(out[0, ids["input_ids"].shape[1] :])


def test_sft_full_finetune(run_align, tmp_path):
    out = tmp_path / "sft"
    run_align("stage=sft", "model=tiny", "train.max_steps=30", "train.logging_steps=5", f"output_dir={out}")
    losses = _losses(out)
    assert len(losses) >= 5
    assert losses[-1] < 0.7 * losses[0], losses
    metrics = read_metrics(out)
    assert metrics["train/steps"] == 30
    assert metrics["eval/loss"] < losses[0]
    assert (out / "config.yaml").is_file()
    assert (out / "final" / "model.safetensors").is_file()
    assert (out / "final" / "tokenizer.json").is_file()
    assert (
        "chat_template" in json.loads((out / "final" / "tokenizer_config.json").read_text())
        or (out / "final" / "chat_template.jinja").is_file()
    )
    assert (out / "checkpoints").is_dir()
    _generates(out / "final")


def test_sft_lora_with_merge(run_align, tmp_path):
    out = tmp_path / "lora"
    run_align(
        "stage=sft",
        "model=tiny",
        "peft=lora",
        "peft.merge=true",
        "train.max_steps=30",
        "train.lr=5e-3",
        f"output_dir={out}",
    )
    losses = _losses(out)
    assert losses[-1] < losses[0]
    assert (out / "final" / "adapter_model.safetensors").is_file()
    assert (out / "final" / "adapter_config.json").is_file()
    assert not (out / "final" / "model.safetensors").exists()
    _generates(out / "final" / "merged")


def test_sft_wandb_offline_records_the_loss(run_align, tmp_path):
    out = tmp_path / "wandb"
    run_align(
        "stage=sft", "model=tiny", "logger=wandb", "train.max_steps=10", "train.logging_steps=2", f"output_dir={out}"
    )
    runs = list((out / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    logged = [row["train/loss"] for row in history(runs[0]) if "train/loss" in row]
    assert logged == [row["train/loss"] for row in read_log(out) if "train/loss" in row]
    assert len(logged) >= 5
