"""Checkpoints of a user's own, made offline: the tiny architecture with weights of their own."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM

TINY = Path(__file__).resolve().parent.parent / "align" / "assets" / "tiny"


def pretrained_tiny(folder: Path, *, seed: int = 7, template: bool = True, **architecture: int) -> Path:
    """A saved causal LM of the tiny architecture (or `architecture`'s changes to it), weights drawn
    with `seed`, tokenizer included; without `template` the tokenizer has no chat template and no
    ChatML tokens' roles (a base model's)."""
    folder.mkdir(parents=True)
    config = AutoConfig.from_pretrained(TINY, **architecture)
    torch.manual_seed(seed)
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    shutil.copy(TINY / "tokenizer.json", folder)
    tokenizer_config = json.loads((TINY / "tokenizer_config.json").read_text())
    if not template:
        tokenizer_config.pop("chat_template", None)
        tokenizer_config["eos_token"] = "<|endoftext|>"
    (folder / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))
    return folder
