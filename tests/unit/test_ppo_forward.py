"""Rollout and update see the same log-probs: generation's own logits vs our training forward."""

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from align.config import REPO_ROOT
from align.modeling.rows import PaddedRows, enable_packing, make_rows
from align.rl.forward import disable_dropout, response_logprobs
from align.rl.rollout import left_pad

TINY = REPO_ROOT / "align" / "assets" / "tiny"


def _tiny_model() -> torch.nn.Module:
    config = AutoConfig.from_pretrained(TINY)
    config.update({"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "attention_dropout": 0.3})
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    disable_dropout(model)
    return model.train()  # train mode on purpose: dropout must already be off


@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
def test_training_forward_reproduces_generation_logprobs_with_left_padding(packed):
    model = _tiny_model()
    if packed:
        enable_packing(model)  # generation still runs padded, through the same attention function
    prompts = [[5, 6, 7, 8, 9, 10, 11], [12, 13], [14, 15, 16, 17]]  # unequal: real left padding
    ids, mask = left_pad(prompts, pad_id=0, device=torch.device("cpu"))
    temperature = 0.7
    torch.manual_seed(1)
    with torch.no_grad():
        out = model.generate(
            input_ids=ids,
            attention_mask=mask,
            do_sample=True,
            temperature=temperature,
            top_k=0,
            max_new_tokens=6,
            min_new_tokens=6,
            output_logits=True,
            return_dict_in_generate=True,
            pad_token_id=0,
            eos_token_id=None,
        )
    response = out.sequences[:, ids.shape[1] :]
    gen_logits = torch.stack(out.logits, dim=1)  # raw logits at each generated position
    expected = torch.log_softmax(gen_logits.float() / temperature, -1).gather(-1, response.unsqueeze(-1)).squeeze(-1)

    full_mask = torch.cat([mask, torch.ones_like(response)], dim=1)
    with torch.no_grad():
        rows = make_rows(out.sequences, full_mask, ids.shape[1], packed=packed)
        logp, _ = response_logprobs(model, rows, temperature)
    torch.testing.assert_close(logp, expected, atol=1e-4, rtol=1e-4)


def test_policy_against_itself_has_zero_kl_and_unit_ratio():
    model = _tiny_model()
    ids, mask = left_pad([[5, 6, 7, 8], [9, 10]], pad_id=0, device=torch.device("cpu"))
    seq = torch.cat([ids, torch.tensor([[20, 21, 22], [23, 24, 25]])], dim=1)
    full = torch.cat([mask, torch.ones(2, 3, dtype=torch.long)], dim=1)
    rows = PaddedRows(seq, full, ids.shape[1])
    with torch.no_grad():
        old, _ = response_logprobs(model, rows, 1.0)
    new, _ = response_logprobs(model, rows, 1.0)  # with grad, as in the update
    assert torch.equal((new - old).exp(), torch.ones_like(old))
