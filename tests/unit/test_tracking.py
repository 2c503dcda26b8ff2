"""The tracker against W&B's real offline files: tables, group and job type, and the manifest logged to
W&B before manifest.json (the stage's completion marker) is written."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import align
from align.config import AlignConfig, ModelConfig
from align.run.lineage import build_manifest, parent_entry, recipe_entry, save_manifest
from align.run.tracking import Tracker, scrub
from tests.wandb_files import artifacts, config, offline_run, run_info, table_rows


@pytest.fixture
def offline(monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")


def _config(out: Path, backend: str) -> AlignConfig:
    config = AlignConfig(stage_name="rm_eval", output_dir=str(out), model=ModelConfig(name_or_path="tiny"))
    config.logger.backend = backend
    config.logger.group = "pipe-abc123"
    return config


def _parent(tmp_path: Path) -> Path:
    """An RM run's final/ beside its manifest, as a parent checkpoint looks on disk."""
    final = tmp_path / "rm" / "final"
    final.mkdir(parents=True)
    (final / "model.safetensors").write_bytes(b"weights")
    (final.parent / "manifest.json").write_text(json.dumps({"stage": "rm", "metrics": {"eval/accuracy": 0.9}}))
    return final


def test_manifest_and_tables_reach_wandb_before_manifest_json(offline, tmp_path):
    out = tmp_path / "run"
    cfg = _config(out, "wandb")
    parent = _parent(tmp_path)
    tracker = Tracker(cfg, out)
    tracker.log_table("eval/examples", ["prompt", "reward"], [["2 1 3", 1.5], ["3 2 1", -0.5]], step=3)
    metrics = {"eval/accuracy": torch.tensor(0.75), "eval/loss": float("nan")}
    manifest = build_manifest(
        cfg,
        out,
        data={"pairs": recipe_entry("demo_prefs", "fp-1234")},
        parents=[parent_entry("reward_model", str(parent)), parent_entry("base", None)],
        metrics=metrics,
    )
    tracker.finish(metrics, manifest=manifest)
    path = save_manifest(manifest, out)

    assert manifest["metrics"] == {"eval/accuracy": 0.75, "eval/loss": "nan"}  # plain JSON, as W&B takes it
    assert json.loads(path.read_text()) == manifest
    assert manifest["parents"] == [
        {
            "role": "reward_model",
            "path": str(parent.resolve()),
            "manifest": {"stage": "rm", "metrics": {"eval/accuracy": 0.9}},
        }
    ]
    run = offline_run(out)
    info = run_info(run)
    assert (info.run_group, info.job_type) == ("pipe-abc123", "rm_eval")

    (logged,) = artifacts(run, "manifest")
    assert logged.name == f"rm_eval-manifest-{info.run_id}"
    assert json.loads(logged.metadata) == manifest
    entries = {entry.path: entry for entry in logged.manifest.contents}
    assert json.loads(Path(entries["manifest.json"].local_path).read_text()) == manifest
    # The parent checkpoint is a reference to where it lives, not an upload of its weights.
    weights = entries["parents/reward_model/model.safetensors"]
    assert weights.ref == (parent / "model.safetensors").resolve().as_uri()
    assert not weights.local_path
    assert config(run)["lineage"] == {
        "align_version": align.__version__,
        "git_commit": manifest["git_commit"],
        "data": manifest["data"],
        "parents": {"reward_model": str(parent.resolve())},
    }
    assert manifest["data"]["pairs"]["recipe_sha256"]

    assert table_rows(run, "eval/examples") == [
        (3, [{"prompt": "2 1 3", "reward": 1.5}, {"prompt": "3 2 1", "reward": -0.5}])
    ]
    assert len(artifacts(run, "run_table")) == 1

    # manifest.json marks completion: the run's own files are older, W&B's record log too. Its service
    # writes the log's last block only when it closes the run, after run.finish() returns; finish()
    # waits for that.
    (log,) = run.glob("run-*.wandb")
    for earlier in (out / "metrics.json", out / "log.jsonl", out / "samples.jsonl", log):
        assert earlier.stat().st_mtime_ns <= path.stat().st_mtime_ns, earlier


def test_without_wandb_the_manifest_only_goes_to_disk(tmp_path):
    out = tmp_path / "run"
    cfg = _config(out, "none")
    tracker = Tracker(cfg, out)
    manifest = build_manifest(cfg, out, data={}, parents=[], metrics={"train/loss": 1.25})
    tracker.finish({"train/loss": 1.25}, manifest=manifest)
    save_manifest(manifest, out)
    assert json.loads((out / "metrics.json").read_text()) == {"train/loss": 1.25}
    assert json.loads((out / "manifest.json").read_text())["metrics"] == {"train/loss": 1.25}
    assert not (out / "wandb").exists()


def test_scrub_drops_credentials_but_keeps_token_counts(monkeypatch):
    monkeypatch.setenv("MY_SERVICE_TOKEN", "s3cret-value-123")
    cleaned = scrub(
        {
            "hub_token": "x",
            "WANDB_API_KEY": "x",
            "db_password": "x",
            "ppo": {"max_new_tokens": 128, "tokenizer": "tiny", "note": "uses s3cret-value-123"},
        }
    )
    assert cleaned == {
        "hub_token": "<redacted>",
        "WANDB_API_KEY": "<redacted>",
        "db_password": "<redacted>",
        "ppo": {"max_new_tokens": 128, "tokenizer": "tiny", "note": "<redacted>"},
    }


@pytest.mark.parametrize(("resume", "steps"), [("never", [1]), ("auto", [1, 1])])
def test_a_fresh_start_replaces_the_log_a_resume_continues_it(tmp_path, resume, steps):
    for _ in range(2):  # the same output_dir twice
        config = _config(tmp_path, "none")
        config.resume = resume
        tracker = Tracker(config, tmp_path)
        tracker.log({"train/loss": 1.0}, step=1)
        tracker.finish({})
    assert [json.loads(line)["step"] for line in (tmp_path / "log.jsonl").read_text().splitlines()] == steps
