"""build_deepspeed_config and world_info, without launching ranks.

Marked `distributed` but not `slow`: these take about a second and belong in the fast loop.
"""

from __future__ import annotations

from typing import Any

import pytest

from align.errors import ConfigError
from align.run import distributed
from align.run.distributed import build_deepspeed_config, world_info

pytestmark = pytest.mark.distributed


def config(stage: int, offload_optimizer: bool = False, offload_param: bool = False, **overrides: Any) -> Any:
    kwargs: dict[str, Any] = {
        "precision": "fp32",
        "grad_clip": 1.0,
        "micro_batch": 2,
        "grad_accum": 4,
        "world_size": 8,
    }
    kwargs.update(overrides)
    return build_deepspeed_config(stage, offload_optimizer, offload_param, **kwargs)


def leaves(tree: Any) -> list[Any]:
    if isinstance(tree, dict):
        return [leaf for value in tree.values() for leaf in leaves(value)]
    return [tree]


@pytest.fixture(params=[False, True], ids=["cpu", "accelerator"])
def has_accelerator(request, monkeypatch) -> bool:
    # Both branches run on any machine; only the offload/precision details differ between them.
    monkeypatch.setattr(distributed, "_has_accelerator", lambda: request.param)
    return request.param


def test_stage_0_is_no_deepspeed() -> None:
    assert config(0) is None
    with pytest.raises(ValueError, match="offload needs DeepSpeed"):
        config(0, offload_optimizer=True)


@pytest.mark.parametrize("stage", [2, 3])
def test_run_values_are_filled_from_our_config(stage: int) -> None:
    ds = config(stage, precision="bf16", grad_clip=0.5)
    assert ds["train_micro_batch_size_per_gpu"] == 2
    assert ds["gradient_accumulation_steps"] == 4
    assert ds["train_batch_size"] == 2 * 4 * 8
    assert ds["gradient_clipping"] == 0.5
    assert ds["bf16"] == {"enabled": True}
    assert ds["fp16"] == {"enabled": False}
    assert ds["zero_optimization"]["stage"] == stage
    assert "auto" not in leaves(ds)  # plain accelerate (our PPO loop) cannot resolve "auto"


def test_zero3_gathers_weights_on_save_and_zero2_has_nothing_to_gather() -> None:
    assert config(3)["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] is True
    assert "stage3_gather_16bit_weights_on_model_save" not in config(2)["zero_optimization"]


def test_offload_goes_to_cpu(has_accelerator: bool) -> None:
    ds = config(3, offload_optimizer=True, offload_param=True)
    zero = ds["zero_optimization"]
    for key in ("offload_optimizer", "offload_param"):
        assert zero[key] == {"device": "cpu", "pin_memory": has_accelerator}
    # On CPU keep the torch optimizer instead of JIT-compiling DeepSpeedCPUAdam.
    assert ds.get("zero_force_ds_cpu_optimizer", True) is has_accelerator


def test_fp16_needs_an_accelerator(has_accelerator: bool) -> None:
    if has_accelerator:
        assert config(2, precision="fp16")["fp16"] == {"enabled": True}
    else:
        with pytest.raises(ValueError, match="fp16 is not supported"):
            config(2, precision="fp16")


@pytest.mark.parametrize(
    ("stage", "offload_param", "overrides", "message"),
    [
        (1, False, {}, "must be 0, 2 or 3"),
        (2, True, {}, "offload_param needs ZeRO-3"),
        (2, False, {"precision": "auto"}, "resolve 'auto' first"),
        (2, False, {"micro_batch": 0}, "must be >= 1"),
    ],
)
def test_bad_settings_fail_plainly(stage: int, offload_param: bool, overrides: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        config(stage, offload_param=offload_param, **overrides)


@pytest.mark.parametrize(("stage", "offload"), [(2, False), (2, True), (3, False), (3, True)])
def test_deepspeed_accepts_the_config(stage: int, offload: bool) -> None:
    # DeepSpeed's own parser checks key names, types and train_batch_size = micro x accum x world
    # (world is 1 here: no process group).
    from deepspeed.runtime.config import DeepSpeedConfig

    parsed = DeepSpeedConfig(config(stage, offload, offload and stage == 3, world_size=1))
    assert parsed.zero_optimization_stage == stage
    assert parsed.train_batch_size == 2 * 4


def test_world_info_reads_the_launcher_env(monkeypatch) -> None:
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert world_info() == (3, 4, 1)
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(key)
    assert world_info() == (0, 1, 0)
    monkeypatch.setenv("RANK", "2")
    with pytest.raises(ConfigError, match="outside WORLD_SIZE"):
        world_info()
