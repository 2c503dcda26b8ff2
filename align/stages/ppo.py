"""PPO RLHF (Qwen report, section 3.2.2), our own loop on accelerate and DeepSpeed.

The recipe: load the four roles (policy, reference, reward, value; placed on one process, data
parallel or DeepSpeed ZeRO-2/3 by align/rl/placement.py), then each step
  1. sample `responses_per_prompt` responses to a batch of prompts (top-p, stop at EOS);
  2. score them (reward model at the last real token and/or a reward function), normalise;
  3. per-token KL penalty against the reference, GAE advantages, whitened; or, critic-free
     (`ppo.advantage`: GRPO, Dr. GRPO, RLOO, REINFORCE++), advantages from the rewards alone,
     with no value model, and the KL in the reward or in the loss (`ppo.kl_in`);
  4. `ppo.epochs` passes of clipped policy and value losses over mini-batches (only the value
     model learns during the first `value_warmup_steps`), plus the optional PTX loss;
  5. log, and checkpoint everything a resumed run needs.
The maths lives in align/rl/ as pure functions with unit tests.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import DeepSpeedPlugin, set_seed
from tqdm.auto import tqdm
from transformers import AutoModelForSequenceClassification, get_scheduler

from align.config import AlignConfig
from align.data import load_recipe_data
from align.data.formats import other_column_names
from align.errors import CheckpointError, ConfigError, Preempted, TrainingError
from align.modeling import models
from align.modeling.chat import stop_token_ids
from align.modeling.reward_model import episode_rewards, own_tokenizer
from align.modeling.rows import Rows, can_pack, enable_packing, make_rows
from align.rl import checkpoint
from align.rl.advantages import (
    CRITIC_FREE,
    GROUP_ESTIMATORS,
    critic_free_advantages,
    gae,
    uniform_groups,
    whiten_advantages,
)
from align.rl.forward import ValueModel, disable_dropout, response_logprobs
from align.rl.kl import AdaptiveKLController, FixedKLController, kl_k3, kl_penalty, mean_kl_over_ranks
from align.rl.losses import LOSS_AGGREGATIONS, aggregate, explained_variance, policy_loss, value_loss
from align.rl.masked import masked_mean
from align.rl.normalize import RunningMoments
from align.rl.placement import Placement, TrainedModel
from align.rl.reward_fns import Episodes, import_reward_fn
from align.rl.rewards import per_token_rewards, shaped_scores
from align.rl.rollout import Rollout, rollout_episodes, sample
from align.rl.vllm_engine import VLLMEngine, check_available, logp_gap, request_seeds
from align.run import plan, rundir
from align.run.distributed import build_deepspeed_config, world_info
from align.run.lineage import build_manifest, parent_entry, recipe_entry, save_manifest
from align.run.nonfinite import KEPT, NonFiniteBudget
from align.run.preemption import Preemption
from align.run.tracking import Tracker

log = logging.getLogger("align.rl")


def run(config: AlignConfig) -> dict[str, float]:
    ppo = config.ppo
    check_config(config)
    reward_fn = import_reward_fn(ppo.reward_fn, "ppo.reward_fn") if ppo.reward_fn else None
    monitor_fn = import_reward_fn(ppo.monitor_fn, "ppo.monitor_fn") if ppo.monitor_fn else None
    policy_cfg = replace(config.model, name_or_path=ppo.policy, init="pretrained") if ppo.policy else config.model
    models.check_tuning_fits(config, policy_cfg, "ppo.policy")
    models.check_lora_targets(policy_cfg, config.peft)

    ds_config = deepspeed_config(config)
    # Accelerate holds the DeepSpeed config (precision, the process state), but PPO trains two
    # models, so align.rl.placement builds their engines itself.
    accelerator = Accelerator(deepspeed_plugin=DeepSpeedPlugin(hf_ds_config=ds_config) if ds_config else None)
    set_seed(config.seed, device_specific=True)
    out = rundir.prepare(config, is_main=accelerator.is_main_process)
    tracker = Tracker(config, out, is_main=accelerator.is_main_process)

    tokenizer = models.load_tokenizer(policy_cfg)
    reward_tokenizer = own_tokenizer(ppo.reward_model, tokenizer) if ppo.reward_model else None
    if reward_tokenizer is not None:
        if ppo.advantage == "gae" and ppo.value_init == "reward_model":
            raise ConfigError(
                f"ppo.reward_model '{ppo.reward_model}' has another tokenizer than the policy, so a value model "
                "initialised from it could not read the policy's tokens; set ppo.value_init=policy"
            )
        log.info("ppo.reward_model has its own tokenizer: each response is rendered again with its chat template")
    prompt_data = load_recipe_data(
        config.data.recipe,
        "prompt",
        tokenizer,
        seed=config.seed,
        # Prompt + response fit in train.max_length; longer prompts are dropped and counted in the data report.
        max_length=config.train.max_length - ppo.max_new_tokens,
        on_error=config.data.on_error,
        cache_dir=config.data.cache_dir,
    )
    prompts = prompt_data.train
    stop_ids = stop_token_ids(tokenizer)
    for fn in (reward_fn, monitor_fn):
        if fn is not None and fn.required_columns:
            fn.check_columns(other_column_names(prompts), f"data.recipe={config.data.recipe}")
    sampler = PromptSampler(len(prompts), ppo.prompts_per_step, accelerator, seed=config.seed)

    # The four roles, on one process, data parallel or DeepSpeed ZeRO (models load into shards under
    # ZeRO-3). Dropout off everywhere: rollout and update must agree on log-probs.
    precision = models.resolve_precision(config.train.precision)
    sampling = models.sampling_precision(precision, accelerator.device)
    placement = Placement(accelerator, ds_config, precision)

    def load_policy():
        return models.load_causal_lm(policy_cfg, tokenizer, seed=config.seed)

    policy_model = load_policy()
    reference = None if config.peft.enabled else placement.copy_for_reference(policy_model, load_policy)
    if config.peft.enabled:
        policy_model = models.apply_lora(policy_model, config.peft, new_tokens=False)
    plan.log_plan(config, policy_cfg, policy_model, tokenizer, is_main=accelerator.is_main_process)
    reward_model = load_frozen_reward_model(ppo.reward_model, config) if ppo.reward_model else None
    # A critic-free estimator needs no value model: none is built, loaded or trained.
    critic_free = ppo.advantage in CRITIC_FREE
    value_model = None if critic_free else ValueModel(load_value_backbone(config, policy_cfg, tokenizer))
    for model in (policy_model, reference, reward_model, value_model):
        if model is not None:
            disable_dropout(model)
    packed = use_packed_rows(ppo.packing, [policy_model, reference, reward_model, value_model])
    if config.train.gradient_checkpointing:
        policy_model.gradient_checkpointing_enable()

    steps = config.train.max_steps
    # The policy is frozen while the critic warms up: its schedule spans the steps it trains.
    warmup = 0 if critic_free else ppo.value_warmup_steps
    policy_steps = max(steps - warmup, 1)
    policy = placement.trained(policy_model, *make_optimizer(policy_model, config.train.lr, config, policy_steps))
    value = None
    if value_model is not None:
        value = placement.trained(value_model, *make_optimizer(value_model, ppo.value_lr, config, steps))
    reference, reward_model = placement.frozen(reference), placement.frozen(reward_model)

    engine = make_engine(config, policy, accelerator, sampling) if config.rollout.engine == "vllm" else None

    kl_ctl = (
        AdaptiveKLController(ppo.kl_coef, ppo.kl_target, ppo.kl_horizon)
        if ppo.adaptive_kl
        else FixedKLController(ppo.kl_coef)
    )
    moments = RunningMoments()
    ptx_batches = PTXBatches(config, tokenizer, accelerator) if ppo.ptx_coef > 0 else None
    state = TrainState(policy, value, kl_ctl, moments, sampler, ptx_batches)

    start_step = 0
    resume_from = rundir.resume_checkpoint(config, out)
    if resume_from is not None:
        start_step = restore(resume_from, accelerator, state)
        log.info("resumed from %s at step %d", resume_from, start_step)

    nonfinite = NonFiniteBudget(config.train.nan_skip_limit, unit="updates")
    preemption = Preemption().install()
    history: list[dict[str, float]] = []
    unscored_seen = False
    bar = tqdm(
        range(start_step, steps),
        desc="ppo",
        disable=not accelerator.is_main_process,
        initial=start_step,
        total=steps,
    )
    how = dict(
        pad_id=tokenizer.pad_token_id,
        eos_ids=stop_ids,
        max_new_tokens=ppo.max_new_tokens,
        temperature=ppo.temperature,
        top_p=ppo.top_p,
        device=accelerator.device,
    )
    for step in bar:
        t0 = time.perf_counter()
        batch = [prompts[i] for i in sampler.next_indices()]
        prompt_ids = [row["prompt_input_ids"] for row in batch for _ in range(ppo.responses_per_prompt)]

        # 1. Rollout (under ZeRO-3 the policy is gathered once for the whole batch), or vLLM's.
        engine_logp = None
        if engine is None:
            with policy.for_generation() as whole_policy, models.autocast(sampling, accelerator.device):
                rollout = sample(whole_policy, prompt_ids, **how)
        else:
            seeds = request_seeds(config.seed, step, accelerator.process_index, len(prompt_ids))
            rollout, engine_logp = engine.sample(prompt_ids, policy.checkpoint_weights, seeds=seeds, **how)
        t_generate = time.perf_counter()

        # 2-3. Score, KL penalty, advantages. The critic warms up alone first (Qwen: 50 steps).
        train_policy = step >= warmup
        episodes = rollout_episodes(tokenizer, rollout, [row for row in batch for _ in range(ppo.responses_per_prompt)])
        rows = make_rows(rollout.input_ids, rollout.attention_mask, rollout.prompt_len, packed=packed)
        first_forward = score_forward(policy, value, rows, ppo.temperature, config, train_policy)
        old_logp = first_forward.logp.detach()
        old_values = first_forward.values.detach() if value is not None else None
        with torch.no_grad(), models.autocast(precision, accelerator.device):
            ref_logp = reference_logprobs(reference, policy, rows, ppo.temperature)
            scores, score_parts, scored = score_rollout(reward_model, reward_tokenizer, reward_fn, rows, episodes)
        if ppo.reward_norm:
            moments.update(scores[scored])  # every rank, even with nothing scored: the statistics are global
        norm_scores = shaped_scores(
            scores,
            rollout.ended_with_eos,
            moments if ppo.reward_norm else None,
            use_std=ppo.reward_norm_std,
            missing_eos_penalty=ppo.missing_eos_penalty,
            clip=ppo.reward_clip,
        )
        mask = rollout.response_mask
        kl = kl_penalty(old_logp, ref_logp, ppo.kl_estimator) * mask
        kl_coef_in_reward = kl_ctl.value if ppo.kl_in == "reward" else 0.0
        rewards = per_token_rewards(torch.where(scored, norm_scores, 0.0), kl, mask, kl_coef_in_reward)
        # An episode no reward scored (a reward function's None) has no advantage and no value
        # target: it is left out of the update, as TRL leaves out what a reward function skips.
        trained = mask * scored[:, None]
        group = ppo.responses_per_prompt
        uniform = uniform_groups(norm_scores, scored, group) if group > 1 else None
        if ppo.skip_uniform_groups and uniform is not None:
            trained = trained * (~uniform).repeat_interleave(group)[:, None]
        if ppo.overlong_filter:
            trained = trained * rollout.ended_with_eos[:, None]
        if critic_free:
            advantages = critic_free_advantages(ppo.advantage, rewards, trained, scored, group, ppo.gamma)
            returns = None
        else:
            advantages, returns = gae(rewards, old_values, trained, ppo.gamma, ppo.lam)
            advantages = whiten_advantages(advantages, trained)
        t_score = time.perf_counter()

        # 4. PPO epochs over mini-batches.
        stats = update(
            config,
            policy,
            value,
            replace(rollout, response_mask=trained),
            old_logp,
            old_values,
            ref_logp if ppo.kl_in == "loss" else None,
            kl_ctl.value,
            advantages,
            returns,
            train_policy,
            ptx_batches,
            first_forward if first_forward.keeps_graph else None,
            partial(nonfinite.dropped, step=step + 1),
            packed,
        )
        policy_lr = policy.scheduler.get_last_lr()[0]  # the rate this step's policy update used
        if train_policy:  # frozen during the critic warm-up: its schedule starts when it trains
            policy.scheduler.step()
            if engine is not None:
                engine.stale()
        if value is not None:
            value.scheduler.step()
        # One controller on every rank: it is given the KL of all ranks' episodes (a collective).
        seq_kl, episodes_in_step = mean_kl_over_ranks(kl.sum(-1))
        kl_ctl.update(seq_kl, episodes_in_step)
        t_update = time.perf_counter()

        # 5. Log and checkpoint.
        metrics = {
            "ppo/reward_raw": masked_mean(scores, scored).item(),
            "ppo/reward_norm": masked_mean(norm_scores, scored).item(),
            **{f"ppo/reward_{name}": masked_mean(part, has).item() for name, (part, has) in score_parts.items()},
            "ppo/unscored": 1.0 - scored.float().mean().item(),
            **({"ppo/gold": monitor_fn.mean(episodes)} if monitor_fn else {}),
            "ppo/kl": seq_kl,
            "ppo/kl_k3": (kl_penalty(old_logp, ref_logp, "k3") * mask).sum(-1).mean().item(),
            "ppo/kl_coef": kl_ctl.value,
            "ppo/response_length": mask.sum(-1).mean().item(),
            "ppo/eos_rate": rollout.ended_with_eos.float().mean().item(),
            "ppo/advantage_mean": masked_mean(advantages, trained).item(),
            **({"ppo/uniform_groups": uniform.float().mean().item()} if uniform is not None else {}),
            **(
                {}
                if value is None
                else {"ppo/explained_variance": explained_variance(old_values, returns, trained).item()}
            ),
            "ppo/policy_trained": float(train_policy),
            "ppo/lr": policy_lr,
            **(logp_gap(engine_logp, old_logp, mask) if engine_logp is not None else {}),
            **stats,
            "time/generate": t_generate - t0,
            "time/score": t_score - t_generate,
            "time/update": t_update - t_score,
            "perf/episodes_per_s": len(prompt_ids) * accelerator.num_processes / (t_update - t0),
        }
        metrics = gather_mean(metrics, accelerator)
        check_finite(metrics, step + 1)
        check_scored(metrics, step + 1, reward_fn, unscored_seen)
        unscored_seen = unscored_seen or metrics["ppo/unscored"] > 0
        history.append(metrics)
        tracker.log(metrics, step=step + 1)
        bar.set_postfix(reward=f"{metrics['ppo/reward_raw']:.3f}", kl=f"{metrics['ppo/kl']:.3f}")
        if ppo.sample_every and (step + 1) % ppo.sample_every == 0:
            texts = zip(episodes.prompt_texts, episodes.responses, scores.tolist(), scored.tolist(), strict=True)
            rows = [[p, r, s if has else None] for p, r, s, has in texts]
            tracker.log_table("ppo/samples", ["prompt", "response", "reward"], rows[:16], step=step + 1)
        preempted = preemption.agreed()
        periodic = config.train.save_steps and (step + 1) % config.train.save_steps == 0 and step + 1 < steps
        if periodic or preempted:
            save_checkpoint(out, step + 1, config, accelerator, state)
        if preempted:
            raise Preempted(f"checkpoint written at step {step + 1}; a requeued run resumes there")

    final_metrics = summarize(history)
    save_final(out, config, accelerator, policy, value, tokenizer)
    manifest = build_manifest(
        config,
        out,
        data={"prompts": recipe_entry(config.data.recipe, prompt_data.fingerprint)},
        parents=[parent_entry("policy", ppo.policy), parent_entry("reward_model", ppo.reward_model)],
        metrics=final_metrics,
    )
    tracker.finish(final_metrics, manifest=manifest)  # logs the manifest to W&B, then closes the run
    if accelerator.is_main_process:
        save_manifest(manifest, out)  # last: manifest.json marks the stage complete
    return final_metrics


# PPO samples from the policy, so a temperature of 0 (greedy) has no log-probs to train on.
_RANGES = [
    ("temperature", lambda v: v > 0, "above 0 (1.0 samples the policy as it is)"),
    ("top_p", lambda v: 0 < v <= 1, "in (0, 1]"),
    *(
        (key, lambda v: v >= 1, "at least 1")
        for key in ("prompts_per_step", "responses_per_prompt", "max_new_tokens", "epochs")
    ),
    *((key, lambda v: 0 <= v <= 1, "in [0, 1]") for key in ("gamma", "lam")),
    *(
        (key, lambda v: v > 0, "above 0")
        for key in ("clip_eps", "clip_eps_high", "value_clip", "value_lr", "reward_clip", "kl_target", "kl_horizon")
    ),
    *(
        (key, lambda v: v >= 0, "0 or more")
        for key in ("kl_coef", "ptx_coef", "value_warmup_steps", "sample_every", "missing_eos_penalty")
    ),
]


def check_config(config: AlignConfig) -> None:
    ppo = config.ppo
    if not ppo.reward_model and not ppo.reward_fn:
        raise ConfigError("stage=ppo needs ppo.reward_model=<rm dir> or ppo.reward_fn=module:function (or both)")
    if ppo.value_init not in ("reward_model", "policy"):
        raise ConfigError(f"ppo.value_init must be reward_model or policy, not '{ppo.value_init}'")
    if models.resolve_precision(config.train.precision) == "fp16" and config.deepspeed.stage == 0:
        raise ConfigError(
            "PPO in fp16 needs loss scaling, which align leaves to DeepSpeed: use train.precision=bf16 (or "
            "deepspeed=zero2/zero3)"
        )
    if ppo.kl_estimator not in ("k1", "k3"):
        raise ConfigError(f"ppo.kl_estimator must be k1 or k3, not '{ppo.kl_estimator}'")
    choices_of = {"advantage": ("gae", *CRITIC_FREE), "kl_in": ("reward", "loss"), "loss_agg": LOSS_AGGREGATIONS}
    for key, choices in choices_of.items():
        if getattr(ppo, key) not in choices:
            raise ConfigError(f"ppo.{key} must be one of {', '.join(choices)}, not '{getattr(ppo, key)}'")
    if ppo.advantage in GROUP_ESTIMATORS and ppo.responses_per_prompt < 2:
        raise ConfigError(
            f"ppo.advantage={ppo.advantage} compares the responses to one prompt: ppo.responses_per_prompt must be "
            f"at least 2, not {ppo.responses_per_prompt}"
        )
    for key, ok, rule in _RANGES:
        value = getattr(ppo, key)
        if value is not None and not ok(value):
            raise ConfigError(f"ppo.{key} must be {rule}, not {value}")
    episodes = ppo.prompts_per_step * ppo.responses_per_prompt
    mini = episodes // max(ppo.mini_batches, 1)
    if ppo.mini_batches < 1 or episodes % ppo.mini_batches or mini % config.train.batch_size:
        raise ConfigError(
            f"a rollout of {episodes} episodes (ppo.prompts_per_step x ppo.responses_per_prompt) must split into "
            f"ppo.mini_batches={ppo.mini_batches} mini-batches of whole train.batch_size={config.train.batch_size} "
            "micro-batches"
        )
    if ppo.ptx_coef > 0 and not ppo.ptx_data:
        raise ConfigError("ppo.ptx_coef > 0 needs ppo.ptx_data=<sft recipe>")
    rollout = config.rollout
    if rollout.engine not in ("hf", "vllm"):
        raise ConfigError(f"rollout.engine must be hf or vllm, not '{rollout.engine}'")
    if not 0 < rollout.gpu_memory_utilization <= 1:
        raise ConfigError(f"rollout.gpu_memory_utilization must be in (0, 1], not {rollout.gpu_memory_utilization}")
    if rollout.tensor_parallel_size < 1:
        raise ConfigError(f"rollout.tensor_parallel_size must be at least 1, not {rollout.tensor_parallel_size}")
    if rollout.kv_cache_gb is not None and rollout.kv_cache_gb <= 0:
        raise ConfigError(f"rollout.kv_cache_gb must be above 0, not {rollout.kv_cache_gb}")
    if rollout.engine == "vllm":
        check_available()
    world, tp = world_info()[1], rollout.tensor_parallel_size
    if tp > 1 and rollout.engine != "vllm":
        raise ConfigError(f"rollout.tensor_parallel_size={tp} shards a vLLM engine: it needs rollout.engine=vllm")
    if world % tp:
        raise ConfigError(f"rollout.tensor_parallel_size={tp} does not divide the {world} ranks")
    if ppo.max_new_tokens >= config.train.max_length:
        raise ConfigError(
            f"ppo.max_new_tokens={ppo.max_new_tokens} leaves no room for a prompt in "
            f"train.max_length={config.train.max_length} (an episode is prompt + response)"
        )


def make_engine(config: AlignConfig, policy: TrainedModel, accelerator: Accelerator, precision: str) -> VLLMEngine:
    """The vLLM rollout engine of this rank, for the policy's architecture and vocabulary."""
    import vllm

    dtype = {"bf16": "bfloat16", "fp16": "float16"}.get(precision, "float32")
    engine = VLLMEngine(
        models.unwrap_model(policy.module).config,
        cfg=config.rollout,
        dtype=dtype,
        max_model_len=config.train.max_length,
        temperature=config.ppo.temperature,
        device=accelerator.device,
        rank=accelerator.process_index,
        local_rank=accelerator.local_process_index,
        world_size=accelerator.num_processes,
    )
    log.info(
        "rollout: vLLM %s in this process (%s, log-probs %s, tensor parallel %d)",
        vllm.__version__,
        dtype,
        engine.logprobs_mode,
        engine.tensor_parallel_size,
    )
    return engine


def deepspeed_config(config: AlignConfig) -> dict[str, Any] | None:
    """One engine per trained model steps once per mini-batch of `train.batch_size` micro-batches."""
    ppo, train = config.ppo, config.train
    episodes = ppo.prompts_per_step * ppo.responses_per_prompt
    return build_deepspeed_config(
        config.deepspeed.stage,
        config.deepspeed.offload_optimizer,
        config.deepspeed.offload_param,
        precision=models.resolve_precision(train.precision),
        grad_clip=train.max_grad_norm,
        micro_batch=train.batch_size,
        grad_accum=episodes // ppo.mini_batches // train.batch_size,
        world_size=world_info()[1],
    )


def load_frozen_reward_model(path: str, config: AlignConfig) -> torch.nn.Module:
    from align.modeling.reward_model import load_reward_model

    return load_reward_model(path, precision=config.train.precision).requires_grad_(False).eval()


def load_value_backbone(config: AlignConfig, policy_cfg, tokenizer) -> torch.nn.Module:
    """The value model starts from the reward model (Qwen, InstructGPT) or from the policy."""
    ppo = config.ppo
    source = ppo.reward_model if ppo.value_init == "reward_model" and ppo.reward_model else None
    if source is None:
        source = policy_cfg.name_or_path
    if policy_cfg.init == "random" and source == policy_cfg.name_or_path:
        # A tiny random policy has no weights on disk: build the value model from its config alike.
        mcfg = models.load_model_config(policy_cfg)
        mcfg.num_labels = 1
        mcfg.pad_token_id = tokenizer.pad_token_id
        torch.manual_seed(config.seed)
        return AutoModelForSequenceClassification.from_config(mcfg)
    return AutoModelForSequenceClassification.from_pretrained(
        source,
        num_labels=1,
        use_safetensors=True,
        trust_remote_code=policy_cfg.trust_remote_code,
        dtype=torch.float32,  # trained: the optimizer's master copy, computed in bf16 under autocast
        pad_token_id=tokenizer.pad_token_id,
    )


def make_optimizer(model: torch.nn.Module, lr: float, config: AlignConfig, steps: int):
    train = config.train
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(
        params,
        lr=lr,
        betas=(train.adam_beta1, train.adam_beta2),
        eps=train.adam_eps,
        weight_decay=train.weight_decay,
        # One kernel over all tensors: on a CPU, 5x faster than the default for a 20M model.
        fused=True,
    )
    warmup = train.warmup_steps or math.ceil(train.warmup_ratio * steps)
    return opt, get_scheduler(train.lr_scheduler, opt, num_warmup_steps=warmup, num_training_steps=steps)


@dataclass
class Forward:
    """The rollout's policy log-probs (and entropies) and values, with their graphs when kept."""

    logp: torch.Tensor
    entropy: torch.Tensor | None
    values: torch.Tensor | None  # None without a value model
    keeps_graph: bool


def use_packed_rows(wanted: bool, roles: list[torch.nn.Module | None]) -> bool:
    """Packed rows (align/modeling/rows.py) for every forward after sampling, when asked and every role's
    attention can run them; the attention of each is switched here, before any wrapper."""
    if not wanted:
        return False
    hf_models = [m.hf_model if isinstance(m, ValueModel) else models.unwrap_model(m) for m in roles if m is not None]
    refused = sorted({f"{type(m).__name__} ({m.config._attn_implementation})" for m in hf_models if not can_pack(m)})
    if refused:
        log.info("ppo.packing: padded rows; packing needs SDPA and full attention, not %s", ", ".join(refused))
        return False
    for model in hf_models:
        enable_packing(model)
    return True


def score_forward(
    policy: TrainedModel, value: TrainedModel | None, rows: Rows, temperature: float, config: AlignConfig, train: bool
) -> Forward:
    """Old log-probs and values. When a rollout is a single micro-batch, the update's first forward
    would repeat this one with the same weights on the same tokens, so the graph is kept for it
    (two forwards fewer per step; the price is holding both graphs while the rest is scored)."""
    episodes = config.ppo.prompts_per_step * config.ppo.responses_per_prompt
    keep = config.ppo.mini_batches == 1 and episodes == config.train.batch_size
    with torch.set_grad_enabled(keep):
        values = value(rows) if value is not None else None
    with torch.set_grad_enabled(keep and train):
        logp, entropy = response_logprobs(policy, rows, temperature, with_entropy=keep)
    return Forward(logp, entropy, values, keeps_graph=keep)


def reference_logprobs(reference, policy, rows: Rows, temperature: float) -> torch.Tensor:
    if reference is not None:
        return response_logprobs(reference, rows, temperature)[0]
    # LoRA: the reference is the same base with the adapter switched off (one copy in memory).
    with policy.module.disable_adapter():
        return response_logprobs(policy, rows, temperature)[0]


def score_rollout(reward_model, reward_tokenizer, reward_fn, rows: Rows, episodes: Episodes):
    """Sum of the reward model's score (at the last real token) and the reward function's, which
    may give None for a response (no score). As in TRL an episode counts as scored when any part
    scored it; returns the scores, each part with where it scored, and the scored episodes."""
    parts: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    device = rows.input_ids.device
    if reward_model is not None:
        e = episodes
        score = episode_rewards(reward_model, reward_tokenizer, rows, e.prompts, e.responses, e.ended)
        parts["model"] = (score, torch.ones_like(score, dtype=torch.bool))
    if reward_fn is not None:
        values = reward_fn(episodes)
        given = torch.tensor([v is not None for v in values], device=device)
        parts["fn"] = (torch.tensor([0.0 if v is None else v for v in values], device=device), given)
    total = sum(torch.where(has, part, 0.0) for part, has in parts.values())
    scored = torch.stack([has for _, has in parts.values()]).any(dim=0)
    return total, parts, scored


def update(
    config: AlignConfig,
    policy: TrainedModel,
    value: TrainedModel | None,
    rollout: Rollout,
    old_logp: torch.Tensor,
    old_values: torch.Tensor | None,
    ref_logp: torch.Tensor | None,
    kl_coef: float,
    advantages: torch.Tensor,
    returns: torch.Tensor | None,
    train_policy: bool,
    ptx_batches,
    first_forward: Forward | None,
    on_nonfinite: Callable[[str], None],
    packed: bool,
) -> dict[str, float]:
    """`ppo.epochs` passes over the rollout in mini-batches; the first epoch reuses `first_forward`
    (the whole rollout as one micro-batch, scored with these weights) when given. Without a value
    model (`value` None) only the policy trains; with `ref_logp` the policy loss carries the k3 KL
    to the reference times `kl_coef` (GRPO's way). A mini-batch whose loss or gradient is not
    finite is not applied, and `on_nonfinite` says which."""
    ppo, train = config.ppo, config.train
    n = rollout.input_ids.shape[0]
    mini_size = n // ppo.mini_batches
    accum = mini_size // train.batch_size
    sums: dict[str, float] = {}
    count = 0
    for epoch in range(ppo.epochs):
        reuse = epoch == 0 and first_forward is not None
        order = torch.arange(n) if reuse else torch.randperm(n)
        for m in range(ppo.mini_batches):
            mini = order[m * mini_size : (m + 1) * mini_size]
            finite = {"value": True, "policy": True}
            for k in range(accum):
                idx = mini[k * train.batch_size : (k + 1) * train.batch_size].to(rollout.input_ids.device)
                mask = rollout.response_mask[idx]
                rows = make_rows(rollout.input_ids[idx], rollout.attention_mask[idx], rollout.prompt_len, packed=packed)
                stats = {}
                if value is not None:
                    values = first_forward.values if reuse else value(rows)
                    v_loss, v_stats = value_loss(values, old_values[idx], returns[idx], mask, ppo.value_clip)
                    finite["value"] &= bool(torch.isfinite(v_loss))
                    value.backward(v_loss, accum)
                    stats.update({"ppo/value_loss": v_loss.item(), "ppo/vf_clipfrac": v_stats["vf_clipfrac"].item()})
                if train_policy:
                    logp, entropy = (
                        (first_forward.logp, first_forward.entropy)
                        if reuse
                        else response_logprobs(policy, rows, ppo.temperature, with_entropy=True)
                    )
                    p_loss, p_stats = policy_loss(
                        logp,
                        old_logp[idx],
                        advantages[idx],
                        mask,
                        ppo.clip_eps,
                        ppo.clip_eps_high,
                        ppo.loss_agg,
                        ppo.max_new_tokens,
                    )
                    loss = p_loss
                    if ref_logp is not None:
                        kl_loss = aggregate(kl_k3(logp, ref_logp[idx]), mask, ppo.loss_agg, ppo.max_new_tokens)
                        loss = loss + kl_coef * kl_loss
                        stats["ppo/kl_loss"] = kl_loss.item()
                    if ptx_batches is not None:
                        ptx_loss = ptx_lm_loss(policy, next(ptx_batches))
                        loss = loss + ppo.ptx_coef * ptx_loss
                        stats["ppo/ptx_loss"] = ptx_loss.item()
                    finite["policy"] &= bool(torch.isfinite(loss))
                    policy.backward(loss, accum)
                    stats.update(
                        {
                            "ppo/policy_loss": p_loss.item(),
                            "ppo/clipfrac": p_stats["clipfrac"].item(),
                            "ppo/approx_kl": p_stats["approx_kl"].item(),
                            "ppo/ratio": p_stats["ratio_mean"].item(),
                            "ppo/entropy": masked_mean(entropy, mask).item(),
                        }
                    )
                for key, val in stats.items():
                    sums[key] = sums.get(key, 0.0) + val
                count += 1
            grad_norms = {}
            if value is not None:
                grad_norms["ppo/value_grad_norm"] = value.finish_mini_batch(train.max_grad_norm, finite["value"])
            if train_policy:
                grad_norms["ppo/policy_grad_norm"] = policy.finish_mini_batch(train.max_grad_norm, finite["policy"])
            for role in ("value", "policy"):
                norm = grad_norms.get(f"ppo/{role}_grad_norm", 0.0)
                if not math.isfinite(norm):
                    on_nonfinite(f"{role} loss" if not finite[role] else f"{role} gradient")
            for key, val in grad_norms.items():
                sums[key] = sums.get(key, 0.0) + val * accum
    return {key: val / count for key, val in sums.items()}


class PTXBatches:
    """Endless micro-batches of SFT data for the pretraining-gradient (PTX) loss: shuffled passes
    sharded by rank, drawn by a PromptSampler over the rows, so that the position checkpoints and a
    resumed run goes on with the batches it would have drawn."""

    def __init__(self, config: AlignConfig, tokenizer, accelerator: Accelerator) -> None:
        self.data = load_recipe_data(
            config.ppo.ptx_data,
            "sft",
            tokenizer,
            seed=config.seed,
            max_length=config.train.max_length,
            cache_dir=config.data.cache_dir,
        ).train
        world = accelerator.num_processes
        if len(self.data) < world:
            raise ConfigError(f"ppo.ptx_data={config.ppo.ptx_data} has {len(self.data)} rows, fewer than {world} ranks")
        per_rank = min(config.train.batch_size, len(self.data) // world)
        self.sampler = PromptSampler(len(self.data), per_rank, accelerator, seed=config.seed)
        self.pad_id, self.device = tokenizer.pad_token_id, accelerator.device

    def __iter__(self) -> PTXBatches:
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        rows = [self.data[i] for i in self.sampler.next_indices()]
        return collate_lm(rows, self.pad_id, self.device)

    def state_dict(self) -> dict[str, int]:
        return self.sampler.state_dict()

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.sampler.load_state_dict(state)


def collate_lm(rows: list[dict], pad_id: int, device) -> dict[str, torch.Tensor]:
    width = max(len(r["input_ids"]) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), -100, dtype=torch.long)
    att = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        n = len(r["input_ids"])
        ids[i, :n] = torch.tensor(r["input_ids"])
        att[i, :n] = 1
        labels[i, :n] = torch.where(torch.tensor(r["assistant_masks"]).bool(), ids[i, :n], -100)
    return {"input_ids": ids.to(device), "attention_mask": att.to(device), "labels": labels.to(device)}


def ptx_lm_loss(policy, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    return policy(**batch, use_cache=False).loss


def gather_mean(metrics: dict[str, float], accelerator: Accelerator) -> dict[str, float]:
    """Average each metric over ranks, so the dashboard shows the whole world's step."""
    if accelerator.num_processes == 1:
        return metrics
    keys = sorted(metrics)
    values = torch.tensor([metrics[k] for k in keys], device=accelerator.device, dtype=torch.float64)
    values = accelerator.reduce(values, reduction="mean")
    return dict(zip(keys, values.tolist(), strict=True))


def check_scored(metrics: dict[str, float], step: int, reward_fn, warned: bool) -> None:
    """Some episodes without a score are a dataset's unparseable rows; none scored at all is a bug."""
    unscored = metrics["ppo/unscored"]
    if unscored >= 1.0:
        raise TrainingError(
            f"{reward_fn.key} returned None for every response of step {step}: nothing to train on; {KEPT}"
        )
    if unscored > 0 and not warned:
        log.warning(
            "%s returned None for %.0f%% of the responses of step %d: those episodes are left out of the update "
            "(ppo/unscored logs the share each step)",
            reward_fn.key,
            100 * unscored,
            step,
        )


def check_finite(metrics: dict[str, float], step: int) -> None:
    """A rollout that scored NaN cannot be trained on or skipped past: stop (losses and gradients
    are guarded in `update`, before any update is applied)."""
    bad = [k for k in ("ppo/reward_raw", "ppo/kl") if k in metrics and not math.isfinite(metrics[k])]
    if bad:
        raise TrainingError(f"non-finite {', '.join(bad)} at step {step}; {KEPT}")


def summarize(history: list[dict[str, float]]) -> dict[str, float]:
    """Final metrics: the last step's values, plus reward at the start and end (mean of 10%)."""
    if not history:
        return {}
    window = max(1, len(history) // 10)
    first = sum(h["ppo/reward_raw"] for h in history[:window]) / window
    last = sum(h["ppo/reward_raw"] for h in history[-window:]) / window
    return {**history[-1], "ppo/reward_start": first, "ppo/reward_end": last, "ppo/steps": len(history)}


class PromptSampler:
    """Shuffled passes over the prompts (or the PTX data's rows), sharded by rank, with a position that
    checkpoints."""

    def __init__(self, size: int, per_rank: int, accelerator: Accelerator, seed: int) -> None:
        if size < per_rank * accelerator.num_processes:
            raise ConfigError(
                f"the prompt set has {size} rows, fewer than one step needs "
                f"(ppo.prompts_per_step={per_rank} x {accelerator.num_processes} ranks)"
            )
        self.size, self.per_rank, self.seed = size, per_rank, seed
        self.rank, self.world = accelerator.process_index, accelerator.num_processes
        self.epoch, self.offset = 0, 0

    def next_indices(self) -> list[int]:
        step_size = self.per_rank * self.world
        if self.offset + step_size > self.size:
            self.epoch, self.offset = self.epoch + 1, 0
        order = torch.randperm(self.size, generator=torch.Generator().manual_seed(self.seed + self.epoch))
        start = self.offset + self.rank * self.per_rank
        self.offset += step_size
        return order[start : start + self.per_rank].tolist()

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "offset": self.offset}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.offset = state["epoch"], state["offset"]


@dataclass
class TrainState:
    """Everything that changes while PPO trains, and so everything a checkpoint must hold."""

    policy: TrainedModel
    value: TrainedModel | None  # None with a critic-free estimator
    kl_ctl: FixedKLController | AdaptiveKLController
    moments: RunningMoments
    sampler: PromptSampler
    ptx: PTXBatches | None


def save_checkpoint(out: Path, step: int, config: AlignConfig, accelerator: Accelerator, state: TrainState) -> None:
    def write(folder: Path) -> None:
        state.policy.save(folder / "policy", is_main=accelerator.is_main_process)
        if state.value is not None:
            state.value.save(folder / "value", is_main=accelerator.is_main_process)

    checkpoint.save(
        out / "checkpoints",
        step,
        write=write,
        state={
            "stage": "ppo",
            "model": config.model.name_or_path,
            "kl_ctl": state.kl_ctl.state_dict(),
            "reward_moments": state.moments.state_dict(),
            "sampler": state.sampler.state_dict(),
            # Every rank draws as many PTX batches per step, so rank 0's position is every rank's.
            "ptx": state.ptx.state_dict() if state.ptx is not None else None,
        },
        rank=accelerator.process_index,
        is_main=accelerator.is_main_process,
        save_total_limit=config.train.save_total_limit,
        barrier=accelerator.wait_for_everyone,
    )


def restore(path: Path, accelerator: Accelerator, state: TrainState) -> int:
    saved, rng = checkpoint.load(path, accelerator.process_index)
    if saved.get("stage") != "ppo":
        raise CheckpointError(f"{path} is a checkpoint of stage '{saved.get('stage')}', not ppo")
    state.policy.load(path / "policy")
    if state.value is not None:
        if not (path / "value").is_dir():
            raise CheckpointError(f"{path} holds no value model: it was saved by a run without one (ppo.advantage)")
        state.value.load(path / "value")
    state.kl_ctl.load_state_dict(saved["kl_ctl"])
    state.moments.load_state_dict(saved["reward_moments"])
    state.sampler.load_state_dict(saved["sampler"])
    if state.ptx is not None and saved.get("ptx") is not None:  # else PTX was off when saved: it starts now
        state.ptx.load_state_dict(saved["ptx"])
    checkpoint.set_rng_state(rng)
    return int(saved["step"])


def save_final(
    out: Path, config: AlignConfig, accelerator, policy: TrainedModel, value: TrainedModel | None, tokenizer
) -> None:
    """The policy in Hugging Face format in final/ (LoRA: the adapter, and merged weights when asked),
    the value model (if any) in final/value/. Every rank joins (ZeRO-3 gathers the shards)."""
    accelerator.wait_for_everyone()
    final, is_main = out / "final", accelerator.is_main_process
    merged = final / "merged" if config.peft.enabled and config.peft.merge else None
    if value is not None:
        value.save_pretrained(final / "value", is_main=is_main)
    policy.save_pretrained(final, is_main=is_main, merged=merged)
    if is_main:
        for folder in (final, merged):
            if folder is not None:
                tokenizer.save_pretrained(folder)
    accelerator.wait_for_everyone()
