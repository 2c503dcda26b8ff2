"""The default job, shortened: `python -m align` runs SFT -> RM -> PPO and reports the gain."""

import json
import shutil

from tests.conftest import read_log

SHORT = [
    "train.max_steps=20",
    "train.save_steps=10",
    "pipeline.ppo=['ppo.monitor_fn=align.tasks.sorting:gold_reward','train.max_steps=6','ppo.value_warmup_steps=2']",
]
SUMMARY_ROWS = (
    "SFT eval loss",
    "RM held-out accuracy",
    "PPO proxy reward, SFT -> PPO policy (held-out)",
    "Gold score, SFT -> PPO policy (held-out)",
    "KL(PPO policy || reference), held-out",
    "Wall time, sft",
    "Wall time, rm",
    "Wall time, ppo",
)


def test_default_pipeline_runs_skips_and_reruns(run_align, tmp_path):
    out = tmp_path / "pipe"
    first = run_align(*SHORT, f"output_dir={out}")

    for stage in ("sft", "rm", "ppo"):
        assert (out / stage / "final").is_dir(), stage
        assert (out / stage / "manifest.json").is_file(), stage
    summary = (out / "summary.md").read_text()
    for row in SUMMARY_ROWS:
        assert f"| {row} |" in summary, row
    assert "Gold score" in first.stdout
    for png in ("ppo_reward_kl.png", "ppo_gold_vs_proxy.png", "rm_accuracy.png"):
        assert (out / png).stat().st_size > 1000, png
    assert "ppo/gold" in read_log(out / "ppo")[-1]

    # Lineage: the PPO policy traces back to the RM and SFT runs and their data.
    ppo = json.loads((out / "ppo" / "manifest.json").read_text())
    parents = {p["role"]: p for p in ppo["parents"]}
    assert parents["policy"]["path"] == str((out / "sft" / "final").resolve())
    assert parents["reward_model"]["path"] == str((out / "rm" / "final").resolve())
    sft_manifest = parents["policy"]["manifest"]
    assert sft_manifest["stage"] == "sft"
    assert sft_manifest["data"]["train"]["recipe"] == "demo_sft"
    assert len(sft_manifest["data"]["train"]["fingerprint"]) >= 8
    assert parents["reward_model"]["manifest"]["data"]["train"]["recipe"] == "demo_prefs"
    assert ppo["data"]["prompts"]["recipe_sha256"]
    assert ppo["config"]["ppo"]["policy"] == str(out / "sft" / "final")

    # The same command again: every stage is complete and skipped.
    manifests = {s: (out / s / "manifest.json").stat().st_mtime_ns for s in ("sft", "rm", "ppo")}
    second = run_align(*SHORT, f"output_dir={out}")
    assert (second.stdout + second.stderr).count("complete in") == 3
    assert {s: (out / s / "manifest.json").stat().st_mtime_ns for s in manifests} == manifests

    # Without the PPO output only PPO runs again.
    shutil.rmtree(out / "ppo")
    third = run_align(*SHORT, f"output_dir={out}")
    assert (third.stdout + third.stderr).count("complete in") == 2
    assert (out / "ppo" / "manifest.json").is_file()
    assert {s: (out / s / "manifest.json").stat().st_mtime_ns for s in ("sft", "rm")} == {
        s: manifests[s] for s in ("sft", "rm")
    }
