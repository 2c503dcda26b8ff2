"""The run directory contract: config.yaml, log.jsonl, metrics.json, final/, checkpoints/."""

from __future__ import annotations

import logging
import re
from pathlib import Path

import yaml

from align.config import AlignConfig
from align.errors import CheckpointError
from align.tracking import config_dict

log = logging.getLogger("align")
_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")


def prepare(config: AlignConfig, *, is_main: bool = True) -> Path:
    """Create the run directory and write the resolved config (no secrets) into it."""
    out = Path(config.output_dir)
    if is_main:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.yaml").write_text(yaml.safe_dump(config_dict(config), sort_keys=False))
    return out


def complete_checkpoints(checkpoints_dir: Path) -> list[Path]:
    """Checkpoints that finished writing, oldest first (a trainer_state.json is written last)."""
    if not checkpoints_dir.is_dir():
        return []
    found = []
    for path in checkpoints_dir.iterdir():
        match = _CHECKPOINT.match(path.name)
        if match and path.is_dir():
            if (path / "trainer_state.json").is_file():
                found.append((int(match.group(1)), path))
            else:
                log.warning("skipping incomplete checkpoint %s", path)
    return [path for _, path in sorted(found)]


def resume_checkpoint(config: AlignConfig, out: Path) -> Path | None:
    """The checkpoint to continue from, per `resume=auto|never|PATH`."""
    if config.resume == "never":
        return None
    if config.resume == "auto":
        checkpoints = complete_checkpoints(out / "checkpoints")
        if checkpoints:
            log.info("resuming from %s", checkpoints[-1])
        return checkpoints[-1] if checkpoints else None
    path = Path(config.resume)
    if not (path / "trainer_state.json").is_file():
        raise CheckpointError(f"resume='{config.resume}' is not a complete checkpoint directory")
    return path
