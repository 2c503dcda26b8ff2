"""`python -m align stage=rm` and `stage=rm_eval` on the tiny model, through the real entry point.

The demo preference set has 10% flipped labels (a perfect scorer gets ~0.88 of its held-out
pairs) and its pairs need a pretrained model to judge; these tests use a set a random tiny model
learns in a minute: the sorted answer against the same numbers wrapped in prose.
"""

import json
import math
import random
import subprocess
import sys

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForSequenceClassification

from align.config import ModelConfig
from align.modeling import models
from align.modeling import reward_model as rm
from align.modeling.chat import encode, render
from align.tasks import sorting
from tests.conftest import REPO, align_env, read_log, read_metrics

# One thread: on 2 shared cores, two OpenMP threads per run were several times slower.
ENV = {"OMP_NUM_THREADS": "1"}
STEPS = 30
# Measured: a random head starts uninformed (held-out loss 0.683 ~ log 2, margin 0.02, though a
# random model's small biases already rank 0.75 of these pairs right), 1.0 accuracy from step 30.
END_MIN = 0.9


def _pair(rng: random.Random) -> dict:
    numbers = [rng.randint(0, sorting.MAX_VALUE) for _ in range(rng.randint(3, 6))]
    answer = sorted(numbers)
    prose = rng.choice(("The sorted list is {}.", "Sure! {}", "I think: {}"))
    return {
        "prompt": rng.choice(sorting.PHRASINGS).format(" ".join(map(str, numbers))),
        "chosen": " ".join(map(str, answer)),
        "rejected": prose.format(", ".join(map(str, answer))),
    }


@pytest.fixture(scope="module")
def prefs(tmp_path_factory):
    """A learnable preference recipe (train + separate eval file) and one holding its eval pairs only."""
    folder = tmp_path_factory.mktemp("prefs")
    rng = random.Random(0)
    rows = [_pair(rng) for _ in range(1100)]
    for name, part in (("train", rows[:1000]), ("eval", rows[1000:])):
        (folder / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in part))
    source = "  - path: {}.jsonl\n    format: preference\n"
    recipe = folder / "learnable.yaml"
    recipe.write_text(
        "kind: preference\nsources:\n" + source.format("train") + "eval:\n  sources:\n" + source.format("eval")
    )
    eval_only = folder / "learnable_eval.yaml"
    eval_only.write_text("kind: preference\nsources:\n" + source.format("eval"))
    return recipe, eval_only


@pytest.fixture(scope="module")
def trained(prefs, tmp_path_factory, data_cache):
    """One tiny RM run shared by the tests below (run_align is function-scoped)."""
    out = tmp_path_factory.mktemp("rm") / "run"
    overrides = [
        "stage=rm",
        "model=tiny",
        f"data.recipe={prefs[0]}",
        f"train.max_steps={STEPS}",
        # fp32: the tests below compare rm_eval's scores (fp32) with this run's to 1e-4; a bf16 run
        # (auto on a CPU with AMX) agrees with them to ~1e-3.
        "train.precision=fp32",
        "train.eval_steps=30",
        "train.logging_steps=10",
        f"output_dir={out}",
    ]
    proc = subprocess.run(
        [sys.executable, "-m", "align", *overrides],
        cwd=REPO,
        capture_output=True,
        text=True,
        env=align_env(data_cache, **ENV),
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-6000:]
    return out


def _eval_rows(run_dir):
    return [row for row in read_log(run_dir) if "eval/accuracy" in row]


def test_rm_learns_held_out_pairs(trained):
    evals = _eval_rows(trained)
    start = evals[0]
    assert start["step"] == 0 and abs(start["eval/loss"] - math.log(2)) < 0.05, start
    assert abs(start["eval/margin"]) < 0.2, start
    metrics = read_metrics(trained)
    assert metrics["train/steps"] == STEPS
    for key in ("eval/accuracy", "eval/margin", "eval/reward_mean", "eval/reward_std", "eval/loss"):
        assert key in metrics
    assert metrics["eval/accuracy"] >= END_MIN, evals
    assert metrics["eval/margin"] > evals[0]["eval/margin"]
    samples = [json.loads(line) for line in (trained / "samples.jsonl").read_text().splitlines()]
    assert samples and samples[0]["table"] == "eval/examples" and "reward_chosen" in samples[0]


def test_final_reloads_with_auto_class_and_scores(trained):
    final = trained / "final"
    assert (final / "tokenizer.json").is_file()
    model = AutoModelForSequenceClassification.from_pretrained(final)
    assert model.config.num_labels == 1 and model.config.pad_token_id is not None
    chat = [{"role": "user", "content": "Sort: 5 3 9"}]
    good, bad = rm.score_conversations(
        final,
        [
            [*chat, {"role": "assistant", "content": "3 5 9"}],
            [*chat, {"role": "assistant", "content": "Sure! 3, 5, 9"}],
        ],
    )
    assert good > bad


def test_rm_eval_matches_the_runs_final_eval(trained, prefs, run_align, tmp_path):
    out = tmp_path / "rm_eval"
    run_align(
        "stage=rm_eval",
        "model=tiny",
        f"rm.path={trained / 'final'}",
        f"data.recipe={prefs[1]}",
        f"output_dir={out}",
        env=ENV,
    )
    scored, during_training = read_metrics(out), read_metrics(trained)
    assert scored["eval/pairs"] == 100
    for key in ("eval/accuracy", "eval/margin", "eval/reward_mean", "eval/reward_std", "eval/loss"):
        assert scored[key] == pytest.approx(during_training[key], abs=1e-4), key


def test_fine_tune_starts_from_the_pmp_run(trained, prefs, run_align, tmp_path):
    # Stage 2 of PMP: the first eval (before any step) sees exactly the first run's final model.
    out = tmp_path / "finetune"
    run_align(
        "stage=rm",
        "model=tiny",
        f"rm.init_from={trained / 'final'}",
        "train.precision=fp32",  # its first evaluation is compared with the PMP run's to 1e-4
        f"data.recipe={prefs[0]}",
        "train.max_steps=2",
        "train.eval_steps=30",
        f"output_dir={out}",
        env=ENV,
    )
    start = _eval_rows(out)[0]
    assert start["step"] == 0
    pmp = read_metrics(trained)
    for key in ("eval/accuracy", "eval/margin", "eval/reward_mean", "eval/reward_std"):
        assert start[key] == pytest.approx(pmp[key], abs=1e-4), key


def test_lora_adapter_and_head_reload_and_reproduce_the_scores(prefs, run_align, tmp_path):
    out = tmp_path / "lora"
    run_align(
        "stage=rm",
        "peft=lora",
        "peft.r=8",
        "peft.alpha=16",
        "train.precision=fp32",  # compared with rm_eval to 1e-4, as above
        f"data.recipe={prefs[0]}",
        "train.max_steps=10",
        "train.eval_steps=0",
        f"output_dir={out}",
        env=ENV,
    )
    final = out / "final"
    assert (final / "adapter_model.safetensors").is_file() and not (final / "model.safetensors").exists()
    adapter = json.loads((final / "adapter_config.json").read_text())
    assert adapter["task_type"] == "SEQ_CLS" and "score" in adapter["modules_to_save"]
    metrics = read_metrics(out)
    # Reload by hand (base + adapter + head), score the held-out pairs, compare with the run's own.
    base = AutoModelForSequenceClassification.from_pretrained(adapter["base_model_name_or_path"])
    model = PeftModel.from_pretrained(base, str(final)).eval()
    _, eval_only = prefs
    scored = tmp_path / "scored"
    run_align(
        "stage=rm_eval", "model=tiny", f"rm.path={final}", f"data.recipe={eval_only}", f"output_dir={scored}", env=ENV
    )
    assert read_metrics(scored)["eval/margin"] == pytest.approx(metrics["eval/margin"], abs=1e-4)
    rows = [json.loads(line) for line in (scored / "samples.jsonl").read_text().splitlines()]
    tokenizer = models.load_tokenizer(ModelConfig(name_or_path=str(final)))
    conv = [
        {"role": "user", "content": rows[0]["prompt"]},
        {"role": "assistant", "content": rows[0]["chosen"]},
    ]
    ids = rm.trim_to_end_of_turn(encode(tokenizer, render(tokenizer, conv, False)), tokenizer.eos_token_id)
    with torch.no_grad():
        reward = rm.rewards_at_last_token(model, torch.tensor([ids]), torch.ones(1, len(ids), dtype=torch.long))
    assert reward.item() == pytest.approx(rows[0]["reward_chosen"], abs=1e-3)


def test_margin_column_enters_the_loss(run_align, tmp_path):
    """rm.margin=true subtracts each pair's `margin` inside the loss, -log sigmoid(r_c - r_r - margin). A
    new head scores both sides of a pair about alike, so the first step's loss is about log(1 + e^3) for a
    margin of 3, and log 2 without: rm.margin=false on a mixture where some pairs have none trains too."""
    rng = random.Random(0)
    (tmp_path / "margin.jsonl").write_text("".join(json.dumps({**_pair(rng), "margin": 3.0}) + "\n" for _ in range(32)))
    (tmp_path / "plain.jsonl").write_text("".join(json.dumps(_pair(rng)) + "\n" for _ in range(4)))
    source = "  - path: {}.jsonl\n    format: preference\n"
    (tmp_path / "margin.yaml").write_text("kind: preference\nsources:\n" + source.format("margin"))
    (tmp_path / "mixed.yaml").write_text(
        "kind: preference\nsources:\n" + source.format("margin") + source.format("plain")
    )
    first_loss = {}
    for recipe, margin in (("margin", "true"), ("mixed", "false")):
        out = tmp_path / recipe
        run_align("stage=rm", "model=tiny", f"data.recipe={tmp_path / recipe}.yaml", f"rm.margin={margin}",
                  "train.max_steps=1", "train.logging_steps=1", "train.eval_steps=0", f"output_dir={out}",
                  env=ENV)  # fmt: skip
        (first,) = [row for row in read_log(out) if "train/loss" in row and row["step"] == 1]
        first_loss[recipe] = first["train/loss"]
    assert first_loss["margin"] == pytest.approx(math.log1p(math.exp(3.0)), abs=0.15), first_loss
    assert first_loss["mixed"] == pytest.approx(math.log(2), abs=0.15), first_loss
