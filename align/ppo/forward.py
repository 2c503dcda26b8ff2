"""Forward passes over (prompt + response) batches: token log-probs, values, dropout off.

Rollout and update must compute the same numbers for the same tokens (ppo_details: a mismatch
shows up as a first-epoch ratio away from 1 or a negative KL), so both go through these
functions, with the same position ids and the same temperature as sampling.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from align.ppo.losses import logprobs_from_logits, token_entropy


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


def position_ids(attention_mask: Tensor) -> Tensor:
    # Left-padded rows start counting at their first real token, as `generate` does.
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def response_logprobs(
    model: nn.Module,
    input_ids: Tensor,
    attention_mask: Tensor,
    prompt_len: int,
    temperature: float,
    *,
    with_entropy: bool = False,
) -> tuple[Tensor, Tensor | None]:
    """Log-probs ``[B, R]`` of the response tokens ``input_ids[:, prompt_len:]`` (and entropies)."""
    response_len = input_ids.shape[1] - prompt_len
    # Logits only where a response token is predicted: the last prompt position onwards.
    out = model(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids(attention_mask),
        logits_to_keep=response_len + 1,
        use_cache=False,
    )
    logits = out.logits[:, :-1]
    logp = logprobs_from_logits(logits, input_ids[:, prompt_len:], temperature)
    entropy = None
    if with_entropy:
        with torch.no_grad():
            entropy = token_entropy(logits.detach(), temperature)
    return logp, entropy


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

    def forward(self, input_ids: Tensor, attention_mask: Tensor, prompt_len: int) -> Tensor:
        inner = self.model
        if hasattr(inner, "get_base_model"):  # a PEFT wrapper: its layers are already patched in place
            inner = inner.get_base_model()
        backbone = getattr(inner, inner.base_model_prefix)
        hidden = backbone(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids(attention_mask),
            use_cache=False,
        ).last_hidden_state
        # The value of the state before each response token: hidden states one position earlier.
        hidden = hidden[:, prompt_len - 1 : -1]
        return inner.score(hidden).squeeze(-1).float()
