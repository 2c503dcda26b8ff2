"""Typed configuration: the schema Hydra composes ``conf/`` against.

Every key is declared here with its meaning, so a typo or a wrong type fails at start-up with a
message naming the key. Defaults follow the Qwen report (``shared/qwen_recipe.md``); the files in
``conf/`` choose between presets and the tiny demo overrides only what a tiny model needs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING

REPO_ROOT = Path(__file__).resolve().parent.parent
CONF_DIR = REPO_ROOT / "conf"
STAGES = ("sft",)


@dataclass
class ModelConfig:
    name_or_path: str = MISSING
    """Hub id or local directory of the model and tokenizer."""
    init: str = "pretrained"
    """'pretrained' loads weights; 'random' builds the model from its config.json with `seed` (tiny demo)."""
    revision: str | None = None
    """Hub revision (branch, tag or commit) to pin."""
    trust_remote_code: bool = False
    """Run modelling code shipped with the checkpoint. Off unless you trust its source."""
    attn_implementation: str = "sdpa"
    """'sdpa', 'eager' or 'flash_attention_2' (GPU, when installed)."""


@dataclass
class DataConfig:
    recipe: str = MISSING
    """Recipe name in data_recipes/ or a path to a recipe YAML."""
    on_error: str | None = None
    """Override the recipe's policy for bad rows: 'raise' or 'skip' (skipped rows are counted)."""
    cache_dir: str | None = None
    """Where processed datasets are cached; default ~/.cache/align/data or $ALIGN_CACHE_DIR."""


@dataclass
class PeftConfig:
    enabled: bool = False
    """Train a LoRA adapter instead of all weights."""
    r: int = 64
    alpha: int = 16
    dropout: float = 0.05
    target_modules: list[str] = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    )
    """Module names (suffixes) that get adapters; each must exist in the model."""
    modules_to_save: list[str] = field(default_factory=list)
    """Modules trained in full beside the adapter (embeddings and LM head are added when the
    tokenizer gained ChatML tokens, as the Qwen finetune code does for base models)."""
    merge: bool = False
    """Also write merged full weights to final/merged/."""


@dataclass
class DeepSpeedConfig:
    stage: int = 0
    """ZeRO stage: 0 (no DeepSpeed), 2 or 3."""
    offload_optimizer: bool = False
    offload_param: bool = False


@dataclass
class LoggerConfig:
    backend: str = "none"
    """'none' (log.jsonl and the terminal only) or 'wandb'."""
    project: str = "align"
    entity: str | None = None
    name: str | None = None
    """Run name; defaults to the output directory's name."""
    group: str | None = None
    tags: list[str] = field(default_factory=list)
    mode: str | None = None
    """W&B mode: 'online', 'offline' or 'disabled'; unset follows $WANDB_MODE."""


@dataclass
class TrainConfig:
    max_steps: int = 4000
    """Optimizer steps; -1 trains for `epochs` instead."""
    epochs: float = 1.0
    lr: float = 2e-6
    batch_size: int = 1
    """Sequences per device per micro-step."""
    grad_accum: int = 128
    """Micro-steps per optimizer step (Qwen SFT: global batch 128)."""
    lr_scheduler: str = "constant_with_warmup"
    warmup_steps: int = 1430
    warmup_ratio: float = 0.0
    """Used when warmup_steps is 0."""
    weight_decay: float = 0.1
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    adam_eps: float = 1e-8
    max_grad_norm: float = 1.0
    dropout: float = 0.1
    """Attention dropout while training (Qwen SFT 0.1); PPO turns every dropout off."""
    max_length: int = 2048
    """Longest sequence in tokens; longer rows are dropped and counted by the data recipe."""
    precision: str = "auto"
    """'auto' (bf16 on a GPU that has it, else fp32), 'bf16', 'fp16' or 'fp32'."""
    gradient_checkpointing: bool = False
    logging_steps: int = 10
    eval_steps: int = 200
    """Evaluate every N steps; 0 only at the end."""
    save_steps: int = 500
    save_total_limit: int = 3
    """Keep at most this many intermediate checkpoints (oldest rotated out)."""


@dataclass
class SFTConfig:
    packing: bool = False
    """Pack several conversations into each row (best-fit, no cross-attention between them)."""


@dataclass
class AlignConfig:
    stage_name: str = MISSING
    """Set by the stage/ group: which stage runs."""
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    peft: PeftConfig = field(default_factory=PeftConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    sft: SFTConfig = field(default_factory=SFTConfig)
    output_dir: str = MISSING
    """Where the run writes config.yaml, metrics.json, log.jsonl, final/ and checkpoints/."""
    seed: int = 42
    resume: str = "auto"
    """'auto' continues from the newest complete checkpoint in output_dir, 'never' starts fresh,
    or a path to a checkpoint directory."""
    dry_run: bool = False
    """Print the resolved plan and exit before loading weights."""


def register_configs() -> None:
    ConfigStore.instance().store(name="align_schema", node=AlignConfig)
