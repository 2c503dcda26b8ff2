"""Load tokenizers and models by hub id or local path, give them ChatML, wrap them in LoRA.

Weights load only from safetensors, and checkpoint code runs only with
`model.trust_remote_code=true`.
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from align.config import AlignConfig, ModelConfig, PeftConfig
from align.errors import ConfigError, ModelError
from align.modeling.chat import ensure_chat_template, stop_token_ids

ADAPTER_CONFIG = "adapter_config.json"


def _looks_local(name_or_path: str) -> bool:
    return name_or_path.startswith(("/", ".", "~")) or os.path.exists(name_or_path)


def _check_exists(cfg: ModelConfig) -> None:
    if not _looks_local(cfg.name_or_path):
        return
    path = Path(cfg.name_or_path).expanduser()
    # Not named as model.name_or_path: the path may come from ppo.policy, rm.init_from, rm.path, ...
    if not path.is_dir():
        raise ModelError(f"model directory '{cfg.name_or_path}' does not exist")
    # Without this, transformers' complaint is several lines about tokenizer backends.
    if not (path / "config.json").is_file() and not is_adapter_dir(path):
        raise ModelError(f"'{cfg.name_or_path}' has no config.json: not a Hugging Face model directory")


def load_tokenizer(cfg: ModelConfig) -> PreTrainedTokenizerBase:
    _check_exists(cfg)
    try:
        tokenizer = AutoTokenizer.from_pretrained(
            cfg.name_or_path, revision=cfg.revision, trust_remote_code=cfg.trust_remote_code
        )
    except (OSError, ValueError) as exc:
        raise ModelError(f"cannot load a tokenizer from '{cfg.name_or_path}': {str(exc).splitlines()[0]}") from exc
    if tokenizer.pad_token_id is None and tokenizer.eos_token_id is not None:
        # Padding is masked everywhere, so any existing token serves; the document-end EOS is the
        # usual choice, taken before ChatML may make <|im_end|> the EOS.
        tokenizer.pad_token = tokenizer.eos_token
    ensure_chat_template(tokenizer)
    if tokenizer.eos_token_id is None:
        raise ModelError(f"the tokenizer of '{cfg.name_or_path}' has no EOS token; generation could never stop")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def adapter_base(path: str | Path) -> str:
    """The base model a LoRA adapter directory (a peft=lora run's final/) was trained on."""
    return json.loads((Path(path).expanduser() / ADAPTER_CONFIG).read_text())["base_model_name_or_path"]


def load_model_config(cfg: ModelConfig) -> AutoConfig:
    """The architecture of a checkpoint; of a LoRA adapter directory, its base model's."""
    _check_exists(cfg)
    if is_adapter_dir(cfg.name_or_path):
        cfg = ModelConfig(name_or_path=adapter_base(cfg.name_or_path), trust_remote_code=cfg.trust_remote_code)
        _check_exists(cfg)
    try:
        return AutoConfig.from_pretrained(
            cfg.name_or_path, revision=cfg.revision, trust_remote_code=cfg.trust_remote_code
        )
    except (OSError, ValueError) as exc:
        raise ModelError(f"cannot load a model config from '{cfg.name_or_path}': {str(exc).splitlines()[0]}") from exc


# What makes two checkpoints the same model for a tuning preset's learning rates and batch sizes.
_ARCHITECTURE = ("model_type", "hidden_size", "num_hidden_layers", "intermediate_size", "num_attention_heads")


def _architecture(cfg: ModelConfig) -> dict[str, object]:
    config = load_model_config(cfg)
    return {key: getattr(config, key, None) for key in _ARCHITECTURE}


def check_tuning_fits(config: AlignConfig, start: ModelConfig, key: str) -> None:
    """A tuning preset (conf/tuning/, e.g. the tiny demo's learning rates) is written for its model
    preset; a checkpoint of another architecture named by `key` must not be trained with it."""
    if config.tuning_preset is None or start.name_or_path == config.model.name_or_path:
        return
    preset, actual = _architecture(config.model), _architecture(start)
    if preset != actual:
        shape = ", ".join(f"{k} {v}" for k, v in actual.items())
        raise ConfigError(
            f"{key}={start.name_or_path} ({shape}) is not the model conf/tuning/{config.tuning_preset}.yaml is "
            "written for; drop model=... (its own checkpoint then runs with the stage's defaults, as model=hf)"
        )


def torch_dtype(precision: str) -> torch.dtype:
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[resolve_precision(precision)]


def autocast(precision: str, device: torch.device) -> contextlib.AbstractContextManager:
    """Mixed precision: forwards in bf16/fp16 over fp32 weights (a no-op in fp32). An Adam step of
    ~lr is below half a bf16 spacing of a weight near 0.02, so weights stored in bf16 barely train
    at RLHF learning rates; the trained weights and their optimizer state stay fp32."""
    dtype = torch_dtype(precision)
    return torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)


def sampling_precision(precision: str, device: torch.device) -> str:
    """The precision a rollout samples in: the run's on a GPU, fp32 on a CPU. Decoding runs matrix
    products of a few rows, where bf16 does not pay on a CPU: at batch 8 AMX gave 124 against 100
    GFLOP/s in fp32 (issue 17), and without AMX bf16 sampling took 1.5-2.4x as long as fp32 (tiny
    and 20M Qwen2, batch 8 and 32, 24 tokens, measured 2026-12-04). Log-probs are recomputed by
    the scoring forward either way, so training sees the run's precision."""
    return precision if device.type == "cuda" else "fp32"


def bf16_hardware() -> str | None:
    """What computes bf16 natively here: a GPU, or a CPU with AMX or AVX512-BF16 (where a bf16
    matmul runs several times an fp32 one); None when bf16 would be emulated, slower than fp32."""
    if torch.cuda.is_available():
        return torch.cuda.get_device_name() if torch.cuda.is_bf16_supported() else None
    if torch.cpu._is_amx_tile_supported():
        return "a CPU with AMX"
    if torch.cpu._is_avx512_bf16_supported():
        return "a CPU with AVX512-BF16"
    return None


def resolve_precision(precision: str) -> str:
    """'auto' is bf16 where the hardware computes it natively, else fp32; a forced choice stays."""
    if precision == "fp16" and not torch.cuda.is_available():
        raise ConfigError("train.precision=fp16 needs a GPU (loss-scaled fp16 training); use bf16 or fp32 here")
    if precision != "auto":
        return precision
    return "bf16" if bf16_hardware() else "fp32"


def describe_precision(precision: str) -> str:
    """One line for the start-up block: the choice, what it became and why."""
    hardware = bf16_hardware()
    resolved = resolve_precision(precision)
    if resolved == "bf16":
        why = f"bf16 on {hardware}" if hardware else "bf16 emulated: this hardware has no bf16 units, slower than fp32"
        return f"{precision} -> {resolved} ({why}; fp32 weights and optimizer state)"
    if precision == "auto":
        return f"auto -> {resolved} (no bf16 hardware: no GPU with bf16, a CPU without AMX or AVX512-BF16)"
    return f"{precision} -> {resolved}"


def load_causal_lm(
    cfg: ModelConfig,
    tokenizer: PreTrainedTokenizerBase,
    *,
    seed: int = 0,
    dropout: float | None = None,
) -> PreTrainedModel:
    """A causal LM ready for training: fp32 weights (the optimizer's master copy; bf16 compute comes
    from autocast or DeepSpeed), embeddings cover the tokenizer, dropout as asked."""
    if cfg.init == "pretrained" and is_adapter_dir(cfg.name_or_path):
        raise ModelError(
            f"'{cfg.name_or_path}' holds a LoRA adapter (a peft=lora run's final/), not a whole model; start from "
            "its merged weights (peft.merge=true writes final/merged/)"
        )
    config = load_model_config(cfg)
    if dropout is not None and hasattr(config, "attention_dropout"):
        config.attention_dropout = dropout
    kwargs = {"trust_remote_code": cfg.trust_remote_code, "attn_implementation": cfg.attn_implementation}
    if cfg.init == "random":
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32, **kwargs)
    else:
        try:
            model = AutoModelForCausalLM.from_pretrained(
                cfg.name_or_path,
                config=config,
                revision=cfg.revision,
                dtype=torch.float32,
                use_safetensors=True,
                **kwargs,
            )
        except (OSError, ValueError) as exc:
            raise ModelError(f"cannot load weights from '{cfg.name_or_path}': {str(exc).splitlines()[0]}") from exc
    if len(tokenizer) > model.get_input_embeddings().num_embeddings:
        model.resize_token_embeddings(len(tokenizer))
    model.config.pad_token_id = tokenizer.pad_token_id
    model.config.eos_token_id = tokenizer.eos_token_id
    if model.generation_config is not None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
        stops = stop_token_ids(tokenizer)  # generate stops at the end of a turn too
        model.generation_config.eos_token_id = stops[0] if len(stops) == 1 else stops
    return model


def module_names(model_cfg: ModelConfig) -> set[str]:
    """Names of every submodule, from the config alone (meta device: no memory, no weights)."""
    config = load_model_config(model_cfg)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=model_cfg.trust_remote_code)
    return {name for name, _ in model.named_modules()}


def check_lora_targets(model_cfg: ModelConfig, peft_cfg: PeftConfig) -> None:
    """Fail before any weights load when a LoRA target names no module of the model."""
    if not peft_cfg.enabled:
        return
    names = module_names(model_cfg)
    for target in [*peft_cfg.target_modules, *peft_cfg.modules_to_save]:
        if not any(name == target or name.endswith("." + target) for name in names):
            leaves = sorted({name.rsplit(".", 1)[-1] for name in names if "." in name})
            raise ConfigError(
                f"peft target '{target}' is not a module of {model_cfg.name_or_path} (it has: {', '.join(leaves)})"
            )


def lora_config(
    cfg: PeftConfig, *, new_tokens: bool, task_type: str = "CAUSAL_LM", trained_in_full: tuple[str, ...] = ()
) -> LoraConfig:
    """The LoRA of `cfg`; `trained_in_full` modules (a reward head) train beside the adapters."""
    modules_to_save = [*trained_in_full, *(m for m in cfg.modules_to_save if m not in trained_in_full)]
    if new_tokens:
        # A base model meeting ChatML tokens for the first time must learn their embeddings.
        heads = ("embed_tokens", "lm_head") if task_type == "CAUSAL_LM" else ("embed_tokens",)
        modules_to_save += [m for m in heads if m not in modules_to_save]
    return LoraConfig(
        r=cfg.r,
        lora_alpha=cfg.alpha,
        lora_dropout=cfg.dropout,
        target_modules=list(cfg.target_modules),
        modules_to_save=modules_to_save or None,
        task_type=task_type,
    )


def apply_lora(
    model: PreTrainedModel,
    cfg: PeftConfig,
    *,
    new_tokens: bool,
    task_type: str = "CAUSAL_LM",
    trained_in_full: tuple[str, ...] = (),
) -> PeftModel:
    """Wrap `model` in LoRA adapters (`lora_config`)."""
    lora = lora_config(cfg, new_tokens=new_tokens, task_type=task_type, trained_in_full=trained_in_full)
    return get_peft_model(model, lora)


def is_adapter_dir(path: str | Path) -> bool:
    return (Path(path) / ADAPTER_CONFIG).is_file()


def unwrap_model(model: torch.nn.Module) -> torch.nn.Module:
    """The Hugging Face model inside DDP / DeepSpeed / PEFT wrappers (LoRA layers are patched in place)."""
    while hasattr(model, "module"):  # DistributedDataParallel, DeepSpeedEngine
        model = model.module
    if isinstance(model, PeftModel):
        model = model.get_base_model()
    return model
