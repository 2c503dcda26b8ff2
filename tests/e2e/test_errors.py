"""Bad configs and inputs end the run with one line, the error's class and its exit code.

Each case asserts the exit code, that stderr's last line is `align: <ErrorClass>: ...` naming the
culprit (key, file, line, field), and that no traceback reached the user.

Config mistakes fail before any stage is imported; they run as `python -m align` through the
conftest's runner. Cases that reach a stage would spend most of their time importing torch,
transformers and TRL afresh; they run `align.cli.main()` in a child forked from this process after
those imports, with its own stdout, stderr and exit status, as `python -m align` would. Both
stand-ins are checked against a new interpreter at the end of this file.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import traceback
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import REPO, align_env, align_runner, read_log
from tests.own_models import pretrained_tiny
from tests.unit.test_reward_tokenizer import reward_model_of_another_tokenizer

TINY = REPO / "align" / "assets" / "tiny"
EXIT = {"ConfigError": 2, "DataError": 3, "ModelError": 4, "CheckpointError": 5, "TrainingError": 6}


@dataclass
class Result:
    returncode: int
    stdout: str
    stderr: str


def assert_one_line_error(proc: Result, error: str, culprit: str) -> None:
    output = proc.stdout + proc.stderr
    assert "Traceback" not in output, output[-4000:]
    assert proc.returncode == EXIT[error], output[-4000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith(f"align: {error}: "), last
    assert culprit in last, last


# Config mistakes: a real process each, well under a second.

CONFIG_CASES = {
    "unknown stage": (["stage=nope"], "unknown stage option 'nope'"),
    "unknown model option": (["model=nope"], "unknown model option 'nope'"),
    "unknown data option": (["stage=sft", "data=nope"], "unknown data option 'nope'"),
    "unknown peft option": (["peft=qlora"], "unknown peft option 'qlora'"),
    "typo'd key": (["train.lrr=1"], "unknown config key 'train.lrr' (did you mean 'train.lr'?)"),
    "key of no group": (["optim.lr=1"], "unknown config key 'optim'"),
    "wrong type": (["train.lr=abc"], "train.lr"),
    "bad precision": (["train.precision=fp8"], "train.precision"),
    "zero batch size": (["train.batch_size=0"], "train.batch_size"),
    "zero steps": (["train.max_steps=0"], "train.max_steps"),
    "unknown logger backend": (["logger.backend=tensorboard"], "logger.backend"),
    "bad deepspeed stage": (["deepspeed.stage=1"], "deepspeed.stage"),
    "rm_eval without rm.path": (["stage=rm_eval"], "rm.path"),
    "unparsable override": (["train.lr=[1"], "cannot parse the override 'train.lr=[1'"),
    "override without a value": (["train.lr"], "cannot parse the override 'train.lr'"),
    "unknown W&B mode": (["logger=wandb", "logger.mode=offlien"], "logger.mode"),
}


@pytest.mark.parametrize(("overrides", "culprit"), CONFIG_CASES.values(), ids=CONFIG_CASES.keys())
def test_config_error_is_one_line(run_align, tmp_path, overrides, culprit):
    proc = run_align(*overrides, f"output_dir={tmp_path / 'out'}", check=False, timeout=120)
    assert_one_line_error(proc, "ConfigError", culprit)
    assert not (tmp_path / "out").exists(), "a config mistake must fail before Hydra creates the run"


# Mistakes found once a stage runs: model paths, tokenizers, data, resume, stage options.


@pytest.fixture(scope="module")
def run_forked(data_cache, tmp_path_factory):
    """Run `align.cli.main()` with these overrides in a forked child; return its exit and output."""
    # The imports every child would otherwise repeat.
    import align.cli
    import align.stages.pipeline
    import align.stages.ppo
    import align.stages.rm_eval
    import align.stages.sft

    logs = tmp_path_factory.mktemp("forked")

    def run(*overrides: str, env: dict[str, str] | None = None) -> Result:
        out, err = logs / "stdout", logs / "stderr"
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:  # the child: never returns into pytest
            code = 1
            try:
                os.chdir(REPO)
                os.environ.clear()
                os.environ.update(align_env(data_cache, **(env or {})))
                os.dup2(os.open(out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC), 1)
                os.dup2(os.open(err, os.O_WRONLY | os.O_CREAT | os.O_TRUNC), 2)
                sys.stdout = open(1, "w", buffering=1, closefd=False)  # noqa: SIM115
                sys.stderr = open(2, "w", buffering=1, closefd=False)  # noqa: SIM115
                sys.argv = ["align", *overrides]
                try:
                    align.cli.main()
                    code = 0
                except SystemExit as exc:
                    code = exc.code if isinstance(exc.code, int) else (exc.code is not None)
                    if isinstance(exc.code, str):
                        print(exc.code, file=sys.stderr)
                except BaseException:
                    traceback.print_exc()  # what the interpreter would print
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)
        _, status = os.waitpid(pid, 0)
        return Result(os.waitstatus_to_exitcode(status), out.read_text(), err.read_text())

    return run


@pytest.fixture(scope="module")
def bad(tmp_path_factory) -> Path:
    """Broken models, recipes and run folders, written once."""
    root = tmp_path_factory.mktemp("bad")
    (root / "empty_model").mkdir()
    for name, changes in {"no_eos": {"eos_token": None}, "no_pad": {"pad_token": None}}.items():
        shutil.copytree(TINY, root / name)
        tok = root / name / "tokenizer_config.json"
        tok.write_text(json.dumps({**json.loads(tok.read_text()), **changes}))

    good_row = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
    (root / "good.jsonl").write_text(json.dumps(good_row) + "\n" + json.dumps({**good_row, "id": 1}) + "\n")
    (root / "bad_json.jsonl").write_text(json.dumps(good_row) + "\n{not json\n")
    (root / "no_field.jsonl").write_text(json.dumps(good_row) + "\n" + json.dumps({"text": "hi"}) + "\n")
    recipes = {
        "bad_json": "kind: sft\nsources:\n  - {path: bad_json.jsonl, format: messages}\n",
        "no_field": "kind: sft\nsources:\n  - {path: no_field.jsonl, format: messages}\n",
        "bad_format": "kind: sft\nsources:\n  - {path: no_field.jsonl, format: sharegtp}\n",
        "no_source_file": "kind: sft\nsources:\n  - {path: missing.jsonl, format: messages}\n",
        "bad_key": "kind: sft\nsauces:\n  - {path: bad_json.jsonl, format: messages}\n",
        "good": "kind: sft\nsources:\n  - {path: good.jsonl, format: messages}\n",
    }
    for name, text in recipes.items():
        (root / f"{name}.yaml").write_text(text)

    # A folder holding a reward-model run, which an sft run must not resume into.
    (root / "rm_run").mkdir()
    (root / "rm_run" / "config.yaml").write_text(f"stage_name: rm\nmodel:\n  name_or_path: {TINY}\n")
    (root / "not_a_checkpoint").mkdir()
    (root / "not_a_checkpoint" / "notes.txt").write_text("no trainer_state.json here\n")
    # A reward model of another tokenizer, which the value model cannot start from.
    reward_model_of_another_tokenizer(root / "foreign_rm")
    # A model of another architecture, which the tiny demo's tuning must not train.
    pretrained_tiny(root / "wide", hidden_size=128, intermediate_size=256)
    # A LoRA SFT run's final/: an adapter and a tokenizer, no whole model.
    (root / "lora_final").mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(TINY / name, root / "lora_final")
    adapter = {"base_model_name_or_path": str(TINY), "task_type": "CAUSAL_LM", "peft_type": "LORA"}
    (root / "lora_final" / "adapter_config.json").write_text(json.dumps(adapter))
    return root


# (error class, culprit in the message, overrides); {bad} is the folder of broken inputs above.
SFT = "stage=sft"
PPO = ["stage=ppo", "ppo.reward_fn=align.tasks.sorting:gold_reward"]
STAGE_CASES = {
    "model path missing": ("ModelError", "'{bad}/nowhere' does not exist", [SFT, "model.name_or_path={bad}/nowhere"]),
    "model dir without config.json": ("ModelError", "no config.json", [SFT, "model.name_or_path={bad}/empty_model"]),
    "tokenizer without EOS": ("ModelError", "no EOS token", [SFT, "model.name_or_path={bad}/no_eos"]),
    "bad attention kernel": ("ConfigError", "model.attn_implementation", [SFT, "model.attn_implementation=fast"]),
    "unknown lr scheduler": ("ConfigError", "train.lr_scheduler", [SFT, "train.lr_scheduler=cosine_decay"]),
    "recipe file not found": ("DataError", "missing.yaml", [SFT, "data.recipe={bad}/missing.yaml"]),
    "unknown recipe name": ("DataError", "unknown data recipe 'nope'", [SFT, "data.recipe=nope"]),
    "unknown recipe key": ("DataError", "unknown key 'sauces'", [SFT, "data.recipe={bad}/bad_key.yaml"]),
    "source file not found": ("DataError", "missing.jsonl", [SFT, "data.recipe={bad}/no_source_file.yaml"]),
    "bad JSON line": ("DataError", "line 2", [SFT, "data.recipe={bad}/bad_json.yaml"]),
    "missing field": ("DataError", "line 2: field 'messages'", [SFT, "data.recipe={bad}/no_field.yaml"]),
    "unknown format": ("DataError", "unknown format 'sharegtp'", [SFT, "data.recipe={bad}/bad_format.yaml"]),
    "recipe kind mismatch": ("DataError", "of kind 'preference'", [SFT, "data=demo_prefs"]),
    "LoRA target absent": ("ConfigError", "peft target 'nope'", [SFT, "peft=lora", "peft.target_modules=[nope]"]),
    "resume into another stage's run": ("CheckpointError", "holds a rm run", [SFT, "output_dir={bad}/rm_run"]),
    "resume from a missing path": ("CheckpointError", "resume='{bad}/nowhere'", [SFT, "resume={bad}/nowhere"]),
    "resume from a non-checkpoint": ("CheckpointError", "not a complete", [SFT, "resume={bad}/not_a_checkpoint"]),
    "ppo without a reward": ("ConfigError", "needs ppo.reward_model", ["stage=ppo"]),
    "ppo reward_fn not importable": ("ConfigError", "ppo.reward_fn 'nope:f'", ["stage=ppo", "ppo.reward_fn=nope:f"]),
    "ppo reward_fn column absent": ("ConfigError", "takes 'given_as', which no prompt row of data.recipe=demo_prompts",
                                    ["stage=ppo", "ppo.reward_fn=tests.rewards:in_trls_shape"]),
    "ppo greedy sampling": ("ConfigError", "ppo.temperature must be above 0", [*PPO, "ppo.temperature=0"]),
    "ppo top_p out of range": ("ConfigError", "ppo.top_p must be in (0, 1], not 1.5", [*PPO, "ppo.top_p=1.5"]),
    "ppo no new tokens": ("ConfigError", "ppo.max_new_tokens must be at least 1", [*PPO, "ppo.max_new_tokens=0"]),
    "ppo response fills the context": ("ConfigError", "ppo.max_new_tokens=32 leaves no room for a prompt",
                                       [*PPO, "train.max_length=32", "ppo.max_new_tokens=32"]),
    "ppo every prompt too long": ("DataError", "no rows left of 500 read (too_long 500)",
                                  [*PPO, "train.max_length=20", "ppo.max_new_tokens=16"]),
    "ppo discount above 1": ("ConfigError", "ppo.gamma must be in [0, 1], not 1.5", [*PPO, "ppo.gamma=1.5"]),
    "ppo negative KL": ("ConfigError", "ppo.kl_coef must be 0 or more", [*PPO, "ppo.kl_coef=-0.1"]),
    "ppo value from a foreign RM": ("ConfigError", "has another tokenizer than the policy, so a value model",
                                    ["stage=ppo", "ppo.reward_model={bad}/foreign_rm"]),
    "ppo rollout not divisible": ("ConfigError", "train.batch_size=2", [*PPO, "ppo.prompts_per_step=3",
                                  "ppo.responses_per_prompt=1", "train.batch_size=2"]),
    "unknown rollout engine": ("ConfigError", "rollout.engine must be hf or vllm, not 'sglang'",
                               [*PPO, "rollout.engine=sglang"]),
    "tensor parallel without vLLM": ("ConfigError", "rollout.tensor_parallel_size=2 shards a vLLM engine",
                                     [*PPO, "rollout.tensor_parallel_size=2"]),
    # The test environment has no vLLM (its tests run in a venv of their own: tests/vllm/).
    "vllm engine not installed": ("ConfigError", "rollout.engine=vllm needs vLLM in this environment",
                                  [*PPO, "rollout.engine=vllm"]),
    "ppo policy missing": ("ModelError", "'{bad}/nowhere' does not exist", [*PPO, "ppo.policy={bad}/nowhere"]),
    "ppo policy a LoRA adapter": ("ModelError", "'{bad}/lora_final' holds a LoRA adapter",
                                  [*PPO, "ppo.policy={bad}/lora_final"]),
    "demo tuning on another model": ("ConfigError", "is not the model conf/tuning/ppo_tiny.yaml is written for",
                                     [*PPO, "model=tiny", "ppo.policy={bad}/wide"]),
    "tiny with a path of one's own": ("ConfigError", "model=tiny is the embedded demo model",
                                      [SFT, "model=tiny", "model.name_or_path={bad}/wide"]),
    "rm_eval on a missing model": ("ModelError", "rm.path '{bad}/nowhere'", ["stage=rm_eval", "rm.path={bad}/nowhere"]),
    "pipeline with an unknown stage": ("ConfigError", "pipeline.stages", ["stage=pipeline", "pipeline.stages=[rlhf]"]),
}  # fmt: skip


@pytest.mark.parametrize(("error", "culprit", "overrides"), STAGE_CASES.values(), ids=STAGE_CASES.keys())
def test_stage_error_is_one_line(run_forked, bad, tmp_path, error, culprit, overrides):
    args = [o.format(bad=bad) for o in overrides]
    if not any(a.startswith("output_dir=") for a in args):
        args.append(f"output_dir={tmp_path / 'out'}")
    proc = run_forked(*args, "train.max_steps=1")
    assert_one_line_error(proc, error, culprit.format(bad=bad))


def test_wandb_that_cannot_start_is_one_line(run_forked, tmp_path):
    proc = run_forked(SFT, "logger=wandb", f"output_dir={tmp_path}", env={"WANDB_MODE": "onlin"})
    assert_one_line_error(proc, "ConfigError", "logger=wandb cannot start a run")


def test_rank_outside_world_is_one_line(run_forked, tmp_path):
    proc = run_forked(SFT, "dry_run=true", f"output_dir={tmp_path}", env={"RANK": "2", "WORLD_SIZE": "2"})
    assert_one_line_error(proc, "ConfigError", "RANK=2")


def test_tokenizer_without_pad_pads_with_eos(run_align, bad, tmp_path):
    # Not run_forked: training in a child forked from a parent whose torch threads already ran can
    # deadlock in OpenMP, so that runner is only for runs that stop before any compute.
    proc = run_align(
        SFT,
        f"model.name_or_path={bad}/no_pad",
        "model.init=random",  # the copy of the tiny asset has no weights
        f"data.recipe={bad}/good.yaml",
        f"output_dir={tmp_path / 'out'}",
        "train.max_steps=1",
        "train.batch_size=2",
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    saved = json.loads((tmp_path / "out" / "final" / "tokenizer_config.json").read_text())
    assert saved["pad_token"] == saved["eos_token"] == "<|im_end|>"


def test_fork_runner_reports_tracebacks_as_python_would(run_forked, monkeypatch):
    """The forked child must not hide a crash: a bug outside AlignError shows its traceback."""
    import align.cli

    monkeypatch.setattr(align.cli, "check_overrides", lambda overrides: 1 / 0)
    proc = run_forked("stage=sft")
    assert proc.returncode == 1
    assert "Traceback" in proc.stderr and "ZeroDivisionError" in proc.stderr


def test_subprocess_and_fork_agree(data_cache, run_forked, bad, tmp_path):
    """One stage-level case both ways: the fork is a faithful stand-in for `python -m align`."""
    args = ["stage=sft", f"model.name_or_path={bad}/nowhere", f"output_dir={tmp_path / 'out'}"]
    real, forked = align_runner(data_cache, real=True)(*args, check=False, timeout=300), run_forked(*args)
    assert (real.returncode, real.stderr.splitlines()[-1]) == (forked.returncode, forked.stderr.splitlines()[-1])


def test_preloaded_and_real_runs_agree(data_cache, tmp_path):
    """A run that trains, both ways: a child of the preloaded Python (tests/preloaded.py, what
    run_align uses) logs the same numbers and saves the same weights as a new interpreter."""
    runs = {}
    for name, real in (("real", True), ("preloaded", False)):
        out = tmp_path / name
        args = ["stage=sft", "model=tiny", "train.max_steps=2", "train.batch_size=4", "train.logging_steps=1",
                "train.eval_steps=0"]  # fmt: skip
        proc = align_runner(data_cache, real=real)(*args, f"output_dir={out}")
        assert "align sft: what runs" in proc.stdout + proc.stderr
        losses = [row["train/loss"] for row in read_log(out) if "train/loss" in row]
        runs[name] = losses, load_file(out / "final" / "model.safetensors")
    (real_losses, real_weights), (losses, weights) = runs["real"], runs["preloaded"]
    assert len(losses) == 2 and losses == real_losses
    assert weights.keys() == real_weights.keys()
    assert all(torch.equal(weights[k], real_weights[k]) for k in weights)
