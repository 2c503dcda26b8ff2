"""Where PPO's four models live: one process, data parallel, or DeepSpeed ZeRO-2/3 across ranks.

PPO trains two models (policy, value) and only runs two (reference, reward model). Without
DeepSpeed, accelerate prepares each trained model and its optimiser (DDP across ranks) and we clip
and step. With DeepSpeed, each trained model gets its own engine, built from our config (an
accelerate `Accelerator` drives a single engine, PPO needs two); under ZeRO-3 the frozen models
become inference engines, so every rank holds a shard of all four, and models load straight into
shards. Under ZeRO-2 the frozen models are replicated, as with DDP.

The stage sees the same small interface either way: forward, `backward`, `finish_mini_batch`,
`for_generation`, `checkpoint_weights` (for an inference engine), `save`/`load` (a checkpoint) and
`save_pretrained` (final weights).
"""

from __future__ import annotations

import contextlib
import copy
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from peft import set_peft_model_state_dict
from safetensors.torch import load_file
from torch import nn

from align.errors import CheckpointError
from align.modeling.models import autocast, is_adapter_dir
from align.rl.forward import ValueModel
from align.rl.weights import checkpoint_weights
from align.run.distributed import any_rank
from align.run.saving import save_pretrained_fp32

OPTIMIZER_FILE = "optimizer.pt"
DEEPSPEED_TAG = "deepspeed"


class Placement:
    """Plain (accelerate) or DeepSpeed placement for one PPO run; lives as long as the run.

    Under ZeRO-3 it holds transformers' `HfDeepSpeedConfig`, which transformers reads (through a
    weak reference) to build models partitioned and to gather them when resizing or saving.
    """

    def __init__(self, accelerator: Accelerator, ds_config: dict[str, Any] | None, precision: str = "fp32") -> None:
        self.accelerator = accelerator
        self.ds_config = ds_config
        self.precision = precision
        self.zero_stage = ds_config["zero_optimization"]["stage"] if ds_config else 0
        self._hf_ds_config = None
        if self.zero_stage == 3:
            from transformers.integrations import HfDeepSpeedConfig

            self._hf_ds_config = HfDeepSpeedConfig(ds_config)

    def trained(self, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any) -> TrainedModel:
        if self.ds_config is None:
            model, optimizer = self.accelerator.prepare(model, optimizer)
            return TrainedModel(model, optimizer, scheduler, self.accelerator, engine=None, precision=self.precision)
        import deepspeed

        engine, ds_optimizer, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=self.ds_config)
        return TrainedModel(engine, ds_optimizer, scheduler, self.accelerator, engine=engine, precision=self.precision)

    def frozen(self, model: nn.Module | None) -> nn.Module | None:
        """A model that only runs forward: a ZeRO-3 inference engine (sharded), else a replica."""
        if model is None:
            return None
        if self.zero_stage != 3:
            return model.to(self.accelerator.device)
        import deepspeed

        # No optimiser, no gradient clipping: the engine only partitions and gathers weights.
        config = {k: v for k, v in self.ds_config.items() if k != "gradient_clipping"}
        config["zero_optimization"] = {"stage": 3}
        engine, *_ = deepspeed.initialize(model=model, config=config)
        engine.eval()  # DeepSpeed's eval() returns None, unlike nn.Module's
        return engine

    def copy_for_reference(self, policy: nn.Module, load_again) -> nn.Module:
        """The frozen reference: a copy of the policy as loaded (ZeRO-3 shards cannot be deep-copied)."""
        reference = load_again() if self.zero_stage == 3 else copy.deepcopy(policy)
        return reference.requires_grad_(False).eval()


class TrainedModel:
    """A model PPO trains, with its optimiser and learning-rate schedule."""

    def __init__(
        self, model: nn.Module, optimizer, scheduler, accelerator: Accelerator, engine, precision: str = "fp32"
    ) -> None:
        self.model, self.optimizer, self.scheduler = model, optimizer, scheduler
        self.accelerator = accelerator
        self.engine = engine
        self.precision = precision

    def __call__(self, *args, **kwargs):
        # Every training forward in the run's compute precision over the fp32 weights.
        with autocast(self.precision, self.accelerator.device):
            return self.model(*args, **kwargs)

    @property
    def module(self) -> nn.Module:
        """The model itself, outside any DDP or DeepSpeed wrapper."""
        return self.engine.module if self.engine is not None else self.accelerator.unwrap_model(self.model)

    def backward(self, loss: torch.Tensor, accum: int) -> None:
        """Accumulate one micro-batch's gradient (a mini-batch has `accum` of them)."""
        if self.engine is None:
            self.accelerator.backward(loss / accum)
            return
        # DeepSpeed divides by its gradient_accumulation_steps (= accum) itself, and must be told of
        # every micro-batch; it clips and steps only at the mini-batch boundary.
        self.engine.backward(loss)
        self.engine.step()

    def finish_mini_batch(self, max_grad_norm: float, losses_finite: bool = True) -> float:
        """Clip and step; the gradient norm before clipping, NaN when the update was not applied.

        A non-finite loss (on any rank) or gradient is never applied: the gradient is dropped and
        the weights and optimiser state stay as they were. DeepSpeed clips and steps inside its
        last `backward` and cannot drop an update; the caller stops the run instead.
        """
        if self.engine is not None:
            norm = self.engine.get_global_grad_norm()
            return float(norm) if norm is not None and losses_finite else float("nan")
        norm = float(self.accelerator.clip_grad_norm_(self.model.parameters(), max_grad_norm))
        (bad_loss,) = any_rank([not losses_finite])  # DDP: every rank must make the same choice
        if not bad_loss and math.isfinite(norm):
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float("nan") if bad_loss else norm

    @contextlib.contextmanager
    def for_generation(self) -> Iterator[nn.Module]:
        """The whole model for a rollout. Under ZeRO-3 its weights are gathered once for the batch
        and DeepSpeed's per-layer hooks are lifted, rather than gathered layer by layer per token."""
        if not self._partitioned():
            yield self.module
            return
        import deepspeed
        from trl.models.utils import add_hooks, remove_hooks

        with deepspeed.zero.GatheredParameters(list(self.module.parameters())):
            remove_hooks(self.engine)
            try:
                yield self.module
            finally:
                add_hooks(self.engine)

    def checkpoint_weights(self) -> Iterator[tuple[str, torch.Tensor]]:
        """The weights under their checkpoint names, for an inference engine (LoRA merged; under
        ZeRO-3 gathered one module at a time, never the whole model at once). Every rank calls."""
        gather = None
        if self._partitioned():
            import deepspeed

            gather = deepspeed.zero.GatheredParameters
        return checkpoint_weights(self.module, gather)

    def save(self, folder: Path, *, is_main: bool) -> None:
        """This model's part of a checkpoint; call on every rank (DeepSpeed writes a shard per rank)."""
        if self.engine is not None:
            self.engine.save_checkpoint(str(folder), tag=DEEPSPEED_TAG, save_latest=False)
            if is_main:
                torch.save({"scheduler": self.scheduler.state_dict()}, folder / OPTIMIZER_FILE)
            return
        if is_main:
            self.module.save_pretrained(folder, safe_serialization=True)
            state = {"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict()}
            torch.save(state, folder / OPTIMIZER_FILE)

    def load(self, folder: Path) -> None:
        """Restore weights, optimiser and schedule from `save`'s folder; call on every rank."""
        state = torch.load(folder / OPTIMIZER_FILE, weights_only=True)
        self.scheduler.load_state_dict(state["scheduler"])
        if self.engine is not None:
            path, _ = self.engine.load_checkpoint(
                str(folder), tag=DEEPSPEED_TAG, load_optimizer_states=True, load_lr_scheduler_states=False
            )
            if path is None:
                raise CheckpointError(f"{folder} holds no DeepSpeed checkpoint '{DEEPSPEED_TAG}' for this model")
            return
        # What `save_pretrained` wrote: the value model's inner sequence-classification model.
        model = self.module.model if isinstance(self.module, ValueModel) else self.module
        if is_adapter_dir(folder):
            set_peft_model_state_dict(model, load_file(folder / "adapter_model.safetensors"))
        else:
            load_weights(model, folder)
        self.optimizer.load_state_dict(state["optimizer"])

    def save_pretrained(self, folder: Path, *, is_main: bool, merged: Path | None = None) -> None:
        """Final weights in Hugging Face format, whole (ZeRO-3 shards gathered); every rank calls.

        `merged` also writes the LoRA adapter folded into its base there. Under DeepSpeed bf16 the
        saved weights are the optimizer's fp32 masters, as without DeepSpeed.
        """
        hf_model = self.module.model if isinstance(self.module, ValueModel) else self.module
        if self.engine is not None and merged is None and save_pretrained_fp32(hf_model, folder, is_main=is_main):
            return
        with self._gathered():
            if is_main:
                self.module.save_pretrained(folder, safe_serialization=True)
                if merged is not None:
                    # Last use of the model: merging replaces the LoRA layers in place.
                    self.module.merge_and_unload().save_pretrained(merged, safe_serialization=True)

    def _partitioned(self) -> bool:
        return self.engine is not None and any(hasattr(p, "ds_tensor") for p in self.module.parameters())

    def _gathered(self):
        if not self._partitioned():
            return contextlib.nullcontext()
        import deepspeed

        return deepspeed.zero.GatheredParameters(list(self.module.parameters()))


def load_weights(model: nn.Module, folder: Path) -> None:
    """Load safetensors shards into a model; only tied weights (saved once) may be absent."""
    tensors: dict[str, torch.Tensor] = {}
    for file in sorted(folder.glob("*.safetensors")):
        tensors.update(load_file(file))
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    by_storage: dict[int, list[str]] = {}
    for name, tensor in model.state_dict().items():
        by_storage.setdefault(tensor.data_ptr(), []).append(name)
    tied = {name for names in by_storage.values() if len(names) > 1 for name in names}
    if unexpected or set(missing) - tied:
        raise CheckpointError(f"{folder} does not match the model (missing {missing[:3]}, unexpected {unexpected[:3]})")
