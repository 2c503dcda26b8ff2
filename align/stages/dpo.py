"""Direct preference optimisation (Rafailov et al. 2023) on TRL's DPOTrainer.

The recipe: load the tokenizer and the preference pairs (rendered with the run's chat template),
load the policy (an SFT run's final/) and its frozen reference, train with a TRL DPO loss
(`dpo.loss_type`), evaluate on held-out pairs, save `final/`.

What we replace in TRL:
- its dataset processing, which renders conversations with the template again: the rows here are
  align's own tokens (`dpo_rows`), the prompt ending in the generation header and each response cut
  after its end-of-turn token, where PPO's sampling stops and the RM reads its reward (ChatML's
  newline after `<|im_end|>` is never generated, so it is no part of a response's log-prob);
- the reference: TRL reloads it from the policy's `name_or_path`, which a random-init demo model
  does not have and a model whose embeddings grew for ChatML does not match; here it is a frozen
  copy of the policy as loaded; with `peft=lora` no copy (the same weights, adapter off), with
  `dpo.precompute_ref_log_probs=true` none during training;
- LoRA: TRL gives an adapter it is handed a frozen "ref" twin, saved in final/ beside it; handed the
  LoRA config instead, it builds the adapter itself and the reference is the base with it off;
- metric names (`train/rewards/margins`, `eval/rewards/margins`, ...) and held-out means weighted
  by each batch's pairs, so a short last batch counts for what it holds.
"""

from __future__ import annotations

import copy
import dataclasses
import logging

import torch
from transformers import Trainer
from trl import DPOConfig as TrlDPOConfig
from trl import DPOTrainer

from align.config import AlignConfig
from align.data import load_recipe_data
from align.errors import DataError, Preempted
from align.hf.callbacks import NoCheckpointAtTheEnd, TrackerCallback, metric_name
from align.hf.trainer import AlignTrainerMixin
from align.hf.training_args import hf_training_kwargs
from align.modeling import models
from align.modeling.chat import encode, end_of_turn_id, render
from align.modeling.reward_model import trim_to_end_of_turn
from align.run import plan, rundir
from align.run.lineage import build_manifest, parent_entry, recipe_entry, save_manifest
from align.run.preemption import Preemption, PreemptionCallback
from align.run.saving import save_final, save_random_base
from align.run.tracking import Tracker

log = logging.getLogger("align.dpo")
_TIMINGS = ("eval_runtime", "eval_samples_per_second", "eval_steps_per_second")


class AlignDPOTrainer(AlignTrainerMixin, DPOTrainer):
    """DPOTrainer on align's tokenised pairs, with align's metric names and exact held-out means."""

    def __init__(self, *args, **kwargs) -> None:
        self._eval_pairs: list[int] = []  # pairs in each evaluation batch, all ranks together
        super().__init__(*args, **kwargs)

    def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
        return dataset  # prompt_ids, chosen_ids, rejected_ids from dpo_rows: nothing to render

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if not model.training:  # the collator stacks the chosen half of the batch over the rejected half
            pairs = torch.tensor([inputs["input_ids"].shape[0] // 2], device=inputs["input_ids"].device)
            self._eval_pairs.append(int(self.accelerator.gather(pairs).sum()))
        return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        # TRL's log names its metrics `rewards/margins` in training and `eval_rewards/margins` in
        # evaluation, and averages evaluation batches alike whatever they hold.
        mode = "train" if self.model.training else "eval"
        collected, pairs = dict(self._metrics[mode]), self._eval_pairs
        self._metrics[mode].clear()
        self._eval_pairs = []
        if mode == "eval":
            collected.pop("num_tokens", None)  # the training token count, not the evaluation's
        for key, values in collected.items():
            weights = pairs if mode == "eval" and len(pairs) == len(values) else [1] * len(values)
            logs[f"{mode}/{key}"] = sum(w * v for w, v in zip(weights, values, strict=True)) / sum(weights)
        Trainer.log(self, logs, start_time)


def dpo_rows(dataset, tokenizer, end_of_turn: int):
    """Preference rows from `load_recipe_data` -> TRL's tokenised columns: `prompt_ids` (the prompt
    rendered with the generation header, as the policy is asked), `chosen_ids` and `rejected_ids`
    (the rest of each rendered conversation, cut after its last end-of-turn token)."""

    def split(row):
        prompt = encode(tokenizer, render(tokenizer, row["prompt"], True))
        out = {"prompt_ids": prompt}
        for side in ("chosen", "rejected"):
            ids = row[f"{side}_input_ids"]
            if ids[: len(prompt)] != prompt:
                raise DataError(
                    "the chat template does not render a prompt with its generation header as a prefix of the "
                    f"whole conversation; DPO needs that to tell the response from the prompt ({side})"
                )
            out[f"{side}_ids"] = trim_to_end_of_turn(ids[len(prompt) :], end_of_turn)
        return out

    return dataset.map(split, remove_columns=dataset.column_names)


def run(config: AlignConfig) -> dict[str, float]:
    dpo = config.dpo  # dpo.* values are checked when the config is composed (align.cli.check_dpo)
    policy_cfg = config.model
    if dpo.policy:
        policy_cfg = dataclasses.replace(config.model, name_or_path=dpo.policy, init="pretrained")
    models.check_tuning_fits(config, policy_cfg, "dpo.policy")
    models.check_lora_targets(policy_cfg, config.peft)
    tokenizer = models.load_tokenizer(policy_cfg)
    data = load_recipe_data(
        config.data.recipe,
        "preference",
        tokenizer,
        seed=config.seed,
        max_length=config.train.max_length,
        on_error=config.data.on_error,
        cache_dir=config.data.cache_dir,
    )
    end_of_turn = end_of_turn_id(tokenizer)
    train = dpo_rows(data.train, tokenizer, end_of_turn)
    held_out = dpo_rows(data.eval, tokenizer, end_of_turn) if data.eval is not None else None
    args = TrlDPOConfig(
        **hf_training_kwargs(config, has_eval=held_out is not None),
        # The recipe dropped every row longer than train.max_length, so TRL's truncation never cuts.
        max_length=config.train.max_length,
        beta=dpo.beta,
        loss_type=[dpo.loss_type],
        label_smoothing=dpo.label_smoothing,
        precompute_ref_log_probs=dpo.precompute_ref_log_probs,
        disable_dropout=config.train.dropout == 0,
        dataset_num_proc=None,
    )
    out = rundir.prepare(config, is_main=args.process_index == 0)
    tracker = Tracker(config, out, is_main=args.process_index == 0)
    preempted = PreemptionCallback(Preemption().install())

    # fp32 weights, the optimizer's master copy: the Trainer computes in bf16 under autocast.
    def load_policy():
        return models.load_causal_lm(policy_cfg, tokenizer, seed=config.seed, dropout=config.train.dropout)

    policy = load_policy()
    lora = None
    if config.peft.enabled:
        if policy_cfg.init == "random":
            save_random_base(policy, out, is_main=args.process_index == 0)  # the adapter's base must reload
        new_tokens = len(tokenizer) > models.load_model_config(policy_cfg).vocab_size
        lora = models.lora_config(config.peft, new_tokens=new_tokens)
    if lora is not None or dpo.precompute_ref_log_probs:
        reference, ref_note = None, "the policy with its adapter off (no copy)" if lora else "log-probs precomputed"
    else:  # ZeRO-3 partitions the policy as it loads, and shards cannot be deep-copied
        reference = load_policy() if config.deepspeed.stage == 3 else copy.deepcopy(policy)
        reference.requires_grad_(False).eval()
        size = sum(p.numel() for p in reference.parameters())
        ref_note = f"a frozen copy of the policy ({size / 1e6:.1f}M parameters)"

    trainer = AlignDPOTrainer(
        model=policy,
        ref_model=reference,
        args=args,
        train_dataset=train,
        eval_dataset=held_out,
        processing_class=tokenizer,
        peft_config=lora,
        callbacks=[TrackerCallback(tracker), NoCheckpointAtTheEnd(), preempted],
        nan_skip_limit=config.train.nan_skip_limit,
    )
    plan.log_plan(config, policy_cfg, trainer.model, tokenizer, is_main=args.process_index == 0)
    if args.process_index == 0:
        log.info("dpo: loss %s, beta %s; reference: %s", dpo.loss_type, dpo.beta, ref_note)
    train_result = trainer.train(resume_from_checkpoint=rundir.resume_checkpoint(config, out))
    if preempted.stopped:
        raise Preempted(f"checkpoint written at step {trainer.state.global_step}; a requeued run resumes there")
    step = trainer.state.global_step
    metrics = {"train/loss": train_result.training_loss, "train/steps": step}
    if held_out is not None:
        # An evaluation at the last step (train.eval_steps dividing it) is not run twice. Either way
        # the tracker callback has logged it; metrics.json gets its values, not its timings.
        evaluations = [h for h in trainer.state.log_history if "eval_loss" in h]
        last = evaluations[-1] if evaluations and evaluations[-1]["step"] == step else trainer.evaluate()
        metrics.update({metric_name(k): v for k, v in last.items() if k.startswith("eval") and k not in _TIMINGS})

    final = save_final(trainer, tokenizer, config, out)
    manifest = build_manifest(
        config,
        out,
        data={"train": recipe_entry(config.data.recipe, data.fingerprint)},
        parents=[parent_entry("policy", policy_cfg.name_or_path if policy_cfg.init == "pretrained" else None)],
        metrics=metrics,
    )
    tracker.finish(metrics, manifest=manifest)
    if tracker.is_main:
        save_manifest(manifest, out)
    log.info("dpo: final policy in %s", final)
    return metrics
