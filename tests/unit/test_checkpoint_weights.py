"""The weights an inference engine is given (align/rl/weights.py): a plain model loaded with them
computes what the trained model computes, LoRA folded in, and the trained model is left untouched."""

import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoConfig, AutoModelForCausalLM

from align.config import REPO_ROOT
from align.rl.weights import checkpoint_weights


def _tiny() -> AutoModelForCausalLM:
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(REPO_ROOT / "align" / "assets" / "tiny")).eval()


def _logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_a_plain_model_gets_its_own_state_under_its_own_names() -> None:
    model = _tiny()
    weights = dict(checkpoint_weights(model))
    # A tied weight under each of its names (the LM head shares the embedding), as in a state dict.
    assert "lm_head.weight" in weights
    assert weights.keys() == dict(model.named_parameters(remove_duplicate=False)).keys()
    assert all(torch.equal(weights[name], p) for name, p in model.named_parameters(remove_duplicate=False))


def test_lora_is_folded_into_its_base_and_the_trained_model_is_not_changed() -> None:
    model = get_peft_model(
        _tiny(),
        LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "down_proj"], modules_to_save=["norm"]),
    )
    with torch.no_grad():  # a trained adapter: B is zero at initialisation, which would hide a missing update
        for name, param in model.named_parameters():
            if "lora_B" in name or "modules_to_save" in name:
                param.add_(torch.randn_like(param) * 0.05)
    before = {name: param.clone() for name, param in model.named_parameters()}
    weights = dict(checkpoint_weights(model))

    assert not any("lora" in name or "base_layer" in name or "modules_to_save" in name for name in weights)
    plain = _tiny()
    plain.load_state_dict(weights, strict=False)
    assert set(weights) == set(dict(plain.named_parameters(remove_duplicate=False)))
    ids = torch.randint(0, plain.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(_logits(plain, ids), _logits(model, ids), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(_logits(plain, ids), _logits(_tiny(), ids))  # the adapter did change the outputs
    assert all(torch.equal(param, before[name]) for name, param in model.named_parameters())


def test_gathered_modules_yield_copies_made_while_whole() -> None:
    """Under ZeRO-3 a module is whole only inside its gather: what is yielded must outlive it."""
    model = _tiny()
    whole = {name: param.clone() for name, param in model.named_parameters()}
    gathered: list[int] = []

    class Gather:
        def __init__(self, params):
            self.params = params

        def __enter__(self):
            gathered.append(len(self.params))

        def __exit__(self, *exc):
            for param in self.params:  # partitioned again: the rank's shard is all that is left
                param.data.zero_()

    weights = dict(checkpoint_weights(model, Gather))
    assert all(torch.equal(weights[name], whole[name]) for name in whole)
    # One gather per module that holds weights, never one for the whole model.
    assert max(gathered) < len(whole) and len(gathered) > 1
