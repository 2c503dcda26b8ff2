"""`dry_run=true`: what a run would be, and whether its model states fit, before a job is queued.

Reads only configs (the model is built on the meta device: no weights, no memory), then prints
the resolved config, the world, the global batch and DeepSpeed's own estimates of model-state
memory per device for ZeRO-2 and ZeRO-3, with and without CPU offload.
"""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path

import torch
import yaml
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig

from align.config import REPO_ROOT, AlignConfig, ModelConfig
from align.modeling.models import load_model_config
from align.run.distributed import world_info
from align.run.tracking import config_dict

GiB = 2**30
# config.json of the hub ids in conf/model/, named <org>--<name>.json: a job is sized before it
# is queued, often on a login node that cannot reach the hub.
HUB_CONFIGS = REPO_ROOT / "align" / "assets" / "hub_configs"


def shipped_config(name_or_path: str) -> Path | None:
    path = HUB_CONFIGS / f"{name_or_path.replace('/', '--')}.json"
    return path if path.is_file() else None


def architecture(model_cfg: ModelConfig) -> tuple[PretrainedConfig, str]:
    """The model's config and where it came from: a local directory's config.json, else the copy
    shipped for its hub id, else the hub."""
    name = model_cfg.name_or_path
    local = Path(name).expanduser().is_dir()
    shipped = None if local else shipped_config(name)
    if shipped is None:
        return load_model_config(model_cfg), f"config.json of {name} ({'local directory' if local else 'hub'})"
    config = AutoConfig.from_pretrained(shipped)
    source = f"shipped config for {name} ({shipped.relative_to(REPO_ROOT)})"
    # Set only where the shipped file is a stand-in for a config transformers cannot build offline.
    note = getattr(config, "align_note", None)
    return config, f"{source}; {note}" if note else source


def parameter_counts(config: PretrainedConfig, trust_remote_code: bool = False) -> tuple[int, int]:
    """(total parameters, largest single layer's parameters), from the config alone."""
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    total = sum({p.data_ptr() if p.device.type != "meta" else id(p): p.numel() for p in model.parameters()}.values())
    largest = max(sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules())
    return total, largest


def nodes_and_gpus(world_size: int) -> tuple[int, int]:
    per_node = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("SLURM_GPUS_ON_NODE", world_size)))
    per_node = max(1, min(per_node, world_size))
    return max(1, world_size // per_node), per_node


def estimates(total: int, largest: int, nodes: int, gpus: int) -> list[tuple[str, float, float]]:
    """(setting, GiB per CPU node, GiB per GPU) from DeepSpeed's estimators."""
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    rows = []
    for offload in (False, True):
        cpu, gpu = estimate_zero2_model_states_mem_needs(total, gpus, nodes, cpu_offload=offload)
        rows.append((f"zero2{' + offload optimizer' if offload else ''}", cpu / GiB, gpu / GiB))
    for offload in (False, True):
        cpu, gpu, _ = estimate_zero3_model_states_mem_needs(
            total, largest, gpus, nodes, cpu_offload=offload, cpu_offload_params=offload
        )
        rows.append((f"zero3{' + offload optimizer and params' if offload else ''}", cpu / GiB, gpu / GiB))
    return rows


def report(config: AlignConfig) -> str:
    _, world, _ = world_info()
    nodes, gpus = nodes_and_gpus(world)
    train = config.train
    lines = ["# resolved config", yaml.safe_dump(config_dict(config), sort_keys=False).rstrip(), ""]
    preset = f" (the stage={config.stage_preset} preset)" if config.stage_preset else ""
    lines.append(f"stage: {config.stage_name}{preset}")
    lines.append(f"world: {world} processes ({nodes} node(s) x {gpus})")
    if config.stage_name == "ppo":
        episodes = config.ppo.prompts_per_step * config.ppo.responses_per_prompt
        lines.append(f"episodes per step: {episodes} per device, {episodes * world} global")
    else:
        lines.append(
            f"global batch: {train.batch_size} per device x {train.grad_accum} accumulation x {world} = "
            f"{train.batch_size * train.grad_accum * world} sequences per optimizer step"
        )
    model_cfg = config.model
    policy = config.ppo.policy if config.stage_name == "ppo" else None
    if policy and (Path(policy).expanduser().exists() or policy == model_cfg.name_or_path):
        model_cfg = replace(model_cfg, name_or_path=policy, init="pretrained")
    elif policy:
        # A PPO job is often sized before the SFT run that writes its policy has finished.
        lines.append(f"ppo.policy {policy} does not exist yet: sized as model.name_or_path {model_cfg.name_or_path}")
    config_json, source = architecture(model_cfg)
    total, largest = parameter_counts(config_json, model_cfg.trust_remote_code)
    lines.append(f"architecture: {source}")
    lines.append(f"model: {model_cfg.name_or_path}: {total / 1e6:.1f}M parameters (largest layer {largest / 1e6:.1f}M)")
    if config.peft.enabled:
        lines.append("peft: LoRA trains a small adapter; the estimates below are for full finetuning (an upper bound)")
    if config.stage_name == "ppo" and config.ppo.advantage == "gae":
        lines.append(
            "ppo: policy and value are trained (estimates below each); the frozen reference and reward "
            f"model add about {2 * 2 * total / GiB:.2f} GiB in 16-bit per device (shared out under zero3)"
        )
    elif config.stage_name == "ppo":
        frozen = 1 + bool(config.ppo.reward_model)
        lines.append(
            f"ppo.advantage={config.ppo.advantage}: the policy alone is trained (estimate below), no value model; "
            f"the frozen {'reference and reward model add' if frozen > 1 else 'reference adds'} about "
            f"{frozen * 2 * total / GiB:.2f} GiB in 16-bit per device (shared out under zero3)"
        )
    lines.append(f"\nDeepSpeed estimate of model-state memory (params, grads, optimizer) for {model_cfg.name_or_path}:")
    lines.append(f"  {'setting':42} {'per CPU node':>13} {'per GPU':>9}")
    for name, cpu, gpu in estimates(total, largest, nodes, gpus):
        lines.append(f"  {name:42} {cpu:10.2f} GiB {gpu:6.2f} GiB")
    lines.append("Activations come on top: they grow with train.batch_size x train.max_length.")
    return "\n".join(lines)
