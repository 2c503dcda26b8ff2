"""A reward model whose tokenizer is not the policy's reads PPO's responses as text, in its own tokens."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, AutoModelForSequenceClassification

from align.config import ModelConfig
from align.errors import ModelError
from align.modeling import models
from align.modeling.reward_model import (
    load_reward_model,
    own_tokenizer,
    rewards_at_last_token,
    score_conversations,
    text_rewards,
)

TINY = Path(__file__).resolve().parents[2] / "align" / "assets" / "tiny"


def reward_model_of_another_tokenizer(folder: Path) -> Path:
    """A random tiny reward model whose tokenizer numbers the ordinary tokens the other way round
    (special tokens kept): read on the policy's ids, its rewards would be of other text."""
    folder.mkdir()
    spec = json.loads((TINY / "tokenizer.json").read_text())
    special = {t["id"] for t in spec["added_tokens"]}
    vocab = spec["model"]["vocab"]
    ordinary = sorted((i, token) for token, i in vocab.items() if i not in special)
    for (_, token), new_id in zip(ordinary, reversed([i for i, _ in ordinary]), strict=True):
        vocab[token] = new_id
    (folder / "tokenizer.json").write_text(json.dumps(spec))
    shutil.copy(TINY / "tokenizer_config.json", folder)
    config = AutoConfig.from_pretrained(TINY, num_labels=1)
    torch.manual_seed(0)
    AutoModelForSequenceClassification.from_config(config).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def policy_tokenizer():
    return models.load_tokenizer(ModelConfig(name_or_path=str(TINY)))


def test_the_same_tokenizer_or_none_on_disk_scores_the_policys_ids(tmp_path, policy_tokenizer):
    assert own_tokenizer(str(TINY), policy_tokenizer) is None
    (tmp_path / "weights_only").mkdir()
    shutil.copy(TINY / "config.json", tmp_path / "weights_only")
    assert own_tokenizer(str(tmp_path / "weights_only"), policy_tokenizer) is None


def test_another_vocabulary_is_read_as_text_as_in_training(tmp_path, policy_tokenizer):
    rm = reward_model_of_another_tokenizer(tmp_path / "rm")
    tokenizer = own_tokenizer(str(rm), policy_tokenizer)
    assert tokenizer is not None and tokenizer.get_vocab() != policy_tokenizer.get_vocab()
    model = load_reward_model(str(rm)).eval()
    prompts = [[{"role": "user", "content": "Sort: 3 1 2"}], [{"role": "system", "content": "Be brief."},
               {"role": "user", "content": "Sort: 9 8"}]]  # fmt: skip
    responses = ["1 2 3", "8 9 and more"]
    # A finished response is a whole assistant turn, read at its end-of-turn token: as the RM stage reads it.
    finished = text_rewards(model, tokenizer, prompts, responses, [True, True], torch.device("cpu"))
    whole = [[*p, {"role": "assistant", "content": r}] for p, r in zip(prompts, responses, strict=True)]
    assert finished.tolist() == pytest.approx(score_conversations(str(rm), whole), abs=1e-5)
    # One cut off at the length limit has no end of turn, as the policy's own tokens had none.
    cut = text_rewards(model, tokenizer, prompts[:1], responses[:1], [False], torch.device("cpu"))
    ids = tokenizer(tokenizer.apply_chat_template(prompts[0], tokenize=False, add_generation_prompt=True) + "1 2 3",
                    add_special_tokens=False, return_tensors="pt")["input_ids"]  # fmt: skip
    with torch.no_grad():
        expected = rewards_at_last_token(model, ids, torch.ones_like(ids))
    assert cut.item() == pytest.approx(expected.item(), abs=1e-5)
    assert cut.item() != pytest.approx(finished[0].item(), abs=1e-4)


def test_an_episode_longer_than_the_reward_models_context_is_read_from_its_end(tmp_path, policy_tokenizer):
    rm = reward_model_of_another_tokenizer(tmp_path / "rm")
    tokenizer = own_tokenizer(str(rm), policy_tokenizer)
    model = load_reward_model(str(rm)).eval()
    model.config.max_position_embeddings = 16
    prompt = [{"role": "user", "content": "Sort: " + " ".join(str(i % 10) for i in range(40))}]
    with pytest.warns(UserWarning, match="reads 16 tokens at most: longer episodes lose the start of their prompt"):
        cut = text_rewards(model, tokenizer, [prompt], ["0 1 2"], [False], torch.device("cpu"))
    ids = tokenizer(tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True) + "0 1 2",
                    add_special_tokens=False, return_tensors="pt")["input_ids"]  # fmt: skip
    assert ids.shape[1] > 16
    with torch.no_grad():
        expected = rewards_at_last_token(model, ids[:, -16:], torch.ones(1, 16, dtype=torch.long))
    assert cut.item() == pytest.approx(expected.item(), abs=1e-5)


def test_a_reward_model_without_a_chat_template_is_refused(tmp_path, policy_tokenizer):
    folder = tmp_path / "plain"
    folder.mkdir()
    spec = json.loads((TINY / "tokenizer.json").read_text())
    spec["added_tokens"] = [t for t in spec["added_tokens"] if t["content"] == "<|endoftext|>"]
    for token in ("<|im_start|>", "<|im_end|>"):
        del spec["model"]["vocab"][token]
    (folder / "tokenizer.json").write_text(json.dumps(spec))
    (folder / "tokenizer_config.json").write_text(
        json.dumps({"eos_token": "<|endoftext|>", "tokenizer_class": "PreTrainedTokenizerFast"})
    )
    AutoConfig.from_pretrained(TINY, vocab_size=1438).save_pretrained(folder)
    with pytest.raises(ModelError, match="has no chat template"):
        own_tokenizer(str(folder), policy_tokenizer)


def test_the_pipeline_summary_reads_such_a_reward_model_as_ppo_does(tmp_path, policy_tokenizer, monkeypatch):
    from transformers import AutoModelForCausalLM

    import align.modeling.reward_model
    from align.config import AlignConfig, PipelineConfig
    from align.data import load_recipe_data
    from align.run.summary import evaluate_policies

    outputs = {stage: tmp_path / stage for stage in ("sft", "rm", "ppo")}
    torch.manual_seed(0)
    policy = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(TINY))
    for stage in ("sft", "ppo"):
        policy.save_pretrained(outputs[stage] / "final")
        policy_tokenizer.save_pretrained(outputs[stage] / "final")
    outputs["rm"].mkdir()
    reward_model_of_another_tokenizer(outputs["rm"] / "final")
    readings = []

    def spy(model, tokenizer, prompts, responses, ended, device):
        assert tokenizer.get_vocab() != policy_tokenizer.get_vocab()
        readings.append(text_rewards(model, tokenizer, prompts, responses, ended, device))
        return readings[-1]

    monkeypatch.setattr(align.modeling.reward_model, "text_rewards", spy)
    config = AlignConfig(
        stage_name="pipeline", output_dir=str(tmp_path), pipeline=PipelineConfig(eval_max_new_tokens=4)
    )
    prompts = load_recipe_data("demo_prompts_eval", "prompt", policy_tokenizer, seed=0, cache_dir=str(tmp_path / "c"))
    result = evaluate_policies(config, outputs, "ppo", policy_tokenizer, prompts.train.select(range(3)))
    assert len(readings) == 2 and all(r.shape == (3,) for r in readings)  # the SFT and the PPO policy
    assert [result["proxy_sft"], result["proxy_ppo"]] == [r.mean().item() for r in readings]


def test_a_reward_is_read_at_the_end_of_the_turn_even_when_eos_is_another_token(tmp_path):
    """A base tokenizer's EOS (<|endoftext|>) is not in a rendered turn; the reward is read at the
    template's end of turn (<|im_end|>), where a PPO response stops, not at the newline after it."""
    from transformers import AutoTokenizer

    folder = tmp_path / "rm"
    torch.manual_seed(0)
    AutoModelForSequenceClassification.from_config(AutoConfig.from_pretrained(TINY, num_labels=1)).save_pretrained(
        folder
    )
    tokenizer = AutoTokenizer.from_pretrained(TINY)
    tokenizer.eos_token = "<|endoftext|>"
    tokenizer.save_pretrained(folder)
    conversation = [{"role": "user", "content": "Sort: 3 1"}, {"role": "assistant", "content": "1 3"}]
    (got,) = score_conversations(str(folder), [conversation])
    ids = tokenizer.apply_chat_template(conversation, tokenize=True, return_dict=False)
    assert tokenizer.convert_ids_to_tokens(ids[-2:]) == ["<|im_end|>", "Ċ"]
    model = load_reward_model(str(folder)).eval()
    with torch.no_grad():
        at_end_of_turn, at_newline = (
            rewards_at_last_token(model, torch.tensor([row]), torch.ones(1, len(row), dtype=torch.long)).item()
            for row in (ids[:-1], ids)
        )
    assert got == pytest.approx(at_end_of_turn, abs=1e-6) and got != pytest.approx(at_newline, abs=1e-4)
