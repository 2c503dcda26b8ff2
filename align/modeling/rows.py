"""Rows of tokens for scoring and training forwards: padded as stored, or packed without padding.

A PPO rollout is stored padded: prompts on the left, responses after their EOS on the right. Every
forward and backward pays for the padding in proportion to its share of the batch, and on real
prompt sets (a few tokens to a thousand) with responses that stop at EOS that share is large.
`PackedRows` concatenates the real tokens of all rows into one row, with position ids restarting
at each row, holds a prompt that several rows share once (a group of responses to one prompt),
and keeps attention inside each row (`PACKED_SDPA`, registered with transformers: one SDPA call
per segment of the packed row). Both layouts answer the same questions (the logits that predict
each response token, the hidden state before it, the state at each row's last real token), so a
forward is written once and gives the same numbers either way, up to float rounding.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from align.rl.rewards import last_token_index

PACKED_SDPA = "align_packed_sdpa"
PACKED_SEGMENTS = "packed_segments"  # the keyword that carries PackedRows.segments to attention


def position_ids(attention_mask: Tensor) -> Tensor:
    # Left-padded rows start counting at their first real token, as `generate` does.
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


class PaddedRows:
    """``[N, T]`` ids and 0/1 mask as stored; with `prompt_len`, the response is ``ids[:, prompt_len:]``."""

    def __init__(self, input_ids: Tensor, attention_mask: Tensor, prompt_len: int | None = None) -> None:
        self.input_ids, self.attention_mask, self.prompt_len = input_ids, attention_mask, prompt_len

    def model_inputs(self) -> dict[str, Tensor]:
        return {
            "input_ids": self.input_ids,
            "attention_mask": self.attention_mask,
            "position_ids": position_ids(self.attention_mask),
        }

    @property
    def logits_to_keep(self) -> int:
        # Logits only where a response token is predicted: the last prompt position onwards.
        return self.input_ids.shape[1] - self.prompt_len + 1

    def response_logits(self, kept_logits: Tensor) -> Tensor:
        """The model's logits at `logits_to_keep` -> those predicting each response token."""
        return kept_logits[:, :-1]

    @property
    def response_tokens(self) -> Tensor:
        return self.input_ids[:, self.prompt_len :]

    def before_response(self, hidden: Tensor) -> Tensor:
        """``[N, T, H]`` -> ``[N, R, H]``: the state before each response token (its value's input)."""
        return hidden[:, self.prompt_len - 1 : -1]

    def to_rows(self, per_response_token: Tensor) -> Tensor:
        return per_response_token

    def at_last_token(self, hidden: Tensor) -> Tensor:
        """``[N, T, H]`` -> ``[N, H]`` at each row's last real token (padding on either side)."""
        index = last_token_index(self.attention_mask)
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), index]


class PackedRows:
    """The real tokens of ``[N, T]`` padded rows as one row ``[1, L]``, each distinct prompt once.

    With `prompt_len`, the packed row holds each distinct prompt as a segment, followed by the
    response of every row with that prompt, each a segment that attends to the prompt and to
    itself. Rows with the same prompt (a GRPO group, PPO's responses per prompt) share its forward,
    computed once, and its gradient collects all of theirs. A prompt is a segment of its own even
    when one row has it, so a response's numbers do not depend on which rows share the batch (the
    first PPO ratio stays exactly 1 when the update's micro-batches regroup the rollout). Without
    `prompt_len`, each row is one segment. Response positions after a row's EOS (mask 0) are not
    in the packed row; `to_rows` gives them 0, and every loss masks them.
    """

    def __init__(self, input_ids: Tensor, attention_mask: Tensor, prompt_len: int | None = None) -> None:
        real = attention_mask.bool()
        if bool((real.sum(-1) == 0).any()):
            raise ValueError("PackedRows: a row has no real token")
        n, width = real.shape
        split = width if prompt_len is None else prompt_len
        # The layout is worked out on the CPU (a few small tensors per row) and moved over once.
        on_cpu, ids_on_cpu = real.cpu(), input_ids.reshape(-1).cpu()
        flat = torch.arange(n * width).reshape(n, width)
        prompts = [flat[i, :split][on_cpu[i, :split]] for i in range(n)]  # flat indices of real tokens
        responses = [flat[i, split:][on_cpu[i, split:]] for i in range(n)]
        if prompt_len is not None and any(len(p) == 0 for p in prompts):
            raise ValueError("PackedRows: a row has no prompt token to predict its response from")

        pieces: list[Tensor] = []  # flat indices, in packed order
        segments: list[tuple[int, int, int, int]] = []  # start, end, and its prompt's start and end
        last = [0] * n  # packed index of each row's last real token
        before = [torch.empty(0, dtype=torch.long)] * n  # packed indices predicting each response token

        def add(piece: Tensor, prompt: tuple[int, int] = (0, 0)) -> tuple[int, int]:
            start = segments[-1][1] if segments else 0
            pieces.append(piece)
            segments.append((start, start + len(piece), *prompt))
            return start, start + len(piece)

        rows_of: dict[tuple[int, ...], list[int]] = {}
        for i in range(n):
            key = (i,) if prompt_len is None else tuple(ids_on_cpu[prompts[i]].tolist())
            rows_of.setdefault(key, []).append(i)
        for members in rows_of.values():
            prompt = add(prompts[members[0]])
            for i in members:
                last[i] = prompt[1] - 1
                if prompt_len is not None and len(responses[i]):
                    start, end = add(responses[i], prompt)
                    before[i] = torch.arange(start - 1, end - 1)
                    before[i][0] = prompt[1] - 1  # the first response token is predicted at the prompt's end
                    last[i] = end - 1

        order = torch.cat(pieces).to(real.device)
        self.input_ids = input_ids.reshape(-1)[order].unsqueeze(0)
        self.position_ids = position_ids(attention_mask).reshape(-1)[order].unsqueeze(0)
        self.segments = segments
        self._last_index = torch.tensor(last, device=real.device)
        if prompt_len is not None:
            self.response_real = real[:, prompt_len:]
            self._before_index = torch.cat(before).to(real.device)  # [K], rows in order
            self._response_tokens = input_ids[:, prompt_len:][self.response_real]

    def model_inputs(self) -> dict[str, Tensor | list[tuple[int, int, int, int]]]:
        # Every keyword reaches the attention function of each layer (transformers passes them on).
        return {"input_ids": self.input_ids, "position_ids": self.position_ids, PACKED_SEGMENTS: self.segments}

    @property
    def logits_to_keep(self) -> Tensor:
        return self._before_index

    def response_logits(self, kept_logits: Tensor) -> Tensor:
        return kept_logits[0]  # [K, V]

    @property
    def response_tokens(self) -> Tensor:
        return self._response_tokens

    def before_response(self, hidden: Tensor) -> Tensor:
        return hidden[0, self._before_index]  # [K, H]

    def to_rows(self, per_response_token: Tensor) -> Tensor:
        """``[K, ...]`` (one per real response token) -> ``[N, R, ...]``, 0 after each EOS."""
        out = per_response_token.new_zeros((*self.response_real.shape, *per_response_token.shape[1:]))
        out[self.response_real] = per_response_token
        return out

    def at_last_token(self, hidden: Tensor) -> Tensor:
        return hidden[0, self._last_index]


Rows = PaddedRows | PackedRows


def make_rows(input_ids: Tensor, attention_mask: Tensor, prompt_len: int | None, *, packed: bool) -> Rows:
    return (PackedRows if packed else PaddedRows)(input_ids, attention_mask, prompt_len)


# --- attention ---------------------------------------------------------------------------------


def can_pack(model: nn.Module) -> bool:
    """Whether `enable_packing` can switch this Hugging Face model's attention to `PACKED_SDPA`.

    It must use SDPA through transformers' attention interface, with full causal attention in
    every layer (a sliding window would need a window inside each packed row).
    """
    config = getattr(model, "config", None)
    if config is None or getattr(config, "_attn_implementation", None) not in ("sdpa", PACKED_SDPA):
        return False
    if not getattr(model, "_can_set_attn_implementation", lambda: False)():
        return False
    layer_types = getattr(config, "layer_types", None)
    if layer_types is not None:
        return all(kind == "full_attention" for kind in layer_types)
    return getattr(config, "sliding_window", None) is None or getattr(config, "use_sliding_window", True) is False


def enable_packing(model: nn.Module) -> None:
    """Run this model's attention through `PACKED_SDPA`: plain SDPA for padded rows (generation
    included, with the same masks as before), one causal SDPA per row for packed ones."""
    _register()
    model.set_attn_implementation(PACKED_SDPA)
    if model.config._attn_implementation != PACKED_SDPA:
        raise RuntimeError(f"{type(model).__name__} kept attention '{model.config._attn_implementation}'")


def _packed_sdpa_attention(
    module: nn.Module,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attention_mask: Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    packed_segments: list[tuple[int, int, int, int]] | None = None,
    **kwargs,
) -> tuple[Tensor, None]:
    """``query [1, heads, L, d]`` of packed rows -> ``[1, L, heads, d]``; padded rows go to SDPA.

    One SDPA call per segment of `PackedRows.segments`: causal inside it, and a response segment
    after a shared prompt also sees the whole prompt (its keys and values come first)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if packed_segments is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout, scaling, **kwargs)
    unsupported = [k for k in ("position_bias", "softcap", "s_aux") if kwargs.get(k) is not None]
    if unsupported or query.shape[0] != 1:
        raise ValueError(f"packed rows cannot run attention with {unsupported or 'a batch of several rows'}")
    grouped = query.shape[1] != key.shape[1]
    # Split, not sliced: the backward of a slice allocates a zero tensor of the whole input for
    # each segment, the backward of a split is one concatenation.
    sizes = [end - start for start, end, _, _ in packed_segments]
    queries, keys, values = (t.split(sizes, dim=2) for t in (query, key, value))
    segment_at = {start: i for i, (start, _, _, _) in enumerate(packed_segments)}
    parts = []
    for i, (start, end, prompt_start, prompt_end) in enumerate(packed_segments):
        k, v, mask = keys[i], values[i], None
        if prompt_end > prompt_start:
            prompt = segment_at[prompt_start]
            k, v = torch.cat([keys[prompt], k], dim=2), torch.cat([values[prompt], v], dim=2)
            seen = prompt_end - prompt_start
            mask = torch.ones(end - start, seen + end - start, dtype=torch.bool, device=query.device).tril(seen)
        parts.append(
            F.scaled_dot_product_attention(
                queries[i],
                k,
                v,
                attn_mask=mask,
                dropout_p=dropout,
                scale=scaling,
                is_causal=mask is None,
                enable_gqa=grouped,
            )
        )
    return torch.cat(parts, dim=2).transpose(1, 2).contiguous(), None


def _packed_sdpa_mask(*args, attention_mask=None, q_length=None, kv_length=None, kv_offset=0, **kwargs):
    """SDPA's masks, except none at all for unpadded input without a cache: packed rows are kept
    apart by `_packed_sdpa_attention` (a [T, T] mask would cost T^2 memory for nothing), and an
    unpadded batch is plain causal."""
    from transformers.masking_utils import sdpa_mask

    if attention_mask is None and q_length == kv_length and kv_offset == 0:
        return None
    return sdpa_mask(
        *args, attention_mask=attention_mask, q_length=q_length, kv_length=kv_length, kv_offset=kv_offset, **kwargs
    )


def _register() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS

    AttentionInterface.register(PACKED_SDPA, _packed_sdpa_attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register(PACKED_SDPA, _packed_sdpa_mask)
