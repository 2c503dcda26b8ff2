"""`python -m align stage=dpo` on the tiny model, through the real entry point.

The pairs are ones a random tiny model tells apart within a few steps: the sorted answer against
the same numbers wrapped in prose. At the first step the policy is its reference, so every
implicit reward is 0 and each loss has a known value: log 2 for DPO, (1 / (2 beta))^2 for IPO.
"""

from __future__ import annotations

import json
import math
import random
import signal
import time

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from align.config import ModelConfig
from align.modeling import models
from align.run.rundir import complete_checkpoints
from align.tasks import sorting
from tests.conftest import REPO, align_env, preloaded_python, read_log, read_metrics
from tests.e2e.test_errors import assert_one_line_error

TINY = ModelConfig(name_or_path=str(REPO / "align" / "assets" / "tiny"), init="random")
EVAL_PAIRS = 20  # batches of 8, 8 and 4
# lr 1e-4 (10x dpo_tiny's, which is for an SFT policy): 8 steps from the random init learn the pairs.
COMMON = ["stage=dpo", "model=tiny", "train.precision=fp32", "train.batch_size=8", "train.warmup_steps=0",
          "train.lr=1e-4"]  # fmt: skip
REWARDS = ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies")


def _pair(rng: random.Random) -> dict:
    numbers = [rng.randint(0, sorting.MAX_VALUE) for _ in range(rng.randint(3, 6))]
    answer = sorted(numbers)
    return {
        "prompt": rng.choice(sorting.PHRASINGS).format(" ".join(map(str, numbers))),
        "chosen": " ".join(map(str, answer)),
        "rejected": rng.choice(("The sorted list is {}.", "Sure! {}")).format(", ".join(map(str, answer))),
    }


@pytest.fixture(scope="module")
def prefs(tmp_path_factory):
    """A learnable preference recipe: 64 training pairs, a separate file of held-out ones."""
    folder = tmp_path_factory.mktemp("dpo_prefs")
    rng = random.Random(0)
    rows = [_pair(rng) for _ in range(64 + EVAL_PAIRS)]
    for name, part in (("train", rows[:64]), ("eval", rows[64:])):
        (folder / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in part))
    source = "  - path: {}.jsonl\n    format: preference\n"
    recipe = folder / "prefs.yaml"
    recipe.write_text(
        "kind: preference\nsources:\n" + source.format("train") + "eval:\n  sources:\n" + source.format("eval")
    )
    return f"data.recipe={recipe}"


def _first_train_row(out) -> dict:
    return next(row for row in read_log(out) if "train/loss" in row)


def test_dpo_trains_logs_and_writes_a_policy(run_align, prefs, tmp_path):
    out = tmp_path / "dpo"
    proc = run_align(*COMMON, prefs, "train.max_steps=8", "train.logging_steps=2", "train.eval_steps=4",
                     "train.save_steps=100", f"output_dir={out}")  # fmt: skip
    assert "reference: a frozen copy of the policy" in proc.stdout + proc.stderr

    rows = read_log(out)
    train = [r for r in rows if "train/loss" in r]
    evals = [r for r in rows if "eval/loss" in r]
    assert [r["step"] for r in train] == [1, 2, 4, 6, 8] and [r["step"] for r in evals] == [4, 8], rows
    for row in train:
        assert all(math.isfinite(row[f"train/{k}"]) for k in REWARDS), row
    for row in evals:
        assert all(math.isfinite(row[f"eval/{k}"]) for k in REWARDS), row
    # Step 1: the policy is its reference, every implicit reward 0 and the loss log 2.
    assert train[0]["train/loss"] == pytest.approx(math.log(2), abs=1e-4)
    assert train[0]["train/rewards/margins"] == pytest.approx(0, abs=1e-4)
    # Then it learns: chosen above rejected, on held-out pairs too.
    assert train[-1]["train/loss"] < math.log(2) - 0.1 and train[-1]["train/rewards/margins"] > 0.1, train
    assert evals[-1]["eval/rewards/accuracies"] >= 0.8 and evals[-1]["eval/rewards/margins"] > 0.1, evals

    metrics = read_metrics(out)
    assert metrics["train/steps"] == 8
    assert metrics["eval/rewards/margins"] == evals[-1]["eval/rewards/margins"]  # the last evaluation, not rerun
    assert not any("runtime" in k for k in metrics), metrics
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["stage"] == "dpo" and manifest["data"]["train"]["fingerprint"]
    assert not list((out / "checkpoints").glob("checkpoint-*")), "no checkpoint after the last step"

    # final/ is an ordinary causal LM, moved away from where it started (the seed's random init).
    trained = AutoModelForCausalLM.from_pretrained(out / "final")
    tokenizer = models.load_tokenizer(ModelConfig(name_or_path=str(out / "final")))
    start = models.load_causal_lm(TINY, tokenizer, seed=42)
    before, after = start.state_dict(), trained.state_dict()
    assert before.keys() == after.keys()
    assert any(not torch.equal(before[k], after[k]) for k in before)


def test_other_losses_run_and_a_bad_one_is_one_line(run_align, prefs, tmp_path):
    # IPO at the first step: (0 - 1 / (2 beta))^2 = 4 with beta 0.25, so the loss and beta reach TRL.
    ipo = tmp_path / "ipo"
    run_align(*COMMON, prefs, "dpo.loss_type=ipo", "dpo.beta=0.25", "train.max_steps=2", "train.logging_steps=1",
              "train.eval_steps=0", f"output_dir={ipo}")  # fmt: skip
    assert _first_train_row(ipo)["train/loss"] == pytest.approx(4.0, abs=1e-3)
    assert math.isfinite(read_metrics(ipo)["eval/loss"])

    # Robust DPO reads label_smoothing; with the reference's log-probs computed before training.
    robust = tmp_path / "robust"
    proc = run_align(*COMMON, prefs, "dpo.loss_type=robust", "dpo.label_smoothing=0.1",
                     "dpo.precompute_ref_log_probs=true", "train.max_steps=2", "train.logging_steps=1",
                     "train.eval_steps=0", f"output_dir={robust}")  # fmt: skip
    assert "reference: log-probs precomputed" in proc.stdout + proc.stderr
    assert _first_train_row(robust)["train/loss"] == pytest.approx(math.log(2), abs=1e-4)
    assert math.isfinite(read_metrics(robust)["eval/rewards/margins"])
    assert json.loads((robust / "manifest.json").read_text())["config"]["dpo"]["label_smoothing"] == 0.1

    bad = run_align("stage=dpo", "dpo.loss_type=dpo", f"output_dir={tmp_path / 'bad'}", check=False)
    assert_one_line_error(bad, "ConfigError", "dpo.loss_type 'dpo' is not one of sigmoid, hinge, ipo")
    # TRL 1.16's sigmoid loss ignores label_smoothing: asking for it there is refused, not dropped silently.
    ignored = run_align("stage=dpo", "dpo.label_smoothing=0.1", f"output_dir={tmp_path / 'ignored'}", check=False)
    assert_one_line_error(ignored, "ConfigError", "loss_type sigmoid ignores it")
    assert not (tmp_path / "bad").exists() and not (tmp_path / "ignored").exists()


def test_lora_trains_an_adapter_against_the_base_with_no_copy(run_align, prefs, tmp_path):
    out = tmp_path / "lora"
    proc = run_align(*COMMON, prefs, "peft=lora", "peft.r=8", "train.max_steps=4", "train.logging_steps=1",
                     "train.eval_steps=0", f"output_dir={out}")  # fmt: skip
    assert "reference: the policy with its adapter off (no copy)" in proc.stdout + proc.stderr
    # A new adapter adds nothing yet: the first step's policy equals the reference (loss log 2).
    assert _first_train_row(out)["train/loss"] == pytest.approx(math.log(2), abs=1e-4)

    final = out / "final"
    assert (final / "adapter_model.safetensors").is_file() and not (final / "model.safetensors").exists()
    assert not [p for p in final.iterdir() if p.is_dir()], "one adapter only: no frozen 'ref' twin saved"
    weights = load_file(final / "adapter_model.safetensors")
    assert weights and all("lora_" in k and ".ref." not in k for k in weights), sorted(weights)[:4]
    assert any(k.endswith("lora_B.weight") and v.abs().sum() > 0 for k, v in weights.items()), "adapter trained"
    adapter = json.loads((final / "adapter_config.json").read_text())
    assert adapter["base_model_name_or_path"] == str((out / "base").resolve())
    base = AutoModelForCausalLM.from_pretrained(adapter["base_model_name_or_path"])
    model = PeftModel.from_pretrained(base, str(final))
    assert list(model.peft_config) == ["default"]


def test_preempted_run_resumes_to_the_uninterrupted_weights(run_align, prefs, tmp_path, data_cache):
    steps = ["train.max_steps=6", "train.logging_steps=1", "train.eval_steps=0", "train.save_steps=100"]
    straight = tmp_path / "straight"
    run_align(*COMMON, prefs, *steps, f"output_dir={straight}")

    out = tmp_path / "preempted"
    overrides = [*COMMON, prefs, *steps, f"output_dir={out}"]
    env = align_env(data_cache, OMP_NUM_THREADS="1")
    proc = preloaded_python(data_cache).start(overrides, env, tmp_path / "preempted.output")
    deadline = time.monotonic() + 300
    while not (out / "log.jsonl").is_file() or not (out / "log.jsonl").read_text().strip():
        assert proc.poll() is None and time.monotonic() < deadline, (tmp_path / "preempted.output").read_text()
        time.sleep(0.05)
    proc.send_signal(signal.SIGUSR1)  # as SLURM does: finish the step, checkpoint, exit for requeue
    assert proc.wait(timeout=300) == 75, (tmp_path / "preempted.output").read_text()[-4000:]
    (checkpoint,) = complete_checkpoints(out / "checkpoints")
    stopped = int(checkpoint.name.removeprefix("checkpoint-"))
    assert 1 <= stopped < 6 and not (out / "final").exists()

    resumed = run_align(*overrides)  # resume=auto, the default
    assert f"resuming from {checkpoint}" in resumed.stdout + resumed.stderr
    steps_logged = [row["step"] for row in read_log(out) if "train/loss" in row]
    assert steps_logged == [*range(1, stopped + 1), *range(stopped + 1, 7)], steps_logged
    assert read_metrics(out)["train/steps"] == 6
    expected, got = load_file(straight / "final" / "model.safetensors"), load_file(out / "final" / "model.safetensors")
    differ = [k for k in expected if not torch.equal(expected[k], got[k])]
    assert not differ, f"{len(differ)} tensors differ after preemption and resume, e.g. {differ[:3]}"


def test_pipeline_sft_then_dpo_from_the_sft_policy(run_align, tmp_path):
    out = tmp_path / "pipe"
    run_align("pipeline.stages=[sft,dpo]", "train.max_steps=2", "train.eval_steps=0", "train.save_steps=100",
              "pipeline.eval_max_new_tokens=8", f"output_dir={out}")  # fmt: skip
    for stage in ("sft", "dpo"):
        assert (out / stage / "manifest.json").is_file(), stage
    assert not (out / "rm").exists() and not (out / "ppo").exists()
    dpo = json.loads((out / "dpo" / "manifest.json").read_text())
    assert dpo["config"]["dpo"]["policy"] == str(out / "sft" / "final")
    (parent,) = dpo["parents"]
    assert parent["role"] == "policy" and parent["path"] == str((out / "sft" / "final").resolve())
    assert parent["manifest"]["stage"] == "sft" and parent["manifest"]["data"]["train"]["recipe"] == "demo_sft"
    assert dpo["data"]["train"]["recipe"] == "demo_prefs"
    # The DPO run's start-up block: the SFT policy's weights, not the tiny preset's random init.
    plan = [line.strip() for line in (out / "cli.log").read_text().splitlines()]
    start = f"model:     {out / 'sft' / 'final'} (Qwen2ForCausalLM, 3.3M parameters, pretrained weights, float32)"
    assert start in plan
    metrics = read_metrics(out)
    assert metrics["dpo/train/steps"] == 2 and math.isfinite(metrics["dpo/eval/rewards/accuracies"])
    # The held-out evaluation compares the DPO policy with the SFT policy, as the default job's does PPO's.
    summary = (out / "summary.md").read_text()
    for row in ("DPO held-out preference accuracy", "Gold score, SFT -> DPO policy (held-out)",
                "KL(DPO policy || reference), held-out", "Wall time, dpo"):  # fmt: skip
        assert f"| {row} |" in summary, summary
    assert "n/a" not in summary and "proxy" not in summary, summary  # no reward model in this pipeline
    evaluation = json.loads((out / "eval.json").read_text())
    assert evaluation["prompts"] == 200 and all(math.isfinite(evaluation[k]) for k in ("gold_sft", "gold_dpo", "kl"))
