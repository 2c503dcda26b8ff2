"""manifest.json: where a run's output came from, written last, so it also marks completion.

A manifest holds the resolved config, the data recipe with a hash of its file and of the
processed data, the parent checkpoints (with their own manifests, so a PPO policy traces back to
the SFT data), the align version and git commit, and the final metrics.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import time
from pathlib import Path
from typing import Any

import align
from align.config import REPO_ROOT, AlignConfig
from align.run.tracking import config_dict, jsonable

MANIFEST = "manifest.json"


def git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=REPO_ROOT,
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def file_sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def recipe_entry(recipe: str, fingerprint: str) -> dict[str, Any]:
    from align.data import resolve_recipe_path

    path = resolve_recipe_path(recipe)
    return {
        "recipe": recipe,
        "path": str(path),
        "recipe_sha256": file_sha256(path),
        "fingerprint": fingerprint,
    }


def parent_entry(role: str, path: str | None) -> dict[str, Any] | None:
    """A parent checkpoint (e.g. an SFT run's final/) with its run's manifest, when it has one."""
    if not path:
        return None
    local = Path(path).expanduser()
    if not local.exists():
        return {"role": role, "hub_id": path, "manifest": None}
    resolved = local.resolve()
    manifest = resolved.parent / MANIFEST
    return {
        "role": role,
        "path": str(resolved),
        "manifest": json.loads(manifest.read_text()) if manifest.is_file() else None,
    }


def build_manifest(
    config: AlignConfig,
    out: Path,
    *,
    data: dict[str, dict[str, Any]],
    parents: list[dict[str, Any] | None],
    metrics: dict[str, Any],
) -> dict[str, Any]:
    """The manifest as plain JSON values, so the tracker can log it before `save_manifest` marks completion."""
    manifest = {
        "stage": config.stage_name,
        "output_dir": str(out.resolve()),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "align_version": align.__version__,
        "git_commit": git_commit(),
        "model": config.model.name_or_path,
        "data": data,
        "parents": [p for p in parents if p is not None],
        "metrics": {k: jsonable(v) for k, v in metrics.items()},
        "config": config_dict(config),
    }
    # A round trip through JSON: W&B metadata takes only plain values, and what is logged there must
    # equal what manifest.json holds.
    return json.loads(json.dumps(manifest, default=str))


def save_manifest(manifest: dict[str, Any], out: Path) -> Path:
    """Write manifest.json atomically; call it last, after the W&B run finished: it marks the stage complete."""
    tmp = out / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=2) + "\n")
    tmp.replace(out / MANIFEST)
    return out / MANIFEST


def is_complete(out: Path) -> bool:
    return (out / MANIFEST).is_file()
