"""Write `final/`: Hugging Face format, safetensors, tokenizer and chat template.

With LoRA, `final/` holds the adapter; `peft.merge=true` adds merged full weights in
`final/merged/`. A randomly initialised base (the tiny demo) is not on any hub, so its weights
are saved in `base/` and the adapter points there.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from peft import PeftModel
from torch import nn
from transformers import AutoModelForCausalLM, PreTrainedModel, PreTrainedTokenizerBase, Trainer

from align.config import AlignConfig
from align.modeling.models import ADAPTER_CONFIG


def save_random_base(model: PreTrainedModel, out: Path, *, is_main: bool | None = None) -> Path:
    """Keep the weights a random-init base had before LoRA, so the adapter can be reloaded.

    Call it on every rank with `is_main=(rank == 0)`: under ZeRO-3 the model is built partitioned
    (deepspeed.zero.Init), each rank holds a slice of every weight and `save_pretrained` alone would
    write empty tensors, so the weights are gathered first, which every rank must join.
    `is_main=None` means the caller is the main process alone; that works only while the weights
    are whole on it (no ZeRO-3, or one process), and fails plainly otherwise instead of writing an
    empty base.
    """
    base = out / "base"
    partitioned = [p for p in model.parameters() if hasattr(p, "ds_tensor")]
    if not partitioned:
        if is_main is not False:
            model.save_pretrained(base)
        return base
    if is_main is None:
        if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
            raise RuntimeError(
                "save_random_base was called on the main process alone, but ZeRO-3 partitions the "
                "weights across ranks: call it on every rank with is_main=(rank == 0)"
            )
        is_main = True
    import deepspeed

    with deepspeed.zero.GatheredParameters(partitioned):  # a collective: every rank enters
        if is_main:
            model.save_pretrained(base)
    return base


def master_weights(model: nn.Module, *, is_main: bool) -> dict[str, torch.Tensor] | None:
    """The fp32 weights of a model that DeepSpeed runs in bf16/fp16, for saving; None when the
    model's own weights are fp32 already.

    DeepSpeed's bf16 casts the module to 16 bits and keeps the fp32 masters in its optimizer, so the
    module's state dict would hand users back every weight rounded to 8 bits of mantissa (a non-
    DeepSpeed run saves fp32). Trained weights come from the optimizer's masters, frozen ones (a
    LoRA base) from the module. Every rank calls: the pieces are gathered across ranks. Only the
    main process gets the dict (on CPU); the others get an empty one.
    """
    if all(p.dtype == torch.float32 for p in model.parameters()):
        return None
    import deepspeed
    from deepspeed.utils import safe_get_full_fp32_param

    weights: dict[str, torch.Tensor] = {}
    by_param: dict[int, torch.Tensor] = {}  # tied weights stay one tensor, which save_pretrained dedups
    for name, param in model.named_parameters(remove_duplicate=False):
        if id(param) not in by_param:
            master = safe_get_full_fp32_param(param) if param.requires_grad else None
            if master is None:
                partitioned = [param] if hasattr(param, "ds_tensor") else []
                with deepspeed.zero.GatheredParameters(partitioned):
                    master = param.detach().float()
            by_param[id(param)] = master.cpu().clone() if is_main else master.new_empty(0)
        if is_main:
            weights[name] = by_param[id(param)]
    if is_main:
        params = dict(model.named_parameters(remove_duplicate=False))
        weights |= {k: v.cpu() for k, v in model.state_dict().items() if k not in params}  # buffers
    return weights


def save_pretrained_fp32(model: PreTrainedModel, folder: Path, *, is_main: bool) -> bool:
    """`save_pretrained` with fp32 masters when DeepSpeed holds the module in 16 bits; False (nothing
    written) when the module is fp32 and an ordinary save will do. Every rank calls."""
    weights = master_weights(model, is_main=is_main)
    if weights is None:
        return False
    if is_main:
        model.save_pretrained(folder, state_dict=weights, safe_serialization=True)
        config = folder / "config.json"  # none for a LoRA adapter
        if config.is_file():  # save_pretrained wrote the module's dtype; say what the files hold
            config.write_text(json.dumps(json.loads(config.read_text()) | {"dtype": "float32"}, indent=2) + "\n")
    return True


def save_final(trainer: Trainer, tokenizer: PreTrainedTokenizerBase, config: AlignConfig, out: Path) -> Path:
    final = out / "final"
    is_main = trainer.is_world_process_zero()
    unwrapped = trainer.accelerator.unwrap_model(trainer.model)
    # save_model gathers ZeRO-3 shards to rank 0 and writes only there, in the module's dtype.
    if not (trainer.is_deepspeed_enabled and save_pretrained_fp32(unwrapped, final, is_main=is_main)):
        trainer.save_model(str(final))
    if is_main:
        tokenizer.save_pretrained(final)
        if config.peft.enabled:
            _point_adapter_at_base(final, out)
            if config.peft.merge:
                merge_adapter(final, final / "merged", tokenizer)
    trainer.accelerator.wait_for_everyone()
    return final


def _point_adapter_at_base(final: Path, out: Path) -> None:
    base = out / "base"
    if not base.is_dir():
        return
    path = final / ADAPTER_CONFIG
    adapter = json.loads(path.read_text())
    adapter["base_model_name_or_path"] = str(base.resolve())
    path.write_text(json.dumps(adapter, indent=2))


def merge_adapter(adapter_dir: Path, target: Path, tokenizer: PreTrainedTokenizerBase) -> None:
    """Fold the adapter into a fresh copy of its base, on CPU, and save full weights."""
    adapter = json.loads((adapter_dir / ADAPTER_CONFIG).read_text())
    base = AutoModelForCausalLM.from_pretrained(adapter["base_model_name_or_path"], use_safetensors=True)
    if len(tokenizer) > base.get_input_embeddings().num_embeddings:
        base.resize_token_embeddings(len(tokenizer))
    merged = PeftModel.from_pretrained(base, str(adapter_dir)).merge_and_unload()
    merged.save_pretrained(target)
    tokenizer.save_pretrained(target)
