"""SFT -> RM -> PPO in one command, each stage's final/ feeding the next (or SFT -> DPO:
`pipeline.stages=[sft,dpo]`).

Each stage runs in its own folder under output_dir with its own composed config: the command
line's overrides apply to every stage, `pipeline.<stage>=[...]` to one. A stage whose folder
has a manifest.json is complete and skipped; an interrupted one resumes (resume=auto). All
stages share one W&B group, each stage's run with its stage as job type, beside a `pipeline` run
holding every stage's final metrics.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import logging
import time
from pathlib import Path

from hydra import compose
from hydra.core.hydra_config import HydraConfig
from omegaconf import OmegaConf

from align.cli import check_library_names, normalize_overrides, validate
from align.config import AlignConfig
from align.errors import ConfigError
from align.rl.reward_fns import import_reward_fn
from align.run import rundir
from align.run.lineage import is_complete
from align.run.summary import write_summary
from align.run.tracking import Tracker, stable_run_id

log = logging.getLogger("align.pipeline")
KNOWN = ("sft", "rm", "ppo", "dpo")
# Keys the pipeline sets for each stage itself; a command-line value for them means the pipeline's.
_PIPELINE_KEYS = ("stage", "stage_name", "output_dir", "pipeline", "hydra", "data", "dry_run")


def run(config: AlignConfig) -> dict[str, float]:
    stages = list(config.pipeline.stages)
    unknown = [s for s in stages if s not in KNOWN]
    if unknown or not stages:
        raise ConfigError(f"pipeline.stages must be a non-empty list of {', '.join(KNOWN)}; got {stages}")
    if config.pipeline.gold_fn:
        import_reward_fn(config.pipeline.gold_fn, "pipeline.gold_fn")  # a typo fails now, not after training
    out = rundir.prepare(config)
    shared = [
        o
        for o in HydraConfig.get().overrides.task
        if not o.lstrip("+~").startswith(_PIPELINE_KEYS) and not o.startswith("model=")
    ]
    model_choice = HydraConfig.get().runtime.choices["model"]
    # The folder's name for people, its path's hash so two pipelines both called `pipe` stay apart.
    group = config.logger.group or f"{out.resolve().name}-{stable_run_id(out)[:6]}"

    outputs = {stage: out / stage for stage in stages}
    timings: dict[str, float] = {}
    for stage in stages:
        stage_out = outputs[stage]
        if is_complete(stage_out):
            log.info("%s: complete in %s, skipped", stage, stage_out)
            continue
        overrides = normalize_overrides(
            [
                f"stage={stage}",
                # The pipeline's model choice, pinned: the wiring's checkpoints are its own stages'.
                f"model={model_choice}",
                f"output_dir={stage_out}",
                f"logger.group={group}",
                *shared,
                *wiring(stage, config, outputs),
                *getattr(config.pipeline, stage),
            ]
        )
        log.info("%s: python -m align %s", stage, " ".join(overrides))
        stage_config = OmegaConf.to_object(compose(config_name="config", overrides=overrides))
        validate(stage_config)
        check_library_names(stage_config)
        started = time.perf_counter()
        importlib.import_module(f"align.stages.{stage}").run(stage_config)
        timings[stage] = time.perf_counter() - started
        record_time(stage_out, timings[stage])

    metrics = {f"{stage}/{k}": v for stage in stages for k, v in read_metrics(outputs[stage]).items()}
    write_summary(config, out, outputs)
    # A run of its own in the stages' group: one row on the dashboard for what this pipeline gained.
    tracker = Tracker(dataclasses.replace(config, logger=dataclasses.replace(config.logger, group=group)), out)
    tracker.finish(metrics)
    return metrics


def wiring(stage: str, config: AlignConfig, outputs: dict[str, Path]) -> list[str]:
    """Point each stage at the outputs of the stages before it."""
    if stage == "rm" and config.pipeline.rm_from_sft and "sft" in outputs:
        return [f"rm.init_from={outputs['sft'] / 'final'}"]
    if stage == "ppo":
        wired = []
        if "sft" in outputs:
            wired.append(f"ppo.policy={outputs['sft'] / 'final'}")
        if "rm" in outputs:
            wired.append(f"ppo.reward_model={outputs['rm'] / 'final'}")
        return wired
    if stage == "dpo" and "sft" in outputs:
        return [f"dpo.policy={outputs['sft'] / 'final'}"]
    return []


def record_time(stage_out: Path, seconds: float) -> None:
    (stage_out / "wall_time.json").write_text(json.dumps({"seconds": seconds}) + "\n")


def read_metrics(stage_out: Path) -> dict[str, float]:
    path = stage_out / "metrics.json"
    return json.loads(path.read_text()) if path.is_file() else {}
