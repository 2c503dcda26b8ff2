"""`python -m align ...`: compose the config with Hydra, check it, run the chosen stage.

Config mistakes are reported in one line before Hydra or any model starts: Hydra's own messages
span several lines and end with a hint about stack traces, which reads like a crash.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib
import logging
import sys
from pathlib import Path

import hydra
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException, MissingConfigException, OverrideParseException
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigAttributeError, ConfigKeyError, OmegaConfBaseException

from align.config import (
    CONF_DIR,
    DPO_LOSS_TYPES,
    DPO_SMOOTHED,
    REPO_ROOT,
    STAGES,
    AlignConfig,
    DPOConfig,
    register_configs,
)
from align.errors import AlignError, ConfigError

log = logging.getLogger("align")


def _asset(name: str) -> str:
    return str(REPO_ROOT / "align" / "assets" / name)


OmegaConf.register_new_resolver("asset", _asset, replace=True)
register_configs()


def _schema_keys(schema: type = AlignConfig, prefix: str = "") -> list[str]:
    keys = []
    for f in dataclasses.fields(schema):
        keys.append(prefix + f.name)
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else None
        if dataclasses.is_dataclass(default):
            keys.extend(_schema_keys(type(default), f"{prefix}{f.name}."))
    return keys


def _one_line(exc: BaseException) -> str:
    """The clearest single line we can say about a composition failure."""
    if isinstance(exc, MissingConfigException) and exc.missing_cfg_file:
        group, _, option = exc.missing_cfg_file.rpartition("/")
        options = ", ".join(exc.options or [])
        return f"unknown {group} option '{option}' (available: {options})"
    if isinstance(exc, OverrideParseException):
        # Hydra's message may repeat the override on its first line; the reason follows it.
        lines = [line for line in str(exc).splitlines() if line and not line.startswith("Error parsing override")]
        return f"cannot parse the override '{exc.override}': {lines[0] if lines else 'invalid syntax'}"
    cause = exc
    while cause.__cause__ is not None and not isinstance(cause, OmegaConfBaseException):
        cause = cause.__cause__
    if isinstance(cause, OmegaConfBaseException):
        key = getattr(cause, "full_key", None) or ""
        text = str(cause).splitlines()[0]
        if isinstance(cause, ConfigKeyError | ConfigAttributeError):
            known = _schema_keys()
            close = difflib.get_close_matches(key, known, n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            return f"unknown config key '{key}'{hint}"
        if "missing mandatory value" in text.lower():
            return f"config key '{key}' must be set"
        return f"{key}: {text}" if key else text
    return str(exc).splitlines()[0]


def _is_plain_override(arg: str) -> bool:
    # An argument without '=' ('train.lr', '+foo') is a malformed override, checked here too:
    # Hydra would report it in three lines.
    return not arg.startswith("-") and not arg.startswith("hydra")


# Keys that name a checkpoint of the user's own, in the order the model is taken from.
_CHECKPOINT_KEYS = ("model.name_or_path", "ppo.policy", "dpo.policy", "rm.init_from", "rm.path")


def _split(override: str) -> tuple[str, str | None]:
    key, sep, value = override.partition("=")
    return key.lstrip("+~"), value if sep else None


def normalize_overrides(overrides: list[str]) -> list[str]:
    """The command line in the form Hydra reads, for two things users type that its groups cannot:

    - `data=<path to a recipe .yaml>` is `data.recipe=<path>` (a `data=` option names a recipe of
      data_recipes/);
    - a checkpoint of one's own (`model.name_or_path`, `ppo.policy`, `dpo.policy`, `rm.init_from`, `rm.path`) with
      no `model=` choice selects `model=hf` at that path. The default `model=tiny` is the demo: it
      builds random weights and brings the demo's learning rates, which would silently destroy a
      pretrained model.
    """
    parsed = [_split(o) for o in overrides]
    result = []
    for override, (key, value) in zip(overrides, parsed, strict=True):
        if key == "data" and value and (value.endswith((".yaml", ".yml")) or "/" in value):
            override = f"data.recipe={value}"
        result.append(override)
    choice = next((value for key, value in parsed if key == "model"), None)
    given = {key: value for key, value in parsed if key in _CHECKPOINT_KEYS and value}
    if choice == "tiny" and "model.name_or_path" in given:
        raise ConfigError(
            f"model=tiny is the embedded demo model (random init, demo learning rates); for "
            f"'{given['model.name_or_path']}' drop model=tiny (model.name_or_path alone loads it, as model=hf)"
        )
    if choice is None and given:
        path = next(given[key] for key in _CHECKPOINT_KEYS if key in given)
        result = ["model=hf", *([] if "model.name_or_path" in given else [f"model.name_or_path={path}"]), *result]
    return result


def check_overrides(overrides: list[str]) -> AlignConfig:
    """Compose and type-check the config the way Hydra will; raise ConfigError in one line."""
    overrides = normalize_overrides(overrides)
    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            cfg = compose(config_name="config", overrides=overrides)
        config = OmegaConf.to_object(cfg)
    except (ConfigCompositionException, MissingConfigException, OverrideParseException, OmegaConfBaseException) as exc:
        raise ConfigError(_one_line(exc)) from exc
    validate(config)
    return config


def validate(config: AlignConfig) -> None:
    """Cross-field checks that need no model or data on disk."""
    if config.stage_name not in STAGES:
        raise ConfigError(f"stage_name '{config.stage_name}' is not one of {', '.join(STAGES)}")
    if config.train.precision not in ("auto", "bf16", "fp16", "fp32"):
        raise ConfigError(f"train.precision must be auto, bf16, fp16 or fp32, not '{config.train.precision}'")
    if config.deepspeed.stage not in (0, 2, 3):
        raise ConfigError(f"deepspeed.stage must be 0, 2 or 3, not {config.deepspeed.stage}")
    if config.logger.backend not in ("none", "wandb"):
        raise ConfigError(f"logger.backend must be none or wandb, not '{config.logger.backend}'")
    if config.logger.mode not in (None, "online", "offline", "disabled", "shared"):
        raise ConfigError(f"logger.mode must be online, offline, disabled or unset, not '{config.logger.mode}'")
    if config.model.init not in ("pretrained", "random"):
        raise ConfigError(f"model.init must be pretrained or random, not '{config.model.init}'")
    for key in ("batch_size", "grad_accum"):
        if getattr(config.train, key) < 1:
            raise ConfigError(f"train.{key} must be at least 1")
    if config.stage_name == "rm_eval" and not config.rm.path:
        raise ConfigError("stage=rm_eval needs rm.path=<a trained reward model, e.g. an rm run's final/>")
    if config.train.nan_skip_limit < 0:
        raise ConfigError("train.nan_skip_limit must be 0 (stop at the first non-finite step) or more")
    if config.train.nan_skip_limit > 0 and config.deepspeed.stage > 0:
        # DeepSpeed steps its optimizer inside the backward pass, before the guard can drop the update.
        raise ConfigError(
            "train.nan_skip_limit needs deepspeed=none (DeepSpeed applies updates before they can be dropped)"
        )
    if config.train.max_steps == 0 or config.train.max_steps < -1:
        raise ConfigError("train.max_steps must be positive, or -1 to train for train.epochs")
    check_dpo(config.dpo)


def check_dpo(dpo: DPOConfig) -> None:
    if dpo.loss_type not in DPO_LOSS_TYPES:
        raise ConfigError(f"dpo.loss_type '{dpo.loss_type}' is not one of {', '.join(DPO_LOSS_TYPES)}")
    if dpo.beta <= 0:
        raise ConfigError(f"dpo.beta must be above 0, not {dpo.beta}")
    if dpo.label_smoothing < 0 or (dpo.label_smoothing > 0 and dpo.loss_type not in DPO_SMOOTHED):
        raise ConfigError(
            f"dpo.label_smoothing={dpo.label_smoothing} needs a loss_type that reads it "
            f"({', '.join(DPO_SMOOTHED)}); loss_type {dpo.loss_type} ignores it"
        )
    if dpo.loss_type == "robust" and dpo.label_smoothing >= 0.5:
        raise ConfigError(f"dpo.label_smoothing must be below 0.5 (loss_type robust), not {dpo.label_smoothing}")
    if dpo.loss_type == "exo_pair" and dpo.label_smoothing == 0:
        raise ConfigError("loss_type exo_pair needs dpo.label_smoothing above 0 (EXO's epsilon, e.g. 1e-3)")


def check_library_names(config: AlignConfig) -> None:
    """Keys whose valid values transformers defines; every stage imports it, so this costs nothing."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
    from transformers.trainer_utils import SchedulerType

    schedulers = [s.value for s in SchedulerType]
    if config.train.lr_scheduler not in schedulers:
        raise ConfigError(f"train.lr_scheduler '{config.train.lr_scheduler}' is not one of {', '.join(schedulers)}")
    attention = ["eager", *ALL_ATTENTION_FUNCTIONS.valid_keys()]
    impl = config.model.attn_implementation
    if impl not in attention and "/" not in impl:  # 'org/name' is a kernel from the hub
        raise ConfigError(f"model.attn_implementation '{impl}' is not one of {', '.join(attention)}")


def run_stage(config: AlignConfig) -> dict[str, float]:
    from align.modeling.models import resolve_precision
    from align.run.distributed import init_distributed

    check_library_names(config)
    resolve_precision(config.train.precision)  # a precision the hardware lacks fails before any work
    if config.dry_run:
        from align.run.dry_run import report

        print(report(config))
        return {}
    stage = importlib.import_module(f"align.stages.{config.stage_name}")
    # Before any Trainer or Accelerator exists, so all of them see the launcher's whole world.
    init_distributed(deepspeed=config.deepspeed.stage > 0)
    return stage.run(config)


@hydra.main(config_path=str(CONF_DIR), config_name="config", version_base="1.3")
def _hydra_entry(cfg: DictConfig) -> None:
    from hydra.core.hydra_config import HydraConfig

    from align.run.tracking import redact_files

    hydra_dir = HydraConfig.get().output_subdir
    if hydra_dir is not None:
        redact_files(Path(HydraConfig.get().runtime.output_dir) / hydra_dir)
    try:
        config = OmegaConf.to_object(cfg)
        validate(config)
        run_stage(config)
    except AlignError as exc:
        _fail(exc)


def _fail(exc: AlignError) -> None:
    print(f"align: {type(exc).__name__}: {exc}", file=sys.stderr)
    sys.exit(exc.exit_code)


def main() -> None:
    args = sys.argv[1:]
    plain = [a for a in args if _is_plain_override(a)]
    try:
        normalized = normalize_overrides(plain)
        # A multirun sweep ('a=1,2') is not a single config; Hydra checks each job itself.
        if not any(a in ("-m", "--multirun") or a.startswith(("--help", "-h", "--hydra-help")) for a in args):
            check_overrides(normalized)
    except AlignError as exc:
        _fail(exc)
    # Hydra reads sys.argv itself: it gets the normalized overrides (recorded as such in .hydra/).
    sys.argv[1:] = [a for a in args if not _is_plain_override(a)] + normalized
    _hydra_entry()
