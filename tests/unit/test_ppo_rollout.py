"""The sampler's temperature and top-p are generate's: the same tokens survive the cut, and only those are
drawn; a prompt that several rows share is prefilled once and each row continues its own prompt."""

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, TemperatureLogitsWarper, TopPLogitsWarper

from align.config import REPO_ROOT
from align.rl.rollout import draw, response_token_ids, sample, sample_next, top_p_filter


def _logits() -> torch.Tensor:
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(64, 50, generator=gen) * 3
    logits[0] = 0.0  # a flat row: the cut falls among ties
    logits[1, 7] = 30.0  # one token holds almost all the mass: only it survives
    return logits


@pytest.mark.parametrize("top_p", [0.05, 0.3, 0.5, 0.9, 0.95, 0.999])
@pytest.mark.parametrize("temperature", [0.7, 1.0, 1.5])
def test_top_p_keeps_the_tokens_transformers_keeps(top_p: float, temperature: float) -> None:
    logits = _logits()
    scaled = TemperatureLogitsWarper(temperature)(None, logits.clone())
    expected = TopPLogitsWarper(top_p)(None, scaled.clone())
    ours = top_p_filter(logits / temperature, top_p)
    assert torch.equal(torch.isinf(ours), torch.isinf(expected))
    torch.testing.assert_close(ours[~torch.isinf(ours)], expected[~torch.isinf(expected)], rtol=0, atol=0)
    kept = (~torch.isinf(ours)).sum(-1)
    assert (kept >= 1).all() and kept[1] == 1
    assert (kept < logits.shape[-1]).any()  # the cut removed something: the comparison has teeth


def test_sampling_draws_only_kept_tokens_at_their_renormalised_rates() -> None:
    logits = torch.tensor([[2.0, 1.0, 0.5, -1.0, -3.0]]).repeat(20_000, 1)
    kept = ~torch.isinf(TopPLogitsWarper(0.8)(None, logits[:1].clone()))[0]
    torch.manual_seed(0)
    drawn = sample_next(logits, temperature=1.0, top_p=0.8)
    assert kept[drawn].all()
    rates = torch.bincount(drawn, minlength=5).float() / len(drawn)
    expected = torch.where(kept, logits[0].softmax(-1), 0.0)
    torch.testing.assert_close(rates, expected / expected.sum(), atol=0.01, rtol=0)


@pytest.mark.parametrize("uniform, expected", [(0.0, 1), (0.25 - 1e-9, 1), (0.25, 3), (0.999, 3), (1.0, 3)])
def test_a_draw_lands_only_on_tokens_with_probability(monkeypatch, uniform: float, expected: int) -> None:
    # The uniform's edges: 0 (possible), and the total (a rounding up) past the last token.
    probs = torch.tensor([[0.0, 0.25, 0.0, 0.75, 0.0]])
    monkeypatch.setattr(torch, "rand_like", lambda t: torch.full_like(t, uniform))
    assert draw(probs).tolist() == [expected]


def test_top_p_of_one_keeps_every_token() -> None:
    logits = _logits()
    assert torch.equal(top_p_filter(logits, 1.0), logits)


def _tiny_model() -> torch.nn.Module:
    config = AutoConfig.from_pretrained(REPO_ROOT / "align" / "assets" / "tiny")
    config.update({"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2})
    return AutoModelForCausalLM.from_config(config)


def test_rows_sharing_a_prompt_continue_it_as_a_row_of_its_own_would() -> None:
    torch.manual_seed(0)
    model = _tiny_model()
    prompts = [[5, 6, 7, 8, 9], [10, 11], [5, 6, 7, 8, 9], [10, 11], [10, 11], [12, 13, 14]]
    batch_sizes = []
    model.register_forward_pre_hook(
        lambda _, args, kwargs: batch_sizes.append(kwargs["input_ids"].shape), with_kwargs=True
    )

    def rollout(rows):
        # A near-zero temperature samples the arg-max: the same tokens however the rows are batched.
        return sample(
            model,
            rows,
            pad_id=0,
            eos_ids=[2],
            max_new_tokens=6,
            temperature=1e-4,
            top_p=1.0,
            device=torch.device("cpu"),
        )

    shared = rollout(prompts)
    assert batch_sizes[0] == (3, 5)  # the prefill: 3 distinct prompts, not 6 rows
    assert all(size[0] == 6 for size in batch_sizes[1:])
    continuations = []
    for i, prompt in enumerate(prompts):
        alone = rollout([prompt])
        continuations.append(response_token_ids(alone)[0])
        assert response_token_ids(shared)[i] == continuations[-1]
    assert len(set(map(tuple, continuations))) == 3  # the prompts continue differently: a mix-up would show


def test_a_model_that_ignores_the_kv_cache_is_stopped_before_it_samples_blind() -> None:
    class DropsTheCache(torch.nn.Module):  # a forward that swallows the cache under an unknown name
        def __init__(self, inner):
            super().__init__()
            self.inner, self.config = inner, inner.config

        def forward(self, **kwargs):
            kwargs.pop("past_key_values", None)
            return self.inner(**kwargs)

    model = DropsTheCache(_tiny_model())
    with pytest.raises(RuntimeError, match="did not fill the KV cache"):
        sample(model, [[5, 6, 7]], pad_id=0, eos_ids=[2], max_new_tokens=4, temperature=1.0, top_p=1.0,
               device=torch.device("cpu"))  # fmt: skip
