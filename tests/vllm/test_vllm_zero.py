"""The vLLM engine on 2 CPU ranks under ZeRO-3, through `torchrun -m align ... rollout.engine=vllm`:
an engine per rank (with LoRA), or one engine sharded over both (tensor parallel)."""

from __future__ import annotations

import pytest
from safetensors.torch import load_file

from tests.conftest import read_log
from tests.distributed.test_stages_zero import launch
from tests.vllm.test_vllm_stages import BREVITY, VLLM, gaps

pytestmark = [pytest.mark.vllm, pytest.mark.slow, pytest.mark.distributed]


@pytest.mark.parametrize(
    ("tensor_parallel", "options"),
    [(1, ("peft=lora", "peft.r=8")), (2, ())],
    ids=["engine_per_rank_lora", "one_engine_over_2_ranks"],
)
def test_two_zero3_ranks_each_sample_from_their_gathered_policy(tmp_path, data_cache, tensor_parallel, options):
    """The ZeRO-3-sharded policy is gathered one module at a time for each rank's engine, or for one
    engine sharded over both ranks (vLLM's tensor parallelism), which samples both ranks' prompts
    and gives each rank its own responses back: a rank given another's would show in the gap."""
    run = launch(tmp_path / "zero3", data_cache, "stage=grpo", BREVITY, *VLLM, "deepspeed=zero3", "train.max_steps=2",
                 "ppo.prompts_per_step=2", "ppo.responses_per_prompt=2", "train.batch_size=2", "ppo.max_new_tokens=8",
                 f"rollout.tensor_parallel_size={tensor_parallel}", *options, probe=None)  # fmt: skip
    assert f"tensor parallel {tensor_parallel})" in (run.out / "cli.log").read_text()  # as vLLM set itself up
    log = read_log(run.out)
    assert [row["step"] for row in log] == [1, 2]
    assert max(gaps(log)) < 1e-4, gaps(log)
    if options:  # LoRA: each module's adapter was gathered with its base and folded in
        assert (run.out / "final" / "adapter_model.safetensors").is_file()
    else:
        weights = load_file(run.out / "final" / "model.safetensors")
        assert sum(t.numel() for t in weights.values()) == 3_322_112  # whole, not a shard
