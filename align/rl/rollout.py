"""Sampling responses: left-padded prompts, top-p/temperature, stop and truncate at EOS."""

from __future__ import annotations

import functools
import inspect
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from align.data.formats import read_other_columns
from align.modeling.models import unwrap_model
from align.modeling.rows import position_ids
from align.rl.reward_fns import Episodes
from align.rl.rewards import has_eos, response_mask_after_eos


@dataclass
class Rollout:
    """One batch of episodes; `prompt_len` columns of left-padded prompt, then the response."""

    input_ids: Tensor  # [N, P + R]
    attention_mask: Tensor  # [N, P + R]; response positions after the first EOS are 0
    response_mask: Tensor  # [N, R] float
    ended_with_eos: Tensor  # [N] bool
    prompt_len: int


def response_token_ids(rollout: Rollout) -> list[list[int]]:
    """Each response's tokens up to and including its end (EOS or end of turn), without padding."""
    response_ids = rollout.input_ids[:, rollout.prompt_len :]
    return [ids[mask.bool()].tolist() for ids, mask in zip(response_ids, rollout.response_mask, strict=True)]


def decode_responses(tokenizer, rollout: Rollout) -> list[str]:
    """Each response's text, without the padding after its end and without special tokens."""
    return [tokenizer.decode(ids, skip_special_tokens=True) for ids in response_token_ids(rollout)]


def rollout_episodes(tokenizer, rollout: Rollout, prompt_rows: list[dict]) -> Episodes:
    """A rollout as reward functions see it; ``prompt_rows[i]`` is the prompt row of response ``i``."""
    return Episodes(
        prompts=[row["prompt"] for row in prompt_rows],
        responses=decode_responses(tokenizer, rollout),
        response_ids=response_token_ids(rollout),
        ended=rollout.ended_with_eos.tolist(),
        columns=[read_other_columns(row) for row in prompt_rows],
        conversational=[row["conversational"] for row in prompt_rows],
    )


def left_pad(sequences: list[list[int]], pad_id: int, device: torch.device) -> tuple[Tensor, Tensor]:
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for i, seq in enumerate(sequences):
        ids[i, width - len(seq) :] = torch.tensor(seq, dtype=torch.long)
        mask[i, width - len(seq) :] = 1
    return ids.to(device), mask.to(device)


@torch.no_grad()  # not inference_mode: the update embeds these ids again, under autograd
def sample(
    model: nn.Module,
    prompts: list[list[int]],
    *,
    pad_id: int,
    eos_ids: list[int],
    max_new_tokens: int,
    temperature: float,
    top_p: float,
    device: torch.device,
) -> Rollout:
    """Sample one response per prompt with a KV cache, stopping each row at its first EOS.

    A plain loop instead of ``model.generate``: on small models generate's per-token bookkeeping
    (logits processors, stopping criteria, cache and mask preparation) costs more than the model
    itself (bench/ppo_throughput.py). The distribution is generate's: temperature, then top-p
    with the same cut, no top-k. Log-probs are not taken from here; the update recomputes them
    with the train-layout forward (align/rl/forward.py), so sampling may round differently.
    """
    prompt_ids, prompt_mask = left_pad(prompts, pad_id, device)
    was_training = model.training
    model.eval()
    try:
        response = _sample_tokens(model, prompt_ids, prompt_mask, pad_id, eos_ids, max_new_tokens, temperature, top_p)
    finally:
        model.train(was_training)
    return make_rollout(prompt_ids, prompt_mask, response, pad_id, eos_ids)


def make_rollout(prompt_ids: Tensor, prompt_mask: Tensor, response: Tensor, pad_id: int, eos_ids: list[int]) -> Rollout:
    """Left-padded ``[N, P]`` prompts and ``[N, R]`` sampled ids -> a Rollout, each response cut after
    its first end-of-turn or EOS token."""
    prompt_len = prompt_ids.shape[1]
    response_mask = response_mask_after_eos(response, eos_ids)
    # Everything after the first EOS is padding, whatever was sampled there.
    response = torch.where(response_mask.bool(), response, torch.full_like(response, pad_id))
    return Rollout(
        input_ids=torch.cat([prompt_ids, response], dim=1),
        attention_mask=torch.cat([prompt_mask, response_mask.long()], dim=1),
        response_mask=response_mask.float(),
        ended_with_eos=has_eos(response, response_mask, eos_ids),
        prompt_len=prompt_len,
    )


def _sample_tokens(
    model: nn.Module,
    prompt_ids: Tensor,
    prompt_mask: Tensor,
    pad_id: int,
    eos_ids: list[int],
    max_new_tokens: int,
    temperature: float,
    top_p: float,
) -> Tensor:
    """``[N, P]`` left-padded prompts -> ``[N, R]`` sampled ids, ``R <= max_new_tokens``.

    Each distinct prompt is prefilled once and its cache copied to every row that has it (a group
    of responses to one prompt): the prefill is most of the work when prompts are long. The cache
    is allocated once for the longest possible rollout (transformers' StaticCache): a growing one
    copies itself at every token, a fifth of the sampling time at 20M parameters."""
    from transformers import StaticCache

    n, width = prompt_ids.shape
    eos = torch.as_tensor(eos_ids, device=prompt_ids.device)
    distinct, row_of = torch.unique(torch.cat([prompt_ids, prompt_mask], 1), dim=0, return_inverse=True)
    cache = StaticCache(config=model.config, max_cache_len=width + max_new_tokens)
    logits = _next_logits(model, distinct[:, :width], distinct[:, width:], position_ids(distinct[:, width:]), cache)
    if int(cache.get_seq_length()) != width:
        raise RuntimeError(f"{type(model).__name__} did not fill the KV cache it was given (transformers' cache API)")
    cache.reorder_cache(row_of)
    logits = logits[row_of]
    mask = prompt_mask
    positions = position_ids(mask)[:, -1:]  # as the scoring and training forwards count them
    done = torch.zeros(n, dtype=torch.bool, device=prompt_ids.device)
    out: list[Tensor] = []
    for t in range(max_new_tokens):
        next_ids = sample_next(logits, temperature, top_p)
        next_ids = torch.where(done, torch.full_like(next_ids, pad_id), next_ids)
        out.append(next_ids)
        done = done | torch.isin(next_ids, eos)
        # One check per token; the alternative (always max_new_tokens) costs more on short answers.
        if t + 1 == max_new_tokens or bool(done.all()):
            break
        positions = positions + 1
        mask = torch.cat([mask, mask.new_ones(n, 1)], dim=1)
        logits = _next_logits(model, next_ids[:, None], mask, positions, cache)
    return torch.stack(out, dim=1)


def _next_logits(model: nn.Module, ids: Tensor, mask: Tensor, positions: Tensor, cache) -> Tensor:
    """``[N, V]`` fp32 logits for the token after ``ids``, extending ``cache``."""
    inputs = {"input_ids": ids, "attention_mask": mask, "position_ids": positions, _cache_keyword(model): cache}
    return model(**inputs, use_cache=True, logits_to_keep=1).logits[:, -1].float()


def _cache_keyword(model: nn.Module) -> str:
    # transformers renamed `past_key_values` to `cache` (5.2x); under the other name a forward
    # takes the cache as an unknown keyword, ignores it and sees only the newest token.
    return _forward_cache_keyword(type(unwrap_model(model)))


@functools.cache
def _forward_cache_keyword(model_class: type) -> str:
    return "cache" if "cache" in inspect.signature(model_class.forward).parameters else "past_key_values"


def sample_next(logits: Tensor, temperature: float, top_p: float) -> Tensor:
    """``[N, V]`` logits -> ``[N]`` ids: temperature, then nucleus (top-p) sampling."""
    if temperature != 1.0:
        logits = logits / temperature
    return draw(top_p_filter(logits, top_p).softmax(dim=-1))


def draw(probs: Tensor) -> Tensor:
    """One index per row of ``[N, V]`` probabilities: the inverse of the cumulative distribution at
    one uniform draw per row. `torch.multinomial` draws an exponential per token instead, 10x
    slower at a 49k vocabulary (58 against 5-12 ms for 32 rows on one core: a fifth of SmolLM2's
    sampling). The sum runs in float64, so a token as rare as 1e-12 keeps its probability."""
    cdf = probs.double().cumsum(dim=-1)
    total = cdf[:, -1:]
    index = torch.searchsorted(cdf, torch.rand_like(total) * total, right=True)
    # A draw that rounds up to the total would land past the end: keep the last token drawable.
    return torch.minimum(index, (cdf < total).sum(-1, keepdim=True)).squeeze(-1)


def top_p_filter(logits: Tensor, top_p: float) -> Tensor:
    """``[N, V]`` logits with the tokens outside the nucleus set to -inf, as transformers'
    ``TopPLogitsWarper`` cuts: drop the tokens whose cumulative probability, summed from the least
    likely up, is at most ``1 - top_p``; keep the most likely."""
    if top_p >= 1.0:
        return logits
    sorted_logits, sorted_idx = torch.sort(logits, descending=False)
    cum_probs = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
    remove = cum_probs <= (1 - top_p)
    remove[:, -1] = False
    return logits.masked_fill(remove.scatter(1, sorted_idx, remove), float("-inf"))


def micro_batches(n: int, size: int, generator: torch.Generator | None = None) -> Iterator[Tensor]:
    order = torch.randperm(n, generator=generator)
    for start in range(0, n, size):
        yield order[start : start + size]
