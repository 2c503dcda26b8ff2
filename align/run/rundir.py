"""The run directory contract: config.yaml, log.jsonl, metrics.json, final/, checkpoints/."""

from __future__ import annotations

import json
import logging
import re
import shutil
import zipfile
from pathlib import Path

import yaml

from align.config import AlignConfig
from align.errors import CheckpointError
from align.run.tracking import config_dict

log = logging.getLogger("align")
_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")


def prepare(config: AlignConfig, *, is_main: bool = True) -> Path:
    """Create the run directory and write the resolved config (no secrets) into it."""
    out = Path(config.output_dir)
    if config.resume != "never":
        _check_same_run(out, config)
    if config.resume not in ("auto", "never"):
        _explicit_checkpoint(config.resume)  # fail before any model loads, not when training starts
    if is_main:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.yaml").write_text(yaml.safe_dump(config_dict(config), sort_keys=False))
    return out


def _check_same_run(out: Path, config: AlignConfig) -> None:
    """Resuming into a folder that holds another stage's or another model's run would mix them."""
    previous = out / "config.yaml"
    if not previous.is_file():
        return
    old = yaml.safe_load(previous.read_text()) or {}
    old_stage, old_model = old.get("stage_name"), (old.get("model") or {}).get("name_or_path")
    if (old_stage, old_model) != (config.stage_name, config.model.name_or_path):
        raise CheckpointError(
            f"output_dir {out} holds a {old_stage} run of {old_model}, not a {config.stage_name} run of "
            f"{config.model.name_or_path}; choose another output_dir or pass resume=never"
        )


def complete_checkpoints(checkpoints_dir: Path) -> list[Path]:
    """Checkpoints that finished writing, oldest first (a trainer_state.json is written last)."""
    if not checkpoints_dir.is_dir():
        return []
    found = []
    for path in checkpoints_dir.iterdir():
        match = _CHECKPOINT.match(path.name)
        if match and path.is_dir():
            if _is_complete(path):
                found.append((int(match.group(1)), path))
            else:
                log.warning("skipping incomplete checkpoint %s (a save was interrupted)", path)
    return [path for _, path in sorted(found)]


def publish_checkpoint(staged: Path, target: Path) -> None:
    """Move a whole checkpoint folder to its name in one rename (the main process, once every rank
    has written). A folder already there is a broken save that resume=auto skipped, or one from
    before a resume=never restart: it is set aside first and removed after."""
    old = target.with_name(f".replaced-{target.name}")
    if target.exists():
        shutil.rmtree(old, ignore_errors=True)
        target.replace(old)
    staged.replace(target)
    shutil.rmtree(old, ignore_errors=True)


def _is_complete(path: Path) -> bool:
    """The trainer state is written last and must parse; weights must be there beside it, and whole.

    Checkpoints are renamed into place only when whole (hf_trainer, ppo/checkpoint); these checks
    catch what a rename cannot: older runs, copies cut short, a disk that lost the tail of a file.
    """
    try:
        json.loads((path / "trainer_state.json").read_text())
    except (OSError, ValueError):
        return False
    files = [p for p in path.rglob("*") if p.is_file()]
    if not any(p.suffix in (".safetensors", ".pt", ".bin") for p in files):
        return False
    safetensors_whole = all(_safetensors_whole(p) for p in files if p.suffix == ".safetensors")
    # torch.save writes a zip whose directory is at the end: a cut file has none.
    return safetensors_whole and all(zipfile.is_zipfile(p) for p in files if p.suffix in (".pt", ".pth"))


def _safetensors_whole(path: Path) -> bool:
    """The header (8-byte length, then JSON) parses and the file is as long as its tensors need."""
    try:
        total = path.stat().st_size
        with path.open("rb") as f:
            size = int.from_bytes(f.read(8), "little")
            if total < 8 + size:
                return False
            header = json.loads(f.read(size))
        end = max((t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"), default=0)
    except (OSError, ValueError, KeyError, TypeError, IndexError, AttributeError):
        return False
    return total >= 8 + size + end


def resume_checkpoint(config: AlignConfig, out: Path) -> Path | None:
    """The checkpoint to continue from, per `resume=auto|never|PATH`."""
    if config.resume == "never":
        return None
    if config.resume == "auto":
        checkpoints = complete_checkpoints(out / "checkpoints")
        if checkpoints:
            log.info("resuming from %s", checkpoints[-1])
        return checkpoints[-1] if checkpoints else None
    return _explicit_checkpoint(config.resume)


def _explicit_checkpoint(resume: str) -> Path:
    path = Path(resume).expanduser()
    if not path.is_dir():
        raise CheckpointError(f"resume='{resume}' is not a directory (use auto, never or a checkpoint-N/ folder)")
    if not _is_complete(path):
        raise CheckpointError(
            f"resume='{resume}' is not a complete checkpoint (a checkpoint-N/ folder holds trainer_state.json "
            "and weights)"
        )
    return path
