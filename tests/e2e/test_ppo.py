"""`python -m align stage=ppo` on the tiny model: learning, logging, the non-finite guard (kill-and-resume:
test_kill_resume.py)."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from align.config import ModelConfig
from align.modeling import models
from align.modeling.reward_model import load_reward_model, text_rewards
from tests.conftest import REPO, align_env, align_runner, read_log, read_metrics
from tests.e2e.test_errors import assert_one_line_error
from tests.unit.test_reward_tokenizer import reward_model_of_another_tokenizer

BREVITY = "ppo.reward_fn=tests.rewards:brevity"


def _mean(rows, key):
    return sum(r[key] for r in rows) / len(rows)


@pytest.fixture(scope="module")
def brevity_runs(tmp_path_factory, data_cache):
    """PPO steps on the brevity reward from the random tiny model, by precision, run once each."""
    runs: dict[str, Path] = {}

    def run(precision: str, steps: int) -> Path:
        if precision not in runs:
            out = tmp_path_factory.mktemp(f"ppo-{precision}")
            align_runner(data_cache)(
                "stage=ppo",
                BREVITY,
                "ppo.monitor_fn=align.tasks.sorting:gold_reward",
                f"train.max_steps={steps}",
                "ppo.kl_coef=0.01",
                "ppo.sample_every=5",
                f"train.precision={precision}",
                f"output_dir={out}",
            )
            runs[precision] = out
        return runs[precision]

    return run


# The fp32 run's length: over 14 steps (9 after the critic warm-up) bf16 on a CPU with AVX512-BF16
# gained 0.099, at the edge of the bar; emulated bf16 (a CPU without) costs ~2x an fp32 run.
BF16_STEPS = 20


def test_ppo_in_bf16_learns_as_fp32_does_from_the_same_seed(brevity_runs):
    """Measured over 20 steps (2026-12-04, a CPU with AVX512-BF16): mean reward of the first 5 steps
    0.024 in both, of steps 16-20 0.41 (bf16) and 0.44 (fp32); per step the two agree to 0.06, the
    same responses sampled until the policy has moved (sampling is fp32 on a CPU either way)."""
    fp32 = read_log(brevity_runs("fp32", 20))[:BF16_STEPS]
    bf16 = read_log(brevity_runs("bf16", BF16_STEPS))
    rewards = {name: [r["ppo/reward_raw"] for r in log] for name, log in (("fp32", fp32), ("bf16", bf16))}
    print(rewards)
    assert len(rewards["bf16"]) == BF16_STEPS
    assert rewards["bf16"][0] == rewards["fp32"][0]  # step 1 samples from the same fp32 weights
    assert sum(rewards["bf16"][-5:]) / 5 > sum(rewards["bf16"][:5]) / 5 + 0.1
    assert all(abs(a - b) < 0.15 for a, b in zip(rewards["bf16"], rewards["fp32"], strict=True))
    assert [r["ppo/value_loss"] for r in bf16] != [r["ppo/value_loss"] for r in fp32]  # bf16 really ran


def test_ppo_raises_the_reward_and_logs_everything(brevity_runs):
    # From the random tiny model: the brevity reward is learnable without SFT (0.02 -> 0.51 measured).
    out = brevity_runs("fp32", 20)
    log = read_log(out)
    assert [r["step"] for r in log] == list(range(1, 21))
    start, end = _mean(log[:5], "ppo/reward_raw"), _mean(log[-5:], "ppo/reward_raw")
    assert end > start + 0.25, (start, end)
    assert "ppo/gold" in log[-1]
    kls = [r["ppo/kl"] for r in log]
    assert all(abs(k) < 1e-6 for k in kls[:5]), "during critic warm-up the policy equals the reference"
    assert 0 < _mean(log[-5:], "ppo/kl") < 50
    for key in (
        "ppo/reward_norm",
        "ppo/entropy",
        "ppo/policy_loss",
        "ppo/value_loss",
        "ppo/clipfrac",
        "ppo/vf_clipfrac",
        "ppo/approx_kl",
        "ppo/response_length",
        "ppo/eos_rate",
        "ppo/explained_variance",
        "ppo/kl_coef",
        "time/generate",
        "time/score",
        "time/update",
    ):
        assert key in log[-1], key
    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert {s["step"] for s in samples} == {5, 10, 15, 20}
    assert all({"prompt", "response", "reward"} <= s.keys() for s in samples)
    metrics = read_metrics(out)
    assert metrics["ppo/reward_end"] > metrics["ppo/reward_start"]
    assert (out / "final" / "model.safetensors").is_file()
    assert (out / "final" / "value" / "model.safetensors").is_file()
    assert (out / "final" / "tokenizer.json").is_file()


def test_packed_rows_train_like_padded_rows(run_align, tmp_path):
    """Packing (the default with SDPA) changes float rounding only; eager attention falls back to
    padded rows. The first rollout is sampled alike, so its update must agree to rounding."""
    # fp32: the two layouts round differently, and bf16 rounding (auto on a CPU with AMX) is coarser
    # than the tolerance that tells a layout bug from rounding.
    common = (BREVITY, "train.max_steps=1", "ppo.max_new_tokens=16", "ppo.value_warmup_steps=0", "train.precision=fp32")
    common += ("ppo.epochs=2", "ppo.mini_batches=2")
    logs = {}
    for name, attention in (("packed", "sdpa"), ("padded", "eager")):
        out = tmp_path / name
        run_align("stage=ppo", *common, f"model.attn_implementation={attention}", f"output_dir={out}")
        assert ("ppo.packing: padded rows" in (out / "cli.log").read_text()) == (name == "padded")
        logs[name] = read_log(out)[0]
        assert "align_packed_sdpa" not in (out / "final" / "config.json").read_text()
    packed, padded = logs["packed"], logs["padded"]
    assert packed["ppo/reward_raw"] == padded["ppo/reward_raw"]
    for key in (
        "ppo/kl",
        "ppo/policy_loss",
        "ppo/value_loss",
        "ppo/entropy",
        "ppo/approx_kl",
        "ppo/explained_variance",
    ):
        assert math.isclose(packed[key], padded[key], rel_tol=1e-3, abs_tol=1e-5), (key, packed[key], padded[key])


def test_lora_ppo_trains_an_adapter_against_its_own_base(run_align, tmp_path):
    """The reference is the policy with its adapter off: KL is exactly 0 until the adapter moves.
    final/ holds the adapter, merged/ the base with it folded in, value/ the value model."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    from align.config import REPO_ROOT, ModelConfig
    from align.modeling import models

    out = tmp_path / "lora"
    steps = ("train.max_steps=4", "ppo.value_warmup_steps=2", "train.lr=1e-3", "ppo.max_new_tokens=16")
    run_align("stage=ppo", BREVITY, "peft=lora", "peft.r=8", "peft.merge=true", *steps, f"output_dir={out}")
    log = read_log(out)
    assert [r["ppo/kl"] for r in log[:3]] == [0.0, 0.0, 0.0]  # warm-up, then the first policy update
    assert log[3]["ppo/kl"] > 0

    final = out / "final"
    assert (final / "adapter_model.safetensors").is_file() and not (final / "model.safetensors").exists()
    AutoModelForSequenceClassification.from_pretrained(final / "value")
    # The random tiny base again (same config and seed as the run), with the saved adapter on top.
    tiny = ModelConfig(name_or_path=str(REPO_ROOT / "align" / "assets" / "tiny"), init="random")
    tokenizer = models.load_tokenizer(tiny)
    base = models.load_causal_lm(tiny, tokenizer, seed=42)  # model=tiny, the default seed
    adapted = PeftModel.from_pretrained(base, final).eval()
    merged = AutoModelForCausalLM.from_pretrained(final / "merged").eval()
    ids = torch.tensor([tokenizer("Sort: 4 7 1")["input_ids"]])
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, adapted(ids).logits, rtol=1e-4, atol=1e-4)
        with adapted.disable_adapter():
            assert not torch.allclose(merged(ids).logits, adapted(ids).logits, atol=1e-4)


def test_ppo_recipe_options_run_together(run_align, tmp_path):
    """The PTX loss on an SFT recipe, a value model started from the policy, the adaptive KL
    controller and clipped, standardised rewards, in one short run."""
    out = tmp_path / "options"
    run_align(
        "stage=ppo",
        BREVITY,
        "train.max_steps=3",
        "ppo.value_warmup_steps=1",
        "ppo.max_new_tokens=16",
        "ppo.ptx_coef=0.5",
        "ppo.ptx_data=demo_sft",
        "ppo.value_init=policy",
        "ppo.adaptive_kl=true",
        "ppo.kl_target=0.01",
        "ppo.kl_horizon=100",
        "ppo.reward_norm_std=true",
        "ppo.reward_clip=1.0",
        f"output_dir={out}",
    )
    log = read_log(out)
    assert "ppo/ptx_loss" not in log[0]  # critic warm-up: the policy, and its PTX loss, wait
    assert all(math.isfinite(r["ppo/ptx_loss"]) and r["ppo/ptx_loss"] > 0 for r in log[1:])
    assert all(abs(r["ppo/reward_norm"]) <= 1.0 for r in log)
    # Ziegler et al. (2019): e = clip(KL / target - 1, -0.2, 0.2), beta *= 1 + e * n / horizon, with n the
    # step's responses; beta rises when the step's KL is above the target and falls when below.
    ppo = yaml.safe_load((out / "config.yaml").read_text())["ppo"]
    n = ppo["prompts_per_step"] * ppo["responses_per_prompt"]
    beta, target = ppo["kl_coef"], ppo["kl_target"]
    for r in log:
        error = min(max(r["ppo/kl"] / target - 1.0, -0.2), 0.2)
        assert r["ppo/kl_coef"] == pytest.approx(beta * (1.0 + error * n / ppo["kl_horizon"]), rel=1e-12), r
        assert (r["ppo/kl_coef"] > beta) == (r["ppo/kl"] > target), r
        beta = r["ppo/kl_coef"]
    assert log[0]["ppo/kl"] < target < log[-1]["ppo/kl"]  # both directions seen: warm-up KL 0, then the policy moves
    value = json.loads((out / "final" / "value" / "config.json").read_text())
    assert value["architectures"] == ["Qwen2ForSequenceClassification"]


def test_the_policy_lr_schedule_starts_when_the_policy_trains(run_align, tmp_path):
    """The policy is frozen while the critic warms up, so its schedule waits: a linear decay over the 2
    policy steps of a 4-step run with 2 warm-up steps trains with lr, then lr / 2 (ppo/lr: the rate of
    the step's policy update)."""
    out = tmp_path / "ppo"
    run_align("stage=ppo", BREVITY, "train.max_steps=4", "ppo.value_warmup_steps=2", "train.lr_scheduler=linear",
              "train.warmup_steps=0", "train.warmup_ratio=0", "train.lr=1e-4", "ppo.prompts_per_step=2",
              "train.batch_size=2", "ppo.max_new_tokens=4", "ppo.epochs=1", "ppo.mini_batches=1",
              f"output_dir={out}")  # fmt: skip
    log = read_log(out)
    assert [r["ppo/policy_trained"] for r in log] == [0.0, 0.0, 1.0, 1.0]
    assert [r["ppo/lr"] for r in log] == pytest.approx([1e-4, 1e-4, 1e-4, 5e-5], rel=1e-9)


def test_a_cut_off_response_pays_the_missing_eos_penalty_after_normalisation(run_align, tmp_path):
    """The default ppo.missing_eos_penalty (1.0) lowers the normalised score of each response cut off at
    ppo.max_new_tokens. A constant reward normalises to 0, so each step's mean normalised score is
    -1.0 x the share cut off, however many were cut: the running mean cannot absorb the penalty."""
    out = tmp_path / "ppo"
    run_align("stage=ppo", "ppo.reward_fn=tests.rewards:constant", "train.max_steps=2", "ppo.prompts_per_step=2",
              "train.batch_size=2", "ppo.max_new_tokens=3", "ppo.value_warmup_steps=0",
              f"output_dir={out}")  # fmt: skip
    log = read_log(out)
    assert [r["ppo/reward_raw"] for r in log] == [0.5, 0.5]  # what the reward read, penalty apart
    assert any(r["ppo/eos_rate"] < 1 for r in log)  # a random tiny policy rarely ends within 3 tokens
    for r in log:
        assert r["ppo/reward_norm"] == pytest.approx(-(1.0 - r["ppo/eos_rate"]), abs=1e-6), r


def test_ppo_needs_a_reward(run_align, tmp_path):
    proc = run_align("stage=ppo", f"output_dir={tmp_path / 'ppo'}", check=False)
    assert proc.returncode == 2
    assert "needs ppo.reward_model=<rm dir> or ppo.reward_fn=module:function" in proc.stderr


def test_responses_a_reward_fn_gives_none_are_left_out(run_align, tmp_path):
    # None is TRL's "no score" (a gold answer that does not parse): the episode is not trained on,
    # and the rewards logged are the scored ones' (all 1.0 here, none of the unscored 0s).
    out = tmp_path / "ppo"
    proc = run_align(
        "stage=ppo",
        "ppo.reward_fn=tests.rewards:none_when_unparsed",
        "ppo.prompts_per_step=2",
        "train.batch_size=2",
        "ppo.max_new_tokens=4",
        "train.max_steps=2",
        "ppo.value_warmup_steps=0",
        "ppo.sample_every=1",
        f"output_dir={out}",
    )
    log = read_log(out)
    assert [(r["ppo/reward_raw"], r["ppo/unscored"]) for r in log] == [(1.0, 0.25), (1.0, 0.25)]
    assert all(math.isfinite(r["ppo/policy_loss"]) and math.isfinite(r["ppo/value_loss"]) for r in log)
    assert "returned None for 25% of the responses of step 1" in proc.stdout + proc.stderr
    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert [s["reward"] for s in samples if s["step"] == 1] == [1.0, None, 1.0, 1.0]
    assert (out / "final" / "model.safetensors").is_file()


def test_a_reward_fn_that_scores_nothing_stops_the_run_naming_it(run_align, tmp_path):
    proc = run_align(
        "stage=ppo",
        "ppo.reward_fn=tests.rewards:never_parses",
        "ppo.prompts_per_step=2",
        "train.batch_size=2",
        "ppo.max_new_tokens=4",
        "train.max_steps=1",
        f"output_dir={tmp_path / 'ppo'}",
        check=False,
    )
    assert_one_line_error(
        proc, "TrainingError", "ppo.reward_fn=tests.rewards:never_parses returned None for every response of step 1"
    )
    assert not (tmp_path / "ppo" / "final").exists()


def test_the_reward_fn_gets_each_prompt_rows_other_columns(run_align, tmp_path):
    # A verifiable reward reads each prompt's answer column; every reward is 1 only if the columns
    # stay with their prompts through sampling, repetition per response and batching.
    rows = [{"prompt": f"Say word{i}", "answer": f"word{i}", "id": i} for i in range(12)]
    (tmp_path / "qa.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    (tmp_path / "qa.yaml").write_text("kind: prompt\nsources:\n  - path: qa.jsonl\n    format: prompt\n")
    out = tmp_path / "ppo"
    run_align(
        "stage=ppo",
        f"data.recipe={tmp_path / 'qa.yaml'}",
        "ppo.reward_fn=tests.rewards:matches_its_answer",
        "ppo.prompts_per_step=3",
        "train.batch_size=3",
        "ppo.max_new_tokens=4",
        "train.max_steps=3",
        f"output_dir={out}",
    )
    assert [r["ppo/reward_raw"] for r in read_log(out)] == [1.0, 1.0, 1.0]


def test_a_reward_fn_written_for_trl_gets_each_row_in_its_sources_format(run_align, tmp_path):
    # TRL gives reward functions messages for a conversational dataset and text otherwise; a recipe
    # may mix both. Every reward is 1 only if each episode came in its own source's format.
    (tmp_path / "text.jsonl").write_text(
        "".join(json.dumps({"prompt": f"Say t{i}", "given_as": "text"}) + "\n" for i in range(6))
    )
    (tmp_path / "chat.jsonl").write_text(
        "".join(
            json.dumps({"prompt": [{"role": "user", "content": f"Say m{i}"}], "given_as": "messages"}) + "\n"
            for i in range(6)
        )
    )
    (tmp_path / "mixed.yaml").write_text(
        "kind: prompt\nsources:\n  - path: text.jsonl\n    format: prompt\n  - path: chat.jsonl\n    format: prompt\n"
    )
    out = tmp_path / "ppo"
    run_align(
        "stage=ppo",
        f"data.recipe={tmp_path / 'mixed.yaml'}",
        "ppo.reward_fn=tests.rewards:in_trls_shape",
        "ppo.prompts_per_step=4",
        "train.batch_size=4",
        "ppo.max_new_tokens=4",
        "train.max_steps=3",
        f"output_dir={out}",
    )
    assert [r["ppo/reward_raw"] for r in read_log(out)] == [1.0, 1.0, 1.0]


def test_a_reward_model_with_another_tokenizer_scores_the_responses_as_text(run_align, tmp_path):
    # The value model reads the policy's tokens, so it starts from the policy (test_errors.py: asked for).
    rm = reward_model_of_another_tokenizer(tmp_path / "rm")
    out = tmp_path / "ppo"
    # fp32, as the reading below: what is compared is which tokens the reward model reads.
    run_align("stage=ppo", f"ppo.reward_model={rm}", "ppo.value_init=policy", "ppo.prompts_per_step=2",
              "train.batch_size=2", "ppo.max_new_tokens=6", "train.max_steps=2", "ppo.sample_every=1",
              "train.precision=fp32", f"output_dir={out}")  # fmt: skip
    assert "has its own tokenizer" in (out / "cli.log").read_text()
    # Each logged reward is the reward model's reading of the prompt and response text in its own
    # tokens: a whole assistant turn if the response ended, the generation header and text if cut off.
    tokenizer = models.load_tokenizer(ModelConfig(name_or_path=str(rm)))
    model = load_reward_model(str(rm)).eval()
    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == 8
    for sample in samples:
        prompt = [{"role": "user", "content": sample["prompt"]}]
        readings = [
            text_rewards(model, tokenizer, [prompt], [sample["response"]], [ended], torch.device("cpu")).item()
            for ended in (True, False)
        ]
        assert min(abs(sample["reward"] - r) for r in readings) < 1e-4, (sample, readings)


def _policy_that_ends_at_once(folder: Path) -> Path:
    """A tiny policy that answers <|im_end|> at once, with <|endoftext|> as its tokenizer's EOS (as a
    base model's): only a stop at the chat template's end of turn ends its responses. No layer adds
    to the residual stream and every embedding leans one way, so the final state picks <|im_end|>."""
    tiny = REPO / "align" / "assets" / "tiny"
    tokenizer = AutoTokenizer.from_pretrained(tiny)
    end_of_turn = tokenizer.convert_tokens_to_ids("<|im_end|>")
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(tiny))
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        model.model.embed_tokens.weight[:, 0] = 1.0  # tied: the LM head reads the same rows
        model.model.embed_tokens.weight[end_of_turn, 0] = 50.0
        model.model.norm.weight.zero_()
        model.model.norm.weight[0] = 1.0
    model.save_pretrained(folder)
    tokenizer.eos_token = "<|endoftext|>"
    tokenizer.save_pretrained(folder)
    return folder


def test_sampling_stops_at_the_templates_end_of_turn(run_align, tmp_path):
    policy = _policy_that_ends_at_once(tmp_path / "policy")
    out = tmp_path / "ppo"
    run_align("stage=ppo", "model=tiny", BREVITY, f"ppo.policy={policy}", "ppo.prompts_per_step=2",
              "train.batch_size=2", "ppo.max_new_tokens=8", "train.max_steps=1", f"output_dir={out}")  # fmt: skip
    (step,) = read_log(out)
    assert (step["ppo/response_length"], step["ppo/eos_rate"]) == (1.0, 1.0)
    saved = json.loads((out / "final" / "generation_config.json").read_text())
    assert saved["eos_token_id"] == [0, 2]  # <|endoftext|> and <|im_end|>: generate stops there too


POISONED_PPO = [
    "stage=ppo",
    BREVITY,
    "ppo.prompts_per_step=4",
    "ppo.responses_per_prompt=2",
    "train.batch_size=8",  # one micro-batch: each step runs one value and one policy forward with gradients
    "ppo.mini_batches=1",
    "ppo.epochs=1",
    "ppo.value_warmup_steps=1",
    "ppo.max_new_tokens=8",
    "train.max_steps=5",
]
# tests/poison.py counts embedding forwards with gradients: value, then (after warm-up) policy, so
# forward 5 is step 3's policy forward, and POISON=grad makes only the policy's gradient NaN there.
POLICY_FORWARD_OF_STEP_3 = "5"


def _poisoned(out, data_cache, *overrides: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "tests.poison", *POISONED_PPO, *overrides, f"output_dir={out}"],
        cwd=REPO,
        env=align_env(data_cache, OMP_NUM_THREADS="1", POISON="grad", POISON_STEPS=POLICY_FORWARD_OF_STEP_3),
        capture_output=True,
        text=True,
        timeout=600,
    )


def test_non_finite_gradient_stops_with_the_last_good_checkpoint(tmp_path, data_cache):
    out = tmp_path / "run"
    proc = _poisoned(out, data_cache, "train.save_steps=2")
    assert proc.returncode == 6, proc.stderr[-4000:]  # TrainingError
    assert [line for line in proc.stderr.splitlines() if line.startswith("align: ")] == [
        "align: TrainingError: non-finite policy gradient at step 3; the last good checkpoint is kept in checkpoints/"
    ]
    assert "Traceback" not in proc.stderr
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["checkpoint-2"]
    assert not (out / "final").exists()


def test_non_finite_gradient_is_skipped_within_the_limit(tmp_path, data_cache):
    out = tmp_path / "run"
    proc = _poisoned(out, data_cache, "train.save_steps=1", "train.nan_skip_limit=1")
    assert proc.returncode == 0, proc.stderr[-4000:]
    said = proc.stdout + proc.stderr
    assert "non-finite policy gradient at step 3: update skipped (1 of train.nan_skip_limit=1)" in said
    weights = {
        (step, role): load_file(out / "checkpoints" / f"checkpoint-{step}" / role / "model.safetensors")
        for step in (2, 3, 4)
        for role in ("policy", "value")
    }

    def same(a, b):
        return all(torch.equal(weights[a][k], weights[b][k]) for k in weights[a])

    # Step 3 dropped the policy's update only; the value model trained, and step 4 trained both.
    assert same((2, "policy"), (3, "policy"))
    assert not same((2, "value"), (3, "value"))
    assert not same((3, "policy"), (4, "policy"))
    assert all(torch.isfinite(t).all() for t in load_file(out / "final" / "model.safetensors").values())
    log = {row["step"]: row for row in read_log(out)}
    assert math.isnan(float(log[3]["ppo/policy_grad_norm"])) and math.isfinite(log[4]["ppo/policy_grad_norm"])
