"""The policy's weights as a plain checkpoint names them, one module at a time, for an inference
engine: LoRA folded into its base, PEFT's prefixes gone, ZeRO-3 shards gathered module by module."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch
from peft import PeftModel
from peft.tuners.lora import LoraLayer
from peft.utils import ModulesToSaveWrapper
from torch import Tensor, nn

Gather = Callable[[list[nn.Parameter]], contextlib.AbstractContextManager]


def checkpoint_weights(model: nn.Module, gather: Gather | None = None) -> Iterator[tuple[str, Tensor]]:
    """``(name, tensor)`` for every weight of ``model`` (a Hugging Face model, or one inside PEFT),
    named as its checkpoint would name it. A LoRA layer yields its base weight plus the active
    adapters' update, computed aside: merging in place and back would round the frozen base a
    little at every call. ``gather`` (ZeRO-3) makes one module's parameters whole at a time; what is
    yielded is then a copy, valid after its module is partitioned again."""
    base = model.get_base_model() if isinstance(model, PeftModel) else model
    copy = gather is not None
    gather = gather or (lambda params: contextlib.nullcontext())
    done: list[str] = []
    for name, module in base.named_modules():
        if any(name.startswith(prefix) for prefix in done):
            continue
        prefix = f"{name}." if name else ""
        if isinstance(module, LoraLayer):
            done.append(prefix)
            with gather(list(module.parameters())), torch.no_grad():
                yield from _merged_lora(module, prefix)
        elif isinstance(module, ModulesToSaveWrapper):
            done.append(prefix)
            trained = module.modules_to_save[module.active_adapter]
            with gather(list(trained.parameters())):
                for key, param in trained.named_parameters():
                    yield prefix + key, _detached(param, copy)
        else:
            # A tied weight (an LM head sharing the embedding) under each of its names, as a state
            # dict has it: vLLM's reload leaves a head it was not given with placeholder weights.
            own = list(module.named_parameters(recurse=False))
            if own:
                with gather([p for _, p in own]):
                    for key, param in own:
                        yield prefix + key, _detached(param, copy)


def _merged_lora(layer: LoraLayer, prefix: str) -> Iterator[tuple[str, Tensor]]:
    inner = layer.get_base_layer()
    weight = inner.weight.detach().clone()
    for adapter in layer.active_adapters:
        if adapter in layer.lora_A and adapter not in layer.merged_adapters:
            weight += layer.get_delta_weight(adapter).to(weight.dtype)
    yield prefix + "weight", weight
    if getattr(inner, "bias", None) is not None:
        yield prefix + "bias", inner.bias.detach().clone()


def _detached(param: Tensor, copy: bool) -> Tensor:
    return param.detach().clone() if copy else param.detach()
