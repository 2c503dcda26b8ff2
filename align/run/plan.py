"""The start-up block: what a stage really runs, and where its numbers came from.

Logged once per run, after the model has loaded, so it reports the model as loaded (class,
parameters, dtype, chat template), not as configured. A number's origin is read off the config
files themselves: the schema's default (align/config.py: the Qwen report's numbers), the stage's
file, the tuning preset, or else an override (the command line, or a pipeline's per-stage list).
"""

from __future__ import annotations

import logging

from omegaconf import OmegaConf
from torch import nn
from transformers import PreTrainedTokenizerBase

from align.config import CONF_DIR, AlignConfig, ModelConfig
from align.modeling.chat import CHATML_TEMPLATE, end_of_turn_id
from align.modeling.models import describe_precision, load_model_config
from align.run.distributed import world_info

log = logging.getLogger("align")
_ABSENT = object()


def _get(node: object, key: str) -> object:
    for part in key.split("."):
        node = getattr(node, part)
    return node


def origin(config: AlignConfig, key: str) -> str:
    """Which layer set `key` (e.g. 'train.lr') to its value in this run: default, stage, tuning or override."""
    source, expected = "default", _get(AlignConfig(), key)
    layers = [("stage", f"stage/{name}") for name in (config.stage_name, config.stage_preset) if name]
    if config.tuning_preset:
        layers.append(("tuning", f"tuning/{config.tuning_preset}"))
    for name, layer in layers:
        value = OmegaConf.select(OmegaConf.load(CONF_DIR / f"{layer}.yaml"), key, default=_ABSENT)
        if value is not _ABSENT:
            source, expected = name, value
    return source if _get(config, key) == expected else "override"


def _value(config: AlignConfig, key: str, label: str = "") -> str:
    return f"{_get(config, key)}{label} [{origin(config, key)}]"


def parameter_count(model: nn.Module) -> int:
    # Tied weights count once; under ZeRO-3 a parameter's local tensor is a shard (ds_numel is whole).
    unique = {id(p): getattr(p, "ds_numel", p.numel()) for p in model.parameters()}
    return sum(unique.values())


def template_line(tokenizer: PreTrainedTokenizerBase, vocab_size: int) -> str:
    end = tokenizer.convert_ids_to_tokens(end_of_turn_id(tokenizer))
    if tokenizer.chat_template != CHATML_TEMPLATE:
        return f"the model's own (assistant turns end with {end!r})"
    tokens = f"embeddings resized {vocab_size} -> {len(tokenizer)}" if len(tokenizer) > vocab_size else "no new tokens"
    return f"align's ChatML (assistant turns end with {end!r}; {tokens})"


def _numbers(config: AlignConfig) -> list[str]:
    train, ppo = config.train, config.ppo
    world = world_info()[1]
    if config.stage_name == "rm_eval":
        return [f"batch:     {_value(config, 'train.batch_size', ' pairs')} per scoring batch"]
    lr = f"lr:        {_value(config, 'train.lr')}, {_value(config, 'train.lr_scheduler')}"
    if train.warmup_steps:
        lr += f", warm-up {_value(config, 'train.warmup_steps', ' steps')}"
    elif train.warmup_ratio:
        lr += f", warm-up {_value(config, 'train.warmup_ratio', ' of the run')}"
    lines = [lr]
    if config.stage_name == "ppo":
        episodes = ppo.prompts_per_step * ppo.responses_per_prompt
        if ppo.advantage == "gae":
            warmup = _value(config, "ppo.value_warmup_steps", " steps")
            lines.append(f"value:     lr {_value(config, 'ppo.value_lr')}, warm-up {warmup}")
        else:
            lines.append(f"advantage: {_value(config, 'ppo.advantage')}, no value model")
        where = "in the reward" if ppo.kl_in == "reward" else "in the loss (k3)"
        lines.append(f"kl:        {_value(config, 'ppo.kl_coef')} {where} [{origin(config, 'ppo.kl_in')}]")
        sampler = _value(config, "rollout.engine")
        if config.rollout.engine == "vllm" and config.rollout.tensor_parallel_size > 1:
            sampler += f", sharded over {_value(config, 'rollout.tensor_parallel_size', ' ranks')}"
        lines.append(f"rollout:   {sampler}")
        lines.append(
            f"batch:     {_value(config, 'ppo.prompts_per_step', ' prompts')} x "
            f"{_value(config, 'ppo.responses_per_prompt', ' responses')} = {episodes} episodes per device x {world} "
            f"process(es); {_value(config, 'ppo.epochs', ' epochs')} of "
            f"{_value(config, 'ppo.mini_batches', ' mini-batches')} of {_value(config, 'train.batch_size')}"
        )
    else:
        lines.append(
            f"batch:     {_value(config, 'train.batch_size', ' per device')} x "
            f"{_value(config, 'train.grad_accum', ' accumulation')} x {world} process(es) = "
            f"{train.batch_size * train.grad_accum * world} sequences per optimizer step"
        )
    steps = _value(config, "train.max_steps") if train.max_steps > 0 else _value(config, "train.epochs", " epochs")
    lines.append(f"steps:     {steps}, max length {_value(config, 'train.max_length', ' tokens')}")
    return lines


def log_plan(
    config: AlignConfig, model_cfg: ModelConfig, model: nn.Module, tokenizer: PreTrainedTokenizerBase, is_main: bool
) -> None:
    if is_main:
        log.info(describe(config, model_cfg, model, tokenizer))


def describe(config: AlignConfig, model_cfg: ModelConfig, model: nn.Module, tokenizer: PreTrainedTokenizerBase) -> str:
    """The block itself, for `model` as loaded from `model_cfg` (the LoRA wrapper included)."""
    vocab_size = load_model_config(model_cfg).vocab_size  # the checkpoint's own, before ChatML tokens
    total = parameter_count(model)
    trainable = sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters() if p.requires_grad)
    dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
    init = "pretrained weights" if model_cfg.init == "pretrained" else f"random init (seed {config.seed})"
    base = getattr(model, "get_base_model", lambda: model)()
    lines = [
        f"align {config.stage_name}: what runs",
        f"model:     {model_cfg.name_or_path} ({type(base).__name__}, {total / 1e6:.1f}M parameters, {init}, {dtype})",
        f"template:  {template_line(tokenizer, vocab_size)}",
    ]
    if config.peft.enabled:
        lines.append(
            f"lora:      r {config.peft.r}, alpha {config.peft.alpha}: {trainable / 1e6:.2f}M trainable parameters "
            f"({100 * trainable / total:.1f}%)"
        )
    lines += _numbers(config)
    tuning = f", [tuning] conf/tuning/{config.tuning_preset}.yaml" if config.tuning_preset else ", no tuning preset"
    stage = config.stage_preset or config.stage_name
    lines.append(
        f"from:      [default] align/config.py (the Qwen report), [stage] conf/stage/{stage}.yaml"
        f"{tuning}, [override] the command line"
    )
    lines.append(f"precision: {describe_precision(config.train.precision)}")
    return "\n  ".join(lines)
