"""No secret set in the environment lands in any file a run writes (configs, logs, W&B, checkpoints),
even when it is also typed on the command line."""

from __future__ import annotations

import secrets
from pathlib import Path


def files_containing(root: Path, needle: str) -> list[str]:
    files = (p for p in root.rglob("*") if p.is_file())
    return sorted(p.relative_to(root).as_posix() for p in files if needle.encode() in p.read_bytes())


def test_secrets_are_never_written(run_align, tmp_path):
    wandb_key = f"sk-test-{secrets.token_hex(12)}"  # 24 random characters after the prefix
    hf_token = f"hf_{secrets.token_hex(16)}"
    canary = f"group-{secrets.token_hex(8)}"  # not a secret: shows the scan reads every kind of file
    out = tmp_path / "run"
    run_align(
        "stage=sft",
        "logger=wandb",
        "train.max_steps=3",
        "train.batch_size=4",
        "train.logging_steps=1",
        "train.save_steps=2",
        f"logger.group={canary}",
        # Typed on the command line as well: Hydra's .hydra/ and W&B's record of argv must not keep it.
        f"logger.name={wandb_key}",
        f"output_dir={out}",
        env={"WANDB_API_KEY": wandb_key, "HF_TOKEN": hf_token, "WANDB_MODE": "offline"},
    )
    written = [p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()]
    # The scan covers every kind of file a run writes, or it proves nothing.
    for expected in ("config.yaml", "manifest.json", "log.jsonl", ".hydra/config.yaml", ".hydra/overrides.yaml"):
        assert expected in written, written
    assert any(p.startswith("checkpoints/checkpoint-2/") for p in written), written
    assert any(p.startswith("final/") for p in written), written
    assert any(p.startswith("wandb/") and p.endswith(".wandb") for p in written), written

    seen = files_containing(out, canary)
    assert {"config.yaml", ".hydra/overrides.yaml"} <= set(seen), seen
    assert any(p.endswith(".wandb") for p in seen), seen  # W&B's binary run log stores strings as-is

    assert files_containing(out, wandb_key) == []
    assert files_containing(out, hf_token) == []
