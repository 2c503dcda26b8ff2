"""Supervised finetuning (Qwen report, section 3.1) on TRL's SFTTrainer.

The recipe: load the tokenizer and the data (rendered to ChatML, assistant-only masks), load the
model (plus LoRA), train with checkpoints and evaluation, save `final/` in Hugging Face format.
"""

from __future__ import annotations

import logging

from trl import SFTConfig

from align.config import AlignConfig
from align.data import load_recipe_data
from align.errors import Preempted
from align.hf.callbacks import NoCheckpointAtTheEnd, TrackerCallback
from align.hf.sft_trainer import AlignSFTTrainer
from align.hf.training_args import hf_training_kwargs
from align.modeling import models
from align.run import plan, rundir
from align.run.lineage import build_manifest, parent_entry, recipe_entry, save_manifest
from align.run.preemption import Preemption, PreemptionCallback
from align.run.saving import save_final, save_random_base
from align.run.tracking import Tracker

log = logging.getLogger("align.sft")


def sft_args(config: AlignConfig, *, has_eval: bool) -> SFTConfig:
    """The SFTConfig of a run (bench/sft_throughput.py measures the trainer built from it)."""
    return SFTConfig(
        **hf_training_kwargs(config, has_eval=has_eval),
        max_length=config.train.max_length,
        packing=config.sft.packing,
        # Best-fit packing keeps whole conversations and marks their boundaries with position_ids,
        # so attention never crosses from one conversation into the next.
        packing_strategy="bfd",
        dataset_num_proc=None,
    )


def run(config: AlignConfig) -> dict[str, float]:
    models.check_lora_targets(config.model, config.peft)
    tokenizer = models.load_tokenizer(config.model)
    data = load_recipe_data(
        config.data.recipe,
        "sft",
        tokenizer,
        seed=config.seed,
        max_length=config.train.max_length,
        on_error=config.data.on_error,
        cache_dir=config.data.cache_dir,
    )
    args = sft_args(config, has_eval=data.eval is not None)
    out = rundir.prepare(config, is_main=args.process_index == 0)
    tracker = Tracker(config, out, is_main=args.process_index == 0)
    preempted = PreemptionCallback(Preemption().install())

    model = models.load_causal_lm(config.model, tokenizer, seed=config.seed, dropout=config.train.dropout)
    if config.peft.enabled:
        if config.model.init == "random":
            save_random_base(model, out, is_main=args.process_index == 0)
        new_tokens = len(tokenizer) > models.load_model_config(config.model).vocab_size
        model = models.apply_lora(model, config.peft, new_tokens=new_tokens)
    plan.log_plan(config, config.model, model, tokenizer, is_main=args.process_index == 0)

    trainer = AlignSFTTrainer(
        model=model,
        args=args,
        train_dataset=data.train,
        eval_dataset=data.eval,
        processing_class=tokenizer,
        callbacks=[TrackerCallback(tracker), NoCheckpointAtTheEnd(), preempted],
        nan_skip_limit=config.train.nan_skip_limit,
    )
    train_result = trainer.train(resume_from_checkpoint=rundir.resume_checkpoint(config, out))
    if preempted.stopped:
        raise Preempted(f"checkpoint written at step {trainer.state.global_step}; a requeued run resumes there")
    metrics = {"train/loss": train_result.training_loss, "train/steps": trainer.state.global_step}
    if data.eval is not None:
        metrics.update({f"eval/{k.removeprefix('eval_')}": v for k, v in trainer.evaluate().items()})
    save_final(trainer, tokenizer, config, out)
    # The final evaluation joins the curves; the run-average train/loss belongs in metrics.json only.
    tracker.log({k: v for k, v in metrics.items() if k.startswith("eval/")}, step=trainer.state.global_step)
    manifest = build_manifest(
        config,
        out,
        data={"train": recipe_entry(config.data.recipe, data.fingerprint)},
        parents=[parent_entry("base", config.model.name_or_path if config.model.init == "pretrained" else None)],
        metrics=metrics,
    )
    tracker.finish(metrics, manifest=manifest)
    if tracker.is_main:
        save_manifest(manifest, out)
    return metrics
