"""`dry_run=true` sizes a 7B job without weights, a GPU, a process group or the hub."""

import json
import shutil

import pytest
import torch
import yaml
from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
from transformers import AutoConfig, AutoModelForCausalLM

from align.cli import check_overrides
from align.config import REPO_ROOT, ModelConfig
from align.run.dry_run import HUB_CONFIGS, architecture, parameter_counts, report, shipped_config

QWEN25_7B_CONFIG = HUB_CONFIGS / "Qwen--Qwen2.5-7B.json"
QWEN25_7B_TOTAL, QWEN25_7B_LARGEST = 7615616512, 544997376

# The model cards' counts; Qwen-7B's is the sum of its layers (32 x 202.4M, two 622.3M embeddings).
PUBLISHED = {
    "qwen2.5-0.5b": 0.49e9,
    "qwen2.5-0.5b-instruct": 0.49e9,
    "qwen2.5-1.5b": 1.54e9,
    "qwen2.5-7b": 7.62e9,
    "qwen2.5-7b-instruct": 7.62e9,
    "qwen-7b": 7.72e9,
}


def hub_presets() -> dict[str, ModelConfig]:
    """conf/model/ presets fixed to a hub id (not tiny's bundled asset, not hf's `???`)."""
    presets = {}
    for path in sorted((REPO_ROOT / "conf" / "model").glob("*.yaml")):
        preset = yaml.safe_load(path.read_text())
        name = preset["name_or_path"]
        if name != "???" and "${" not in name:
            presets[path.stem] = ModelConfig(
                name_or_path=name, trust_remote_code=preset.get("trust_remote_code", False)
            )
    return presets


def zero3_gpu_gib(total: int, largest: int, gpus: int, nodes: int) -> str:
    _, gpu, _ = estimate_zero3_model_states_mem_needs(
        total, largest, gpus, nodes, cpu_offload=False, cpu_offload_params=False
    )
    return f"{gpu / 2**30:6.2f} GiB"


def test_dry_run_prints_plan_and_zero_estimates(run_align, tmp_path):
    model_dir = tmp_path / "qwen-7b-config-only"
    model_dir.mkdir()
    shutil.copy(QWEN25_7B_CONFIG, model_dir / "config.json")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(REPO_ROOT / "align" / "assets" / "tiny" / name, model_dir / name)
    out = tmp_path / "never-written"
    proc = run_align(
        "stage=sft",
        f"model.name_or_path={model_dir}",
        "model.init=pretrained",
        "train.batch_size=2",
        "train.grad_accum=4",
        "dry_run=true",
        f"output_dir={out}",
        env={"WORLD_SIZE": "16", "LOCAL_WORLD_SIZE": "8"},
    )
    text = proc.stdout
    assert "world: 16 processes (2 node(s) x 8)" in text
    assert "global batch: 2 per device x 4 accumulation x 16 = 128 sequences per optimizer step" in text
    assert f"architecture: config.json of {model_dir} (local directory)" in text
    assert ": 7615.6M parameters" in text
    zero3 = next(line for line in text.splitlines() if line.strip().startswith("zero3 "))
    assert zero3_gpu_gib(QWEN25_7B_TOTAL, QWEN25_7B_LARGEST, 8, 2) in zero3
    assert "stage_name: sft" in text  # the resolved config
    assert not (out / "final").exists()


def test_qwen25_7b_preset_sizes_a_zero3_job_offline(run_align, tmp_path):
    """The issue's command: the preset's architecture ships with align, so HF_HUB_OFFLINE=1 is no obstacle."""
    out = tmp_path / "never-written"
    proc = run_align("stage=sft", "model=qwen2.5-7b", "deepspeed=zero3", "dry_run=true", f"output_dir={out}")
    text = proc.stdout
    assert "architecture: shipped config for Qwen/Qwen2.5-7B (align/assets/hub_configs/Qwen--Qwen2.5-7B.json)" in text
    assert "model: Qwen/Qwen2.5-7B: 7615.6M parameters (largest layer 545.0M)" in text
    zero3 = next(line for line in text.splitlines() if line.strip().startswith("zero3 "))
    assert zero3_gpu_gib(QWEN25_7B_TOTAL, QWEN25_7B_LARGEST, 1, 1) in zero3
    assert not (out / "final").exists()


@pytest.mark.parametrize("preset", sorted(hub_presets()))
def test_every_hub_preset_is_sized_from_its_shipped_config(preset):
    model_cfg = hub_presets()[preset]
    assert shipped_config(model_cfg.name_or_path) is not None, (
        f"conf/model/{preset}.yaml: ship {model_cfg.name_or_path}'s config.json in {HUB_CONFIGS}"
    )
    assert preset in PUBLISHED, f"add the published parameter count of {model_cfg.name_or_path}"
    config, source = architecture(model_cfg)
    assert source.startswith(f"shipped config for {model_cfg.name_or_path} ")
    total, _ = parameter_counts(config, model_cfg.trust_remote_code)
    assert total == pytest.approx(PUBLISHED[preset], rel=0.03)


def test_qwen_7b_stand_in_says_it_is_one():
    _, source = architecture(hub_presets()["qwen-7b"])
    assert "not Qwen/Qwen-7B's own config.json" in source


@pytest.mark.parametrize("path", sorted(HUB_CONFIGS.glob("*.json")), ids=lambda p: p.stem)
def test_shipped_config_builds_on_the_meta_device(path):
    config = AutoConfig.from_pretrained(path)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    assert {p.device.type for p in model.parameters()} == {"meta"}


def test_local_directory_wins_over_the_shipped_config(tmp_path, monkeypatch):
    """A directory spelled like a hub id is what transformers would load, so it is what is sized."""
    monkeypatch.chdir(tmp_path)
    local = tmp_path / "Qwen" / "Qwen2.5-7B"
    local.mkdir(parents=True)
    tiny = json.loads((REPO_ROOT / "align" / "assets" / "tiny" / "config.json").read_text())
    (local / "config.json").write_text(json.dumps(tiny))
    config, source = architecture(ModelConfig(name_or_path="Qwen/Qwen2.5-7B"))
    assert source == "config.json of Qwen/Qwen2.5-7B (local directory)"
    assert config.hidden_size == tiny["hidden_size"]


def test_a_ppo_job_is_sized_before_its_policy_exists(tmp_path):
    """README: `stage=ppo model=qwen2.5-0.5b ppo.policy=runs/sft/final ...` planned while SFT still runs."""
    policy = tmp_path / "sft" / "final"
    config = check_overrides(["stage=ppo", "model=qwen2.5-0.5b", f"ppo.policy={policy}", "ppo.reward_fn=m:f"])
    text = report(config)
    assert f"ppo.policy {policy} does not exist yet: sized as model.name_or_path Qwen/Qwen2.5-0.5B" in text
    assert "model: Qwen/Qwen2.5-0.5B: 494.0M parameters" in text
    shutil.copytree(REPO_ROOT / "align" / "assets" / "tiny", policy)  # once it exists, it is what is sized
    assert f"architecture: config.json of {policy} (local directory)" in report(config)


def test_a_critic_free_job_is_sized_without_a_value_model():
    ppo = report(check_overrides(["stage=ppo", "model=qwen2.5-0.5b", "ppo.reward_fn=m:f"]))
    assert "ppo: policy and value are trained" in ppo
    grpo = report(check_overrides(["stage=grpo", "model=qwen2.5-0.5b", "ppo.reward_fn=m:f"]))
    assert "ppo.advantage=grpo: the policy alone is trained (estimate below), no value model; the frozen " in grpo
    assert "reference adds about 0.92 GiB in 16-bit per device" in grpo  # 494.0M parameters x 2 bytes


def test_a_model_of_ones_own_by_hub_id_is_sized_offline():
    text = report(check_overrides(["stage=sft", "model.name_or_path=HuggingFaceTB/SmolLM2-135M-Instruct"]))
    assert "model: HuggingFaceTB/SmolLM2-135M-Instruct: 134.5M parameters" in text
