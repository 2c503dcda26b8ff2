"""The stages on a real pretrained chat model, SmolLM2-135M-Instruct (tests/real_model.py), named by
its directory alone as a user would: its weights, its tokenizer, its own chat template (a default
system prompt, <|im_end|> as both EOS and pad). And the same weights without a template, standing
in for a base model: ChatML is added and every stage still runs. A few steps each, small batches.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

from tests.conftest import REPO, align_runner, read_log

pytestmark = pytest.mark.real_model

DEMO = REPO / "data_recipes" / "demo"
SMALL = ["train.batch_size=2", "train.grad_accum=1", "train.max_length=256", "train.logging_steps=1"]
SFT = ["stage=sft", *SMALL, "train.lr=1e-5", "train.warmup_steps=0", "train.save_steps=100"]
RM = ["stage=rm", *SMALL, "train.lr=1e-5", "train.max_steps=2"]
PPO = ["stage=ppo", "train.max_steps=1", "train.batch_size=4", "train.max_length=256", "ppo.prompts_per_step=2",
       "ppo.max_new_tokens=24", "ppo.value_warmup_steps=0", "ppo.sample_every=1"]  # fmt: skip


@pytest.fixture(scope="module")
def recipes(tmp_path_factory) -> dict[str, Path]:
    """A few rows of the demo task, no held-out split (a final evaluation would cost a minute)."""
    folder = tmp_path_factory.mktemp("recipes")
    sources = {"sft": ("sft.jsonl", "messages", 8), "preference": ("prefs.jsonl", "preference", 8)}
    for kind, (name, fmt, rows) in sources.items():
        source = f"{{path: {DEMO / name}, format: {fmt}, num_samples: {rows}}}"
        (folder / f"{kind}.yaml").write_text(f"kind: {kind}\nsources:\n  - {source}\n")
    return {kind: folder / f"{kind}.yaml" for kind in sources}


def answer(model_dir: Path, question: str = "What is the capital of France?") -> str:
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": question}], add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    with torch.no_grad():
        out = model.generate(**prompt, max_new_tokens=12, do_sample=False)
    return tokenizer.decode(out[0, prompt["input_ids"].shape[1] :])


def first_loss(run_dir: Path) -> float:
    return next(row["train/loss"] for row in read_log(run_dir) if "train/loss" in row)


def same_template(model_dir: Path, original: Path) -> bool:
    saved, own = AutoTokenizer.from_pretrained(model_dir), AutoTokenizer.from_pretrained(original)
    return saved.chat_template == own.chat_template


@pytest.fixture(scope="module")
def sft(data_cache, smollm2, recipes, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("smollm2") / "sft"
    proc = align_runner(data_cache)(
        *SFT, f"model.name_or_path={smollm2}", f"data.recipe={recipes['sft']}", "train.max_steps=3", f"output_dir={out}"
    )
    out.joinpath("stdout.txt").write_text(proc.stdout + proc.stderr)
    return out


@pytest.fixture(scope="module")
def rm(data_cache, sft, recipes) -> Path:
    out = sft.parent / "rm"
    recipe = recipes["preference"]
    align_runner(data_cache)(*RM, f"rm.init_from={sft / 'final'}", f"data.recipe={recipe}", f"output_dir={out}")
    return out


def test_sft_trains_the_pretrained_model_in_its_own_template(sft, smollm2):
    log = (sft / "stdout.txt").read_text()
    assert "(LlamaForCausalLM, 134.5M parameters, pretrained weights, float32)" in log
    assert "template:  the model's own (assistant turns end with '<|im_end|>')" in log
    assert first_loss(sft) < 3.0  # a pretrained model's loss; random weights start near ln(49152) = 10.8
    assert "Paris" in answer(sft / "final")
    assert same_template(sft / "final", smollm2)


def test_sft_with_lora(run_align, smollm2, recipes, tmp_path):
    out = tmp_path / "lora"
    run_align(*SFT, f"model.name_or_path={smollm2}", f"data.recipe={recipes['sft']}", "train.max_steps=2",
              "peft=lora", "peft.merge=true", f"output_dir={out}")  # fmt: skip
    assert first_loss(out) < 3.0
    adapter = json.loads((out / "final" / "adapter_config.json").read_text())
    assert adapter["base_model_name_or_path"] == str(smollm2)
    reloaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(smollm2), out / "final")
    assert reloaded.peft_config["default"].r == 64
    assert "Paris" in answer(out / "final" / "merged")
    assert same_template(out / "final" / "merged", smollm2)
    # PPO with LoRA from the merged LoRA SFT model: the adapter's base is that model.
    ppo = tmp_path / "ppo"
    run_align(*PPO, f"ppo.policy={out / 'final' / 'merged'}", "ppo.reward_fn=tests.rewards:brevity", "peft=lora",
              f"output_dir={ppo}")  # fmt: skip
    (step,) = read_log(ppo)
    assert step["ppo/policy_trained"] == 1.0 and step["ppo/eos_rate"] > 0
    assert json.loads((ppo / "final" / "adapter_config.json").read_text())["base_model_name_or_path"] == str(
        out / "final" / "merged"
    )


def test_rm_from_the_sft_model_reads_at_its_end_of_turn(rm, smollm2):
    metrics = json.loads((rm / "metrics.json").read_text())
    assert metrics["train/steps"] == 2 and metrics["train/loss"] > 0
    model = AutoModelForSequenceClassification.from_pretrained(rm / "final")
    assert model.config.num_labels == 1 and model.config.pad_token_id == 2
    assert same_template(rm / "final", smollm2)


def test_ppo_from_the_sft_and_reward_models(run_align, sft, rm, smollm2, tmp_path):
    out = tmp_path / "ppo"
    run_align(*PPO, f"ppo.policy={sft / 'final'}", f"ppo.reward_model={rm / 'final'}", f"output_dir={out}")
    (step,) = read_log(out)
    assert step["ppo/policy_trained"] == 1.0
    # Responses stop at the template's end of turn: most sorting answers are a handful of tokens.
    assert step["ppo/eos_rate"] > 0 and step["ppo/response_length"] < 24
    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == 4 and all(isinstance(s["reward"], float) for s in samples)
    generation = json.loads((out / "final" / "generation_config.json").read_text())
    assert generation["eos_token_id"] == 2  # <|im_end|>: EOS and end of turn are one token here
    assert same_template(out / "final", smollm2)
    assert AutoModelForCausalLM.from_pretrained(out / "final").config.vocab_size == 49152


def test_a_base_model_without_a_template_runs_every_stage_in_chatml(run_align, smollm2_base, recipes, tmp_path):
    sft, rm, ppo = tmp_path / "sft", tmp_path / "rm", tmp_path / "ppo"
    proc = run_align(*SFT, f"model.name_or_path={smollm2_base}", f"data.recipe={recipes['sft']}",
                     "train.max_steps=1", f"output_dir={sft}")  # fmt: skip
    # SmolLM2's vocabulary holds the ChatML tokens already: nothing to resize.
    chatml = "template:  align's ChatML (assistant turns end with '<|im_end|>'; no new tokens)"
    assert chatml in proc.stdout + proc.stderr
    saved = AutoTokenizer.from_pretrained(sft / "final")
    assert saved.chat_template and "You are a helpful AI assistant" not in saved.chat_template  # not SmolLM2's
    run_align(*RM, f"rm.init_from={sft / 'final'}", f"data.recipe={recipes['preference']}", "train.max_steps=1",
              f"output_dir={rm}")  # fmt: skip
    run_align(*PPO, f"ppo.policy={sft / 'final'}", f"ppo.reward_model={rm / 'final'}", f"output_dir={ppo}")
    (step,) = read_log(ppo)
    assert step["ppo/policy_trained"] == 1.0
    assert AutoTokenizer.from_pretrained(ppo / "final").chat_template == saved.chat_template
