"""Forward passes over (prompt + response) batches: token log-probs, values, dropout off.

Rollout and update must compute the same numbers for the same tokens (ppo_details: a mismatch
shows up as a first-epoch ratio away from 1 or a negative KL), so both go through these
functions, with the same row layout (align/modeling/rows.py), position ids and temperature as sampling.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from align.modeling.models import unwrap_model
from align.modeling.rows import Rows
from align.rl.losses import logprobs_from_logits, token_entropy


def disable_dropout(model: nn.Module) -> None:
    """PPO needs reproducible log-probs between rollout and update: no dropout anywhere.

    Attention layers keep their rate as a plain float read at call time (Qwen2's
    `attention_dropout`), not as an nn.Dropout, so both kinds are zeroed.
    """
    for module in [model, *model.modules()]:
        if isinstance(module, nn.Dropout):
            module.p = 0.0
        for key in _DROPOUT_ATTRS:
            if isinstance(getattr(module, key, None), float):
                setattr(module, key, 0.0)
        config = getattr(module, "config", None)
        for key in _DROPOUT_ATTRS:
            if config is not None and isinstance(getattr(config, key, None), float):
                setattr(config, key, 0.0)


_DROPOUT_ATTRS = ("attention_dropout", "hidden_dropout", "dropout", "resid_pdrop", "embd_pdrop", "attn_pdrop")


def response_logprobs(
    model: nn.Module, rows: Rows, temperature: float, *, with_entropy: bool = False
) -> tuple[Tensor, Tensor | None]:
    """Log-probs ``[N, R]`` of the response tokens (and their entropies), padded or packed rows."""
    out = model(**rows.model_inputs(), logits_to_keep=rows.logits_to_keep, use_cache=False)
    logits = rows.response_logits(out.logits)
    logp = logprobs_from_logits(logits, rows.response_tokens, temperature)
    entropy = None
    if with_entropy:
        with torch.no_grad():
            entropy = rows.to_rows(token_entropy(logits.detach(), temperature))
    return rows.to_rows(logp), entropy


class ValueModel(nn.Module):
    """A scalar head on a transformer backbone, read at every response position.

    Built from a sequence-classification checkpoint (a reward model, as Qwen and InstructGPT
    initialise it, or the policy with a fresh head); its `score` head gives one value per token.
    """

    def __init__(self, seq_cls_model: nn.Module) -> None:
        super().__init__()
        self.model = seq_cls_model

    @property
    def config(self):
        return self.model.config

    def save_pretrained(self, folder, **kwargs) -> None:
        """Saved as the sequence-classification model it wraps, which loads on its own."""
        self.model.save_pretrained(folder, **kwargs)

    @property
    def hf_model(self) -> nn.Module:
        """The sequence-classification model (inside a PEFT wrapper, whose layers are patched in place)."""
        return unwrap_model(self.model)

    def forward(self, rows: Rows) -> Tensor:
        """``[N, R]`` values of the states before each response token."""
        inner = self.hf_model
        backbone = getattr(inner, inner.base_model_prefix)
        hidden = backbone(**rows.model_inputs(), use_cache=False).last_hidden_state
        return rows.to_rows(inner.score(rows.before_response(hidden)).squeeze(-1).float())
