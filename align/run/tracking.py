"""Where a run reports: log.jsonl and metrics.json always, W&B when `logger=wandb`.

Metric names are the same in every sink (`train/loss`, `eval/loss`, `ppo/reward`, ...), so a
script reading log.jsonl and a W&B dashboard see one vocabulary.
"""

from __future__ import annotations

import json
import math
import os
import re
import sys
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from align.config import AlignConfig
from align.errors import ConfigError

# Anything that looks like a credential is dropped from what we write or send. `tokens` and
# `tokenizer` are not credentials: max_new_tokens must stay in the config a manifest records.
_SECRET_KEY = re.compile(r"(api[_-]?key|token(?!s|izer)|secret|password)", re.IGNORECASE)


def _secret_values() -> set[str]:
    return {v for k, v in os.environ.items() if _SECRET_KEY.search(k) and len(v) >= 8}


def scrub(value: Any) -> Any:
    """A copy of a config-like structure without secret-looking keys or secret env values."""
    secrets = _secret_values()
    if isinstance(value, dict):
        return {k: ("<redacted>" if _SECRET_KEY.search(str(k)) else scrub(v)) for k, v in value.items()}
    if isinstance(value, list):
        return [scrub(v) for v in value]
    if isinstance(value, str) and any(s in value for s in secrets):
        return "<redacted>"
    return value


def config_dict(config: AlignConfig) -> dict[str, Any]:
    return scrub(OmegaConf.to_container(OmegaConf.structured(config), resolve=True))


def redact_files(folder: Path) -> None:
    """Replace secret env values in files written before we could scrub them (Hydra's .hydra/,
    which saves the command line as typed)."""
    secrets = sorted(_secret_values(), key=len, reverse=True)
    for path in folder.glob("*.yaml") if folder.is_dir() else []:
        text = path.read_text()
        clean = text
        for secret in secrets:
            clean = clean.replace(secret, "<redacted>")
        if clean != text:
            path.write_text(clean)


def jsonable(value: Any) -> Any:
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


class Tracker:
    """Logs metrics from the main process; other ranks hold a Tracker that does nothing."""

    def __init__(self, config: AlignConfig, output_dir: Path, *, is_main: bool = True) -> None:
        self.output_dir = output_dir
        self.is_main = is_main
        self._wandb = None
        if not is_main:
            return
        output_dir.mkdir(parents=True, exist_ok=True)
        # A resumed run goes on with the log it left; a fresh start (resume=never) replaces it.
        self._log_file = (output_dir / "log.jsonl").open("w" if config.resume == "never" else "a")
        if config.logger.backend == "wandb":
            import wandb

            logged = config_dict(config)  # scrubbed: the run name or tags could hold a secret too
            cfg = logged["logger"]
            # W&B records sys.argv as the run's command; a secret typed there must not go with it.
            argv, sys.argv = sys.argv, [sys.argv[0], *scrub(sys.argv[1:])]
            try:
                self._wandb = wandb.init(
                    project=cfg["project"],
                    entity=cfg["entity"],
                    name=cfg["name"] or output_dir.name,
                    group=cfg["group"],
                    tags=list(cfg["tags"]),
                    job_type=config.stage_name,
                    mode=cfg["mode"],
                    dir=str(output_dir),
                    config=logged,
                    resume="allow",
                    id=stable_run_id(output_dir),
                )
            except (wandb.errors.Error, ValueError) as exc:  # no API key, bad $WANDB_MODE, no network
                first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
                raise ConfigError(
                    f"logger=wandb cannot start a run ({first}); set WANDB_MODE=offline to log without an account"
                ) from exc
            finally:
                sys.argv = argv

    def log(self, metrics: dict[str, Any], step: int) -> None:
        if not self.is_main:
            return
        clean = {k: jsonable(v) for k, v in metrics.items()}
        self._log_file.write(json.dumps({"step": step, **clean}) + "\n")
        self._log_file.flush()
        if self._wandb is not None:
            self._wandb.log(clean, step=step)

    def log_table(self, name: str, columns: list[str], rows: list[list[Any]], step: int) -> None:
        if not self.is_main:
            return
        if self._wandb is not None:
            import wandb

            self._wandb.log({name: wandb.Table(columns=columns, data=rows)}, step=step)
        samples = self.output_dir / "samples.jsonl"
        with samples.open("a") as f:
            for row in rows:
                f.write(json.dumps({"table": name, "step": step, **dict(zip(columns, row, strict=True))}) + "\n")

    def finish(self, final_metrics: dict[str, Any], manifest: dict[str, Any] | None = None) -> None:
        """Write metrics.json and close the W&B run, logging the manifest to it first when given.

        The caller writes manifest.json after this: it marks the stage complete, so it comes last.
        """
        if not self.is_main:
            return
        clean = {k: jsonable(v) for k, v in final_metrics.items()}
        tmp = self.output_dir / "metrics.json.tmp"
        tmp.write_text(json.dumps(clean, indent=2, sort_keys=True) + "\n")
        tmp.replace(self.output_dir / "metrics.json")
        self._log_file.close()
        if self._wandb is not None:
            import wandb

            self._wandb.summary.update(clean)
            if manifest is not None:
                self._log_manifest(manifest)
            self._wandb.finish()
            # finish() returns once W&B's service (wandb-core) has everything, not once it is on disk: the
            # service buffers the run's record log (run-*.wandb, what an offline run is synced from) in
            # 32 KiB blocks and writes the last one when it closes the run's stream, which finish() only
            # asks for. Shutting the service down waits for that, so all the run logged is written before
            # the caller writes manifest.json; the next wandb.init starts a new service. Not while another
            # run of this process is open: shutting down would end it too.
            if wandb.run is None:
                wandb.teardown()

    def _log_manifest(self, manifest: dict[str, Any]) -> None:
        """The manifest as a `manifest` artifact (metadata and file), its lineage keys in the run config."""
        import wandb

        run = self._wandb
        artifact = wandb.Artifact(f"{manifest['stage']}-manifest-{run.id}", type="manifest", metadata=manifest)
        with artifact.new_file("manifest.json") as f:
            f.write(json.dumps(manifest, indent=2) + "\n")
        for parent in manifest["parents"]:
            path = Path(parent["path"]) if parent.get("path") else None
            if path is not None and path.exists():
                # A reference without checksums: W&B records where a parent checkpoint lives and what
                # it holds without reading or uploading gigabytes of weights.
                artifact.add_reference(path.as_uri(), name=f"parents/{parent['role']}", checksum=False)
        run.log_artifact(artifact)
        # In the config as well, so the runs table can filter and group by commit, data hash or parent.
        lineage = {
            "align_version": manifest["align_version"],
            "git_commit": manifest["git_commit"],
            "data": manifest["data"],
            "parents": {p["role"]: p.get("path") or p.get("hub_id") for p in manifest["parents"]},
        }
        run.config.update({"lineage": lineage}, allow_val_change=True)


def stable_run_id(output_dir: Path) -> str:
    """One W&B run per output directory, so a resumed run continues its own curves."""
    import hashlib

    return hashlib.sha1(str(output_dir.resolve()).encode()).hexdigest()[:12]
