"""Score a preference set with a trained reward model: `stage=rm_eval rm.path=<dir> data=<recipe>`.

Every pair of the recipe (train and eval rows) is scored with the same code as the RM stage's
held-out evaluation (`align.modeling.reward_model.score_pairs`), so the numbers are comparable: on the same
pairs they are the same. Writes eval/accuracy, eval/margin, eval/reward_mean, eval/reward_std and
eval/loss to output_dir/metrics.json, a table of examples, and a manifest.json naming the reward
model and the data.
"""

from __future__ import annotations

import logging
from pathlib import Path

import datasets
import torch

from align.config import AlignConfig, ModelConfig
from align.data import load_recipe_data
from align.errors import ConfigError, ModelError
from align.modeling import models
from align.modeling import reward_model as rm
from align.modeling.chat import end_of_turn_id
from align.run import plan, rundir
from align.run.lineage import build_manifest, parent_entry, recipe_entry, save_manifest
from align.run.tracking import Tracker

log = logging.getLogger("align.rm_eval")


def run(config: AlignConfig) -> dict[str, float]:
    if not config.rm.path:
        raise ConfigError("stage=rm_eval needs rm.path=<a trained reward model, e.g. an rm run's final/>")
    path = Path(config.rm.path).expanduser()
    if not path.is_dir():
        raise ModelError(f"rm.path '{config.rm.path}' is not a directory")
    reward_cfg = ModelConfig(name_or_path=str(path))
    models.check_tuning_fits(config, reward_cfg, "rm.path")
    tokenizer = models.load_tokenizer(reward_cfg)
    data = load_recipe_data(
        config.data.recipe,
        "preference",
        tokenizer,
        seed=config.seed,
        max_length=config.train.max_length,
        on_error=config.data.on_error,
        cache_dir=config.data.cache_dir,
    )
    parts = [data.train] if data.eval is None else [data.train, data.eval]
    pairs = rm.reward_rows(datasets.concatenate_datasets(parts), end_of_turn_id(tokenizer))
    out = rundir.prepare(config)
    tracker = Tracker(config, out)

    # fp32 weights, as an rm run saves them and scores its held-out pairs with.
    model = rm.load_reward_model(path, tokenizer)
    plan.log_plan(config, reward_cfg, model, tokenizer, is_main=True)
    model.to("cuda" if torch.cuda.is_available() else "cpu")
    chosen, rejected = rm.score_pairs(model, pairs, tokenizer.pad_token_id, config.train.batch_size)
    metrics = {f"eval/{k}": v for k, v in rm.pair_metrics(chosen, rejected).items()}
    metrics["eval/pairs"] = len(pairs)
    log.info("%s on %s: %s", path, config.data.recipe, metrics)
    tracker.log_table("eval/examples", rm.EXAMPLE_COLUMNS, rm.example_rows(pairs, chosen, rejected), step=0)
    tracker.log(metrics, step=0)
    manifest = build_manifest(
        config,
        out,
        data={"pairs": recipe_entry(config.data.recipe, data.fingerprint)},
        parents=[parent_entry("reward_model", config.rm.path)],
        metrics=metrics,
    )
    tracker.finish(metrics, manifest=manifest)
    save_manifest(manifest, out)
    return metrics
