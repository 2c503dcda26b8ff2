"""The vLLM rollout engine (align/rl/vllm_engine.py) against the trainer, on the tiny model in fp32:
it samples what the trainer scores (its log-probs equal the trainer's), within temperature and
top-p as the HF sampler cuts, stopping at the stop ids; its seeds make it repeatable; and the logged
gap shows at once an engine that was not given the updated weights.

Runs in the vLLM environment only (`pytest -m vllm`, see README): vLLM pins its own transformers."""

from __future__ import annotations

from types import SimpleNamespace
from typing import ClassVar

import pytest
import torch

from align.config import REPO_ROOT, ModelConfig, RolloutConfig
from align.modeling import models
from align.modeling.chat import encode, render, stop_token_ids
from align.modeling.rows import make_rows
from align.rl.forward import disable_dropout, response_logprobs
from align.rl.rollout import top_p_filter
from align.rl.vllm_engine import VLLMEngine, logp_gap, request_seeds
from align.rl.weights import checkpoint_weights

pytestmark = pytest.mark.vllm
CPU = torch.device("cpu")
N = 16


@pytest.fixture(scope="module")
def setup():
    cfg = ModelConfig(name_or_path=str(REPO_ROOT / "align" / "assets" / "tiny"), init="random")
    tokenizer = models.load_tokenizer(cfg)
    model = models.load_causal_lm(cfg, tokenizer, seed=0).eval()
    disable_dropout(model)
    engine = VLLMEngine(
        model.config,
        cfg=RolloutConfig(engine="vllm"),
        dtype="float32",
        max_model_len=256,
        temperature=1.0,
        device=CPU,
        rank=0,
        local_rank=0,
        world_size=1,
    )
    texts = ["sort 3 1 2", "hello", "what is two plus two? answer briefly please", "x"]
    prompts = [encode(tokenizer, render(tokenizer, [{"role": "user", "content": t}], True)) for t in texts]
    return model, tokenizer, engine, prompts


def _sample(setup, step: int = 0, temperature: float = 1.0, top_p: float = 1.0, max_new_tokens: int = 24):
    model, tokenizer, engine, prompts = setup
    rows = [prompts[i % len(prompts)] for i in range(N)]
    return engine.sample(
        rows,
        lambda: checkpoint_weights(model),
        seeds=request_seeds(7, step, 0, N),
        pad_id=tokenizer.pad_token_id,
        eos_ids=stop_token_ids(tokenizer),
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_p=top_p,
        device=CPU,
    )


def _trainer_logp(model, rollout, temperature: float = 1.0) -> torch.Tensor:
    rows = make_rows(rollout.input_ids, rollout.attention_mask, rollout.prompt_len, packed=False)
    with torch.no_grad():
        return response_logprobs(model, rows, temperature)[0]


def test_the_engine_samples_what_the_trainer_scores(setup):
    model, tokenizer, _, _ = setup
    rollout, engine_logp = _sample(setup)
    mask = rollout.response_mask
    gap = logp_gap(engine_logp, _trainer_logp(model, rollout), mask)
    assert gap["rollout/logp_gap_max"] < 1e-5, gap
    # Each response is cut after its first stop id, the rest is padding, as the HF sampler's.
    stops = torch.tensor(stop_token_ids(tokenizer))
    response = rollout.input_ids[:, rollout.prompt_len :]
    for ids, keep, ended in zip(response, mask.bool(), rollout.ended_with_eos, strict=True):
        kept = ids[keep]
        assert not torch.isin(kept[:-1], stops).any()
        assert bool(ended) == bool(torch.isin(kept[-1:], stops).any())
        assert (ids[~keep] == tokenizer.pad_token_id).all()
        assert ended or len(kept) == 24
    assert mask.sum() > N  # responses, not empty rows


def test_temperature_and_top_p_cut_where_the_hf_sampler_cuts(setup):
    model, _, _, _ = setup
    temperature, top_p = 0.7, 0.5
    rollout, _ = _sample(setup, step=1, temperature=temperature, top_p=top_p)
    rows = make_rows(rollout.input_ids, rollout.attention_mask, rollout.prompt_len, packed=False)
    with torch.no_grad():
        logits = rows.response_logits(model(**rows.model_inputs(), logits_to_keep=rows.logits_to_keep).logits)
    allowed = top_p_filter(logits.flatten(0, 1) / temperature, top_p).isfinite()
    tokens = rows.response_tokens.flatten()
    inside = allowed[torch.arange(len(tokens)), tokens]
    assert inside[rollout.response_mask.flatten().bool()].all()
    assert (allowed.sum(-1) < allowed.shape[-1] // 2).all()  # the nucleus was a real cut


def test_seeds_repeat_a_rollout_and_steps_differ(setup):
    first, _ = _sample(setup, step=3)
    again, _ = _sample(setup, step=3)
    other, _ = _sample(setup, step=4)
    assert torch.equal(first.input_ids, again.input_ids)
    assert not torch.equal(first.input_ids, other.input_ids)
    # Rows with the same prompt draw different responses (each request has its own seed).
    assert not torch.equal(first.input_ids[0], first.input_ids[4])


def test_the_gap_shows_an_update_the_engine_was_not_given(setup):
    model, _, engine, _ = setup
    _sample(setup)  # the engine holds the current weights
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn_like(param) * 0.02)
    stale, stale_logp = _sample(setup, step=5)  # no engine.stale(): the sync is skipped
    skipped = logp_gap(stale_logp, _trainer_logp(model, stale), stale.response_mask)
    engine.stale()
    fresh, fresh_logp = _sample(setup, step=5)
    synced = logp_gap(fresh_logp, _trainer_logp(model, fresh), fresh.response_mask)
    print(skipped, synced)
    assert synced["rollout/logp_gap_max"] < 1e-5
    assert skipped["rollout/logp_gap_mean"] > 100 * synced["rollout/logp_gap_max"]


class RecordingLLM:
    """vLLM's `LLM` as the engine drives it, recording the calls: its sleep mode needs a GPU."""

    calls: ClassVar[list[str]] = []

    def __init__(self, **kwargs):
        self.calls.clear()
        self.calls.append(f"build sleep={kwargs['enable_sleep_mode']}")

    def sleep(self, level):
        self.calls.append(f"sleep {level}")

    def wake_up(self, tags):
        self.calls.append(f"wake {','.join(tags)}")

    def collective_rpc(self, method, kwargs):
        self.calls.append(f"{method} {len(list(kwargs['weights_iterator']))} tensors")

    def reset_prefix_cache(self):
        self.calls.append("reset_prefix_cache")

    def generate(self, prompts, params, use_tqdm):
        self.calls.append(f"generate {len(prompts)}")
        sample = SimpleNamespace(token_ids=[7, 2], logprobs=[{7: SimpleNamespace(logprob=-1.0)},
                                                             {2: SimpleNamespace(logprob=-2.0)}])  # fmt: skip
        return [SimpleNamespace(outputs=[sample]) for _ in prompts]


def test_on_a_gpu_the_engine_sleeps_through_each_update_and_wakes_with_the_new_weights(monkeypatch, setup):
    """Sleep mode level 2 drops the weights: every rollout first wakes them, loads the policy's (even
    when it did not change), then wakes the KV cache, and the engine sleeps again after sampling."""
    import vllm

    model = setup[0]
    monkeypatch.setattr(vllm, "LLM", RecordingLLM)
    engine = VLLMEngine(model.config, cfg=RolloutConfig(engine="vllm"), dtype="bfloat16", max_model_len=64,
                        temperature=1.0, device=torch.device("cuda"), rank=0, local_rank=0, world_size=1)  # fmt: skip
    tensors = len(list(checkpoint_weights(model)))
    rollout_calls = ["wake weights", f"reload_weights {tensors} tensors", "reset_prefix_cache", "wake kv_cache",
                     "generate 2", "sleep 2"]  # fmt: skip
    how = dict(seeds=[1, 2], pad_id=0, eos_ids=[2], max_new_tokens=4, temperature=1.0, top_p=1.0, device=CPU)
    for _ in range(2):  # the second rollout, with no update between, still reloads
        rollout, logp = engine.sample([[5, 6], [7]], lambda: checkpoint_weights(model), **how)
    assert RecordingLLM.calls == ["build sleep=True", "sleep 2", *rollout_calls, *rollout_calls]
    assert rollout.ended_with_eos.all() and logp.tolist() == [[-1.0, -2.0], [-1.0, -2.0]]
    # On a CPU vLLM has no sleep mode: the engine never asks for it.
    cpu = VLLMEngine(model.config, cfg=RolloutConfig(engine="vllm"), dtype="float32", max_model_len=64,
                     temperature=1.0, device=CPU, rank=0, local_rank=0, world_size=1)  # fmt: skip
    assert not cpu.sleep and RecordingLLM.calls == ["build sleep=False"]
