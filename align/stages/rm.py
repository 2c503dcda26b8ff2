"""Reward model (Qwen report, section 3.2.1) on TRL's RewardTrainer.

The recipe: load the tokenizer and the preference pairs (ChatML, cut at the end-of-turn token),
load a scalar-head model from a base, SFT or PMP checkpoint (plus LoRA with the head trained in
full), train with the pairwise Bradley-Terry loss, evaluate on held-out pairs, save `final/`.

Preference-model pretraining (PMP) is two runs of this stage: one on large comparison data, then
one on high-quality preferences with `rm.init_from=<first run>/final` (see conf/stage/rm.yaml).

What we replace in TRL: its loss reads `model(...).logits`, which transformers pools at the last
token that is not `pad_token_id`; with pad == EOS that is the token before the EOS. Our loss and
evaluation read the reward at the last real token from the attention mask
(`align.modeling.reward_model.rewards_at_last_token`), the same function PPO and `rm_eval` use.
"""

from __future__ import annotations

import dataclasses
import logging

from peft import PeftModel
from transformers import Trainer
from trl import RewardConfig, RewardTrainer

from align.config import AlignConfig, ModelConfig
from align.data import load_recipe_data
from align.errors import DataError, Preempted
from align.hf.callbacks import NoCheckpointAtTheEnd, TrackerCallback
from align.hf.trainer import AlignTrainerMixin
from align.hf.training_args import hf_training_kwargs
from align.modeling import models
from align.modeling import reward_model as rm
from align.modeling.chat import end_of_turn_id
from align.run import plan, rundir
from align.run.lineage import build_manifest, parent_entry, recipe_entry, save_manifest
from align.run.preemption import Preemption, PreemptionCallback
from align.run.saving import save_final, save_random_base
from align.run.tracking import Tracker

log = logging.getLogger("align.rm")


class PairwiseRewardTrainer(AlignTrainerMixin, RewardTrainer):
    """RewardTrainer with the reward read at the last real token, and exact held-out metrics."""

    def __init__(self, *args, use_margin: bool = False, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.use_margin = use_margin

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        # TRL's collator puts the chosen half of the batch first, the rejected half second.
        rewards = rm.rewards_at_last_token(model, inputs["input_ids"], inputs["attention_mask"])
        chosen, rejected = rewards.chunk(2)
        loss = rm.pairwise_loss(chosen, rejected, inputs["margin"] if self.use_margin else None)
        if self.args.center_rewards_coefficient is not None:
            loss = loss + self.args.center_rewards_coefficient * ((chosen + rejected) ** 2).mean()
        if model.training:  # TRL averages these over the logging interval as train/accuracy, ...
            # Gathered over ranks: each rank holds only its share of the batch.
            metrics, gather = self._metrics["train"], self.accelerator.gather_for_metrics
            metrics["accuracy"].append(gather((chosen > rejected).float().detach()).mean().item())
            metrics["margin"].append(gather((chosen - rejected).detach()).mean().item())
            metrics["reward_mean"].append(gather(rewards.detach()).mean().item())
        return (loss, {"rewards": rewards}) if return_outputs else loss

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix="eval"):
        # Every held-out pair scored once (no batch averaging), by the same code as stage=rm_eval.
        rows = eval_dataset if eval_dataset is not None else self.eval_dataset
        chosen, rejected = rm.score_pairs(
            self.model, rows, self.processing_class.pad_token_id, self.args.per_device_eval_batch_size
        )
        metrics = {f"{metric_key_prefix}_{k}": v for k, v in rm.pair_metrics(chosen, rejected).items()}
        # Trainer.log, not TRL's: TRL's would fold the pending train-batch metrics into this record.
        Trainer.log(self, metrics)
        self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, metrics)
        return metrics


def start_model(config: AlignConfig) -> ModelConfig:
    """Where the weights come from: rm.init_from (an SFT or PMP final/) or model.name_or_path."""
    if config.rm.init_from is None:
        return config.model
    return dataclasses.replace(config.model, name_or_path=config.rm.init_from, init="pretrained")


def run(config: AlignConfig) -> dict[str, float]:
    model_cfg = start_model(config)
    models.check_tuning_fits(config, model_cfg, "rm.init_from")
    models.check_lora_targets(model_cfg, rm.lora_target_config(config.peft))
    tokenizer = models.load_tokenizer(model_cfg)
    data = load_recipe_data(
        config.data.recipe,
        "preference",
        tokenizer,
        seed=config.seed,
        max_length=config.train.max_length,
        on_error=config.data.on_error,
        cache_dir=config.data.cache_dir,
    )
    if config.rm.margin and ("margin" not in data.train.column_names or None in data.train["margin"]):
        raise DataError(
            f"rm.margin=true needs a `margin` number on every pair, and recipe '{config.data.recipe}' has pairs "
            "without one"
        )
    pairs = data.train
    if not config.rm.margin and "margin" in pairs.column_names:
        # Unread, and in a mixture of sources with and without margins it holds None, which TRL's collator cannot batch.
        pairs = pairs.remove_columns("margin")
    end_of_turn = end_of_turn_id(tokenizer)
    train = rm.reward_rows(pairs, end_of_turn)
    held_out = rm.reward_rows(data.eval, end_of_turn) if data.eval is not None else None
    args = RewardConfig(
        **hf_training_kwargs(config, has_eval=held_out is not None),
        max_length=config.train.max_length,
        center_rewards_coefficient=config.rm.center_rewards_coefficient,
        disable_dropout=config.train.dropout == 0,
        # An evaluation before the first step shows where the run starts (about 0.5 from a new head,
        # the PMP run's accuracy when fine-tuning from it).
        eval_on_start=held_out is not None and config.train.eval_steps > 0,
        dataset_num_proc=None,
    )
    out = rundir.prepare(config, is_main=args.process_index == 0)
    tracker = Tracker(config, out, is_main=args.process_index == 0)
    preempted = PreemptionCallback(Preemption().install())

    # fp32 weights, the optimizer's master copy: the Trainer computes in bf16 under autocast.
    model = rm.load_reward_model(model_cfg, tokenizer, seed=config.seed, dropout=config.train.dropout)
    if isinstance(model, PeftModel):  # started from a LoRA RM (a LoRA PMP run): fold it in first
        model = model.merge_and_unload()
        weights_on_disk = False
    else:
        weights_on_disk = model_cfg.init == "pretrained"
    if config.peft.enabled:
        if not weights_on_disk:
            save_random_base(model, out, is_main=args.process_index == 0)  # the adapter's base must reload
        new_tokens = len(tokenizer) > models.load_model_config(model_cfg).vocab_size
        model = rm.apply_lora(model, config.peft, new_tokens=new_tokens)
    plan.log_plan(config, model_cfg, model, tokenizer, is_main=args.process_index == 0)

    trainer = PairwiseRewardTrainer(
        model=model,
        args=args,
        train_dataset=train,
        eval_dataset=held_out,
        processing_class=tokenizer,
        callbacks=[TrackerCallback(tracker), NoCheckpointAtTheEnd(), preempted],
        use_margin=config.rm.margin,
        nan_skip_limit=config.train.nan_skip_limit,
    )
    train_result = trainer.train(resume_from_checkpoint=rundir.resume_checkpoint(config, out))
    if preempted.stopped:
        raise Preempted(f"checkpoint written at step {trainer.state.global_step}; a requeued run resumes there")
    step = trainer.state.global_step
    metrics = {"train/loss": train_result.training_loss, "train/steps": step}
    if held_out is not None:
        chosen, rejected = rm.score_pairs(trainer.model, held_out, tokenizer.pad_token_id, config.train.batch_size)
        metrics.update({f"eval/{k}": v for k, v in rm.pair_metrics(chosen, rejected).items()})
        tracker.log_table("eval/examples", rm.EXAMPLE_COLUMNS, rm.example_rows(held_out, chosen, rejected), step)

    # saving.merge_adapter builds a causal LM; a reward model's merge is rm.merge_reward_adapter.
    no_merge = dataclasses.replace(config, peft=dataclasses.replace(config.peft, merge=False))
    final = save_final(trainer, tokenizer, no_merge, out)
    if config.peft.enabled and config.peft.merge and trainer.is_world_process_zero():
        rm.merge_reward_adapter(final, final / "merged", tokenizer)
    # The final evaluation joins the curves; the run-average train/loss belongs in metrics.json only.
    tracker.log({k: v for k, v in metrics.items() if k.startswith("eval/")}, step=step)
    manifest = build_manifest(
        config,
        out,
        data={"train": recipe_entry(config.data.recipe, data.fingerprint)},
        parents=[parent_entry("init", model_cfg.name_or_path if model_cfg.init == "pretrained" else None)],
        metrics=metrics,
    )
    tracker.finish(metrics, manifest=manifest)
    if tracker.is_main:
        save_manifest(manifest, out)
    return metrics
