"""The default job, shortened: `python -m align` runs SFT -> RM -> PPO and reports the gain."""

import json
import math
import shutil

from align.modeling.reward_model import EXAMPLE_COLUMNS
from tests.conftest import REPO, read_log, read_metrics
from tests.wandb_files import artifacts, offline_run, run_info, summary, table_rows

SHORT = [
    "train.max_steps=10",
    "train.save_steps=5",
    "logger=wandb",  # offline (conftest sets WANDB_MODE): the W&B files are checked below
    "pipeline.eval_max_new_tokens=12",
    "pipeline.ppo=['ppo.monitor_fn=align.tasks.sorting:gold_reward','train.max_steps=4','ppo.value_warmup_steps=1',"
    "'ppo.sample_every=2']",
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
    assert "n/a" not in summary, summary
    numbers = json.loads((out / "eval.json").read_text())
    for key in ("proxy_sft", "proxy_ppo", "gold_sft", "gold_ppo", "kl"):
        assert math.isfinite(numbers[key]), key
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

    _check_wandb(out)
    _check_rm_eval_in_wandb(run_align, out / "rm" / "final", tmp_path / "rm_eval")

    # The same command again: every stage is complete and skipped.
    manifests = {s: (out / s / "manifest.json").stat().st_mtime_ns for s in ("sft", "rm", "ppo")}
    evaluation = (out / "eval.json").read_text()
    second = run_align(*SHORT, f"output_dir={out}")
    assert (second.stdout + second.stderr).count("complete in") == 3
    assert {s: (out / s / "manifest.json").stat().st_mtime_ns for s in manifests} == manifests
    # ... and so is the held-out evaluation: nothing it was computed from changed.
    assert "held-out evaluation: stages, prompts and settings unchanged" in second.stdout + second.stderr
    assert (out / "eval.json").read_text() == evaluation
    assert (out / "summary.md").read_text() == summary

    # Without the PPO output only PPO runs again.
    shutil.rmtree(out / "ppo")
    third = run_align(*SHORT, f"output_dir={out}")
    assert (third.stdout + third.stderr).count("complete in") == 2
    assert "held-out evaluation: stages" not in third.stdout + third.stderr  # a new PPO policy: sampled again
    assert (out / "ppo" / "manifest.json").is_file()
    assert {s: (out / s / "manifest.json").stat().st_mtime_ns for s in ("sft", "rm")} == {
        s: manifests[s] for s in ("sft", "rm")
    }


def _check_wandb(out):
    """One W&B group for the pipeline, each run's job type its stage, manifests and sample tables logged."""
    runs = {stage: offline_run(out / stage) for stage in ("sft", "rm", "ppo")}
    runs["pipeline"] = offline_run(out)
    infos = {stage: run_info(run) for stage, run in runs.items()}
    assert {info.run_group for info in infos.values()} == {infos["pipeline"].run_group}
    assert infos["pipeline"].run_group.startswith("pipe-")  # the folder's name and its path's hash
    assert {stage: info.job_type for stage, info in infos.items()} == {stage: stage for stage in runs}
    assert summary(runs["pipeline"])["rm/eval/accuracy"] == read_metrics(out)["rm/eval/accuracy"]

    # Each stage's manifest reached W&B, equal to the manifest.json written after its run finished.
    for stage in ("sft", "rm", "ppo"):
        (logged,) = artifacts(runs[stage], "manifest")
        assert json.loads(logged.metadata) == json.loads((out / stage / "manifest.json").read_text()), stage
    (rm_manifest,) = artifacts(runs["rm"], "manifest")
    sft_weights = {e.ref for e in rm_manifest.manifest.contents if e.path.startswith("parents/init/")}
    assert (out / "sft" / "final" / "model.safetensors").resolve().as_uri() in sft_weights

    # Sample tables hold the same rows as samples.jsonl: the RM's held-out examples, PPO's every 2 steps.
    ((rm_step, rm_rows),) = table_rows(runs["rm"], "eval/examples")
    assert rm_step == read_metrics(out / "rm")["train/steps"] and rm_rows and set(rm_rows[0]) == set(EXAMPLE_COLUMNS)
    assert rm_rows == _samples(out / "rm", "eval/examples", rm_step)
    ppo_tables = table_rows(runs["ppo"], "ppo/samples")
    assert [step for step, _ in ppo_tables] == [2, 4]
    for step, rows in ppo_tables:
        assert rows == _samples(out / "ppo", "ppo/samples", step)
        # A response may be empty (the tiny policy can end at once); the prompt and its reward are always there.
        assert rows and all(row["prompt"] and isinstance(row["reward"], float) for row in rows)


def _check_rm_eval_in_wandb(run_align, reward_model, out):
    # 40 of the demo pairs: scoring all 1,500 would add most of a minute and check nothing more.
    out.mkdir()
    demo = (REPO / "data_recipes" / "demo" / "prefs.jsonl").read_text().splitlines(keepends=True)
    (out / "pairs.jsonl").write_text("".join(demo[:40]))
    recipe = out / "pairs.yaml"
    recipe.write_text("kind: preference\nsources:\n  - path: pairs.jsonl\n    format: preference\n")
    run_align(
        "stage=rm_eval",
        "model=tiny",
        f"rm.path={reward_model}",
        f"data.recipe={recipe}",
        "logger=wandb",
        f"output_dir={out}",
        env={"OMP_NUM_THREADS": "1"},
    )
    run = offline_run(out)
    assert run_info(run).job_type == "rm_eval"
    ((step, rows),) = table_rows(run, "eval/examples")
    assert rows == _samples(out, "eval/examples", step)
    assert len(rows) > 0 and {row["correct"] for row in rows} <= {True, False}
    manifest = json.loads((out / "manifest.json").read_text())
    (logged,) = artifacts(run, "manifest")
    assert json.loads(logged.metadata) == manifest
    assert manifest["parents"][0]["path"] == str(reward_model.resolve())
    assert manifest["parents"][0]["manifest"]["stage"] == "rm"
    assert manifest["metrics"]["eval/pairs"] == read_metrics(out)["eval/pairs"] == 40
    assert manifest["data"]["pairs"]["recipe"] == str(recipe)


def _samples(run_out, table, step):
    """The rows of one table at one step as samples.jsonl has them."""
    rows = [json.loads(line) for line in (run_out / "samples.jsonl").read_text().splitlines()]
    return [
        {k: v for k, v in row.items() if k not in ("table", "step")}
        for row in rows
        if row["table"] == table and row["step"] == step
    ]
