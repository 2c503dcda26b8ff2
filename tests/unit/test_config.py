"""Every shipped config composes and type-checks; mistakes fail in one line before any work."""

import subprocess
import sys

import pytest

from align.cli import check_overrides
from align.config import CONF_DIR, REPO_ROOT
from align.errors import ConfigError

STAGES = sorted(p.stem for p in (CONF_DIR / "stage").glob("*.yaml"))
MODELS = sorted(p.stem for p in (CONF_DIR / "model").glob("*.yaml"))
GROUPS = {g: sorted(p.stem for p in (CONF_DIR / g).glob("*.yaml")) for g in ("peft", "deepspeed", "logger")}


@pytest.mark.parametrize("stage", STAGES)
@pytest.mark.parametrize("model", MODELS)
def test_every_stage_and_model_composes(stage, model):
    extra = ["rm.path=/any/rm"] if stage == "rm_eval" else []
    extra += ["model.name_or_path=/any/model"] if model == "hf" else []
    config = check_overrides([f"stage={stage}", f"model={model}", *extra])
    assert stage in (config.stage_name, config.stage_preset)  # stage=grpo presets the ppo stage
    assert config.model.name_or_path


@pytest.mark.parametrize(("group", "option"), [(g, o) for g, opts in GROUPS.items() for o in opts])
def test_every_group_option_composes(group, option):
    check_overrides([f"{group}={option}"])


def test_tiny_overrides_only_what_a_tiny_model_needs():
    qwen = check_overrides(["stage=sft", "model=qwen2.5-7b"])
    tiny = check_overrides(["stage=sft", "model=tiny"])
    # The Qwen report's SFT numbers are the stage defaults ...
    assert (qwen.train.lr, qwen.train.warmup_steps, qwen.train.max_steps) == (2e-6, 1430, 4000)
    assert (qwen.train.adam_beta2, qwen.train.weight_decay, qwen.train.dropout) == (0.95, 0.1, 0.1)
    # ... and the tiny demo changes its schedule, not the optimiser's shape.
    assert tiny.train.lr > qwen.train.lr and tiny.train.max_steps < qwen.train.max_steps
    assert (tiny.train.adam_beta2, tiny.train.weight_decay) == (0.95, 0.1)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("train.lrr=1", "unknown config key 'train.lrr' (did you mean 'train.lr'?)"),
        (
            "train.max_steps=abc",
            "train.max_steps: Value 'abc' of type 'str' could not be converted to Integer",
        ),
        ("model=nope", "unknown model option 'nope'"),
        ("train.precision=fp8", "train.precision must be auto, bf16, fp16 or fp32, not 'fp8'"),
        ("train.nan_skip_limit=-1", "train.nan_skip_limit must be 0 (stop at the first non-finite step) or more"),
        (
            "train.nan_skip_limit=2 deepspeed=zero2 stage=ppo",
            "train.nan_skip_limit needs deepspeed=none (DeepSpeed applies updates before they can be dropped)",
        ),
    ],
)
def test_bad_config_is_one_clear_line(override, message):
    with pytest.raises(ConfigError) as err:
        check_overrides(override.split())
    assert message in str(err.value)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("override", ["train.lrr=1", "train.batch_size=two"])
def test_bad_config_through_the_entry_point(override):
    proc = subprocess.run(
        [sys.executable, "-m", "align", override], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("align: ConfigError: ")
    assert override.split("=")[0] in lines[0]
    assert "Traceback" not in proc.stderr + proc.stdout


RECIPES = sorted(p.stem for p in (REPO_ROOT / "data_recipes").glob("*.yaml"))


@pytest.mark.parametrize("recipe", RECIPES)
def test_every_recipe_is_a_data_option(recipe):
    assert check_overrides([f"data={recipe}"]).data.recipe == recipe


def test_a_recipe_path_is_a_data_option(tmp_path):
    recipe = tmp_path / "mine.yaml"
    assert check_overrides(["stage=sft", f"data={recipe}"]).data.recipe == str(recipe)
    assert check_overrides(["stage=sft", "data=data_recipes/alpaca_sft.yaml"]).data.recipe == (
        "data_recipes/alpaca_sft.yaml"
    )


def test_an_unknown_recipe_lists_every_recipe():
    with pytest.raises(ConfigError) as err:
        check_overrides(["stage=sft", "data=alpaca"])
    assert all(recipe in str(err.value) for recipe in RECIPES)


@pytest.mark.parametrize("stage", ["sft", "rm", "ppo", "pipeline"])
def test_a_model_path_alone_loads_its_weights_with_the_stage_defaults(stage):
    own = check_overrides([f"stage={stage}", "model.name_or_path=/my/model", "output_dir=out"])
    preset = check_overrides([f"stage={stage}", "model=hf", "model.name_or_path=/my/model", "output_dir=out"])
    assert own == preset
    assert (own.model.name_or_path, own.model.init, own.tuning_preset) == ("/my/model", "pretrained", None)
    assert own.train == check_overrides([f"stage={stage}", "model=qwen2.5-7b"]).train  # no demo tuning


@pytest.mark.parametrize(
    ("override", "stage"),
    [("ppo.policy=/my/sft", "ppo"), ("rm.init_from=/my/sft", "rm"), ("rm.path=/my/rm", "rm_eval")],
)
def test_a_checkpoint_of_ones_own_selects_model_hf(override, stage):
    config = check_overrides([f"stage={stage}", override])
    assert (config.model.name_or_path, config.model.init) == (override.split("=")[1], "pretrained")
    assert config.tuning_preset is None
    # Named with model=tiny, the demo's tuning stays (the pipeline's own stages; checked against the
    # checkpoint's architecture when the stage starts: test_models.py).
    assert check_overrides([f"stage={stage}", "model=tiny", override]).tuning_preset == f"{stage}_tiny"


def test_tiny_refuses_a_model_path():
    with pytest.raises(ConfigError, match="model=tiny is the embedded demo model"):
        check_overrides(["model=tiny", "model.name_or_path=/my/model"])


def test_hf_needs_a_path():
    with pytest.raises(ConfigError, match=r"config key 'model\.name_or_path' must be set"):
        check_overrides(["model=hf"])
