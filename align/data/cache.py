"""The processed-data cache: one folder per (recipe content, sources, kind, limits, tokenizer).

Rank 0 prepares and publishes the folder with an atomic rename, a ``complete`` marker inside;
other ranks poll for the marker, so a multi-rank run tokenises once and a re-run not at all.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import datasets

from align.data.report import RecipeData, SourceReport
from align.errors import DataError

log = logging.getLogger("align.data")
# Bump when the processing changes what a cached folder would hold.
# 2: prompt rows carry their source row's other columns; 3: and its prompt format; 4: preference rows their margin
CACHE_VERSION = 4
MARKER = "complete"
POLL_S = 1.0


def default_cache_dir() -> Path:
    return Path(os.environ.get("ALIGN_CACHE_DIR") or Path.home() / ".cache" / "align" / "data")


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """Vocabulary, special tokens and chat template: everything that changes the token ids."""
    h = hashlib.sha256()
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        h.update(backend.to_str().encode())
    else:
        h.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    h.update(json.dumps([tokenizer.chat_template, tokenizer.all_special_tokens, type(tokenizer).__name__]).encode())
    return h.hexdigest()


def cache_key(parts: dict[str, Any]) -> str:
    blob = json.dumps({"version": CACHE_VERSION, **parts}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:24]


def load_or_prepare(folder: Path, prepare: Callable[[], RecipeData]) -> RecipeData:
    rank = int(os.environ.get("RANK", "0"))
    if (folder / MARKER).exists():
        log.info("data cache hit: %s", folder)
        return _load(folder)
    if rank != 0:
        return _wait_and_load(folder, rank)
    data = prepare()
    _save(folder, data)
    return data


def _wait_and_load(folder: Path, rank: int) -> RecipeData:
    timeout = float(os.environ.get("ALIGN_DATA_WAIT_S", "3600"))
    log.info("rank %d waiting for rank 0 to prepare %s", rank, folder)
    deadline = time.monotonic() + timeout
    while not (folder / MARKER).exists():
        if time.monotonic() > deadline:
            raise DataError(
                f"rank {rank} waited {timeout:.0f}s for rank 0 to prepare the data at {folder}; "
                "check rank 0's log (ALIGN_DATA_WAIT_S sets the wait)"
            )
        time.sleep(POLL_S)
    return _load(folder)


def _save(folder: Path, data: RecipeData) -> None:
    # Build beside the target and rename, so a reader never sees a half-written folder.
    tmp = folder.with_name(f"{folder.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    bars_were_on = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()  # a bar per split per run only clutters the stage's log
    try:
        data.train.save_to_disk(str(tmp / "train"))
        if data.eval is not None:
            data.eval.save_to_disk(str(tmp / "eval"))
    finally:
        if bars_were_on:
            datasets.enable_progress_bars()
    meta = {"fingerprint": data.fingerprint, "reports": [asdict(r) for r in data.reports]}
    (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
    (tmp / MARKER).write_text("")
    try:
        tmp.rename(folder)
    except OSError:  # another process published the same key first; its copy is as good
        shutil.rmtree(tmp, ignore_errors=True)


def _load(folder: Path) -> RecipeData:
    meta = json.loads((folder / "meta.json").read_text())
    eval_path = folder / "eval"
    return RecipeData(
        train=datasets.load_from_disk(str(folder / "train")),
        eval=datasets.load_from_disk(str(eval_path)) if eval_path.exists() else None,
        reports=[SourceReport(**r) for r in meta["reports"]],
        fingerprint=meta["fingerprint"],
    )
