"""The real SmolLM2-135M-Instruct folders of tests/real_model.py load as plain Hugging Face models."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

pytestmark = pytest.mark.real_model


def test_instruct_answers_and_stops_at_im_end(smollm2: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(smollm2)
    model = AutoModelForCausalLM.from_pretrained(smollm2, dtype=torch.float32)
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = model.generate(**prompt, max_new_tokens=20, do_sample=False)
    new = out[0, prompt["input_ids"].shape[1] :].tolist()
    assert "Paris" in tokenizer.decode(new, skip_special_tokens=True)
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert im_end in new, tokenizer.decode(new)
    # generate stops at eos: the answer ends there, with nothing (not even padding) after it.
    assert new[-1] == im_end and new.index(im_end) == len(new) - 1


def test_base_has_no_template_and_the_same_weights(smollm2: Path, smollm2_base: Path) -> None:
    assert AutoTokenizer.from_pretrained(smollm2).chat_template is not None
    assert AutoTokenizer.from_pretrained(smollm2_base).chat_template is None
    instruct = load_file(smollm2 / "model.safetensors")
    base = load_file(smollm2_base / "model.safetensors")
    assert instruct.keys() == base.keys()
    assert all(torch.equal(instruct[k], base[k]) for k in instruct)
