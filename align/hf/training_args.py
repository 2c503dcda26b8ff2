"""Our train.* config as Hugging Face TrainingArguments keywords (shared by the SFT and RM stages)."""

from __future__ import annotations

from typing import Any

import torch

from align.config import AlignConfig
from align.modeling.models import resolve_precision
from align.run.distributed import REUSE_DISTRIBUTED_STATE, build_deepspeed_config, world_info


def hf_training_kwargs(config: AlignConfig, *, has_eval: bool) -> dict[str, Any]:
    train = config.train
    precision = resolve_precision(train.precision)
    evaluate = has_eval and train.eval_steps > 0
    return {
        "output_dir": f"{config.output_dir}/checkpoints",
        "max_steps": train.max_steps,
        "num_train_epochs": train.epochs,
        "per_device_train_batch_size": train.batch_size,
        "per_device_eval_batch_size": train.batch_size,
        "gradient_accumulation_steps": train.grad_accum,
        "learning_rate": train.lr,
        "lr_scheduler_type": train.lr_scheduler,
        # TrainingArguments reads a value below 1 as a fraction of the run.
        "warmup_steps": train.warmup_steps or train.warmup_ratio,
        "weight_decay": train.weight_decay,
        "adam_beta1": train.adam_beta1,
        "adam_beta2": train.adam_beta2,
        "adam_epsilon": train.adam_eps,
        "max_grad_norm": train.max_grad_norm,
        # Mixed precision: the Trainer autocasts over the fp32 weights models.load_* give it.
        "bf16": precision == "bf16",
        "fp16": precision == "fp16",
        # transformers accepts bf16 without a GPU only when told the run is on the CPU.
        "use_cpu": precision == "bf16" and not torch.cuda.is_available(),
        "activation_checkpointing": train.gradient_checkpointing,
        "logging_steps": train.logging_steps,
        "logging_first_step": True,
        # A NaN must stop the run (hf_callbacks.NonFiniteGuard), not be averaged away; when skipped
        # steps are allowed, the logged loss puts the running mean in their place (the Trainer's filter).
        "logging_nan_inf_filter": train.nan_skip_limit > 0,
        "eval_strategy": "steps" if evaluate else "no",
        "eval_steps": train.eval_steps if evaluate else None,
        "save_strategy": "steps",
        "save_steps": train.save_steps,
        "save_total_limit": train.save_total_limit,
        "seed": config.seed,
        "data_seed": config.seed,
        "report_to": [],
        "dataloader_num_workers": 0,
        # Keep the process state align.run.distributed.init_distributed built (see its docstring).
        "accelerator_config": REUSE_DISTRIBUTED_STATE,
        "deepspeed": build_deepspeed_config(
            config.deepspeed.stage,
            config.deepspeed.offload_optimizer,
            config.deepspeed.offload_param,
            precision=precision,
            grad_clip=train.max_grad_norm,
            micro_batch=train.batch_size,
            grad_accum=train.grad_accum,
            world_size=world_info()[1],
        ),
    }
