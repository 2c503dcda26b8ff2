"""The scalar reward model: load it, read its reward at the last real token, score pairs and chats.

One function reads rewards, ``rewards_at_last_token``, and every user goes through it: the RM
stage's loss and evaluation, ``stage=rm_eval``, PPO and ``score_conversations``. It runs the
model, applies the score head to every position and gathers the value at the last position whose
attention mask is 1. Hugging Face's own ``*ForSequenceClassification.forward`` instead pools at
the last token that is not ``pad_token_id``; when pad is EOS (common for base models) that reads
the token before the EOS, and a pad id inside the text moves it too (TRL #2778, #3750). We never
use its pooled logits.

The reward is read at the end-of-turn token (ChatML ``<|im_end|>``): a rendered conversation is
cut after its last EOS (``trim_to_end_of_turn``), so a trained RM scores exactly what PPO hands
it, a prompt plus a generated response that stops at EOS.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import warnings
from collections.abc import Sequence
from pathlib import Path

import torch
from peft import PeftModel
from torch import Tensor
from transformers import AutoModelForSequenceClassification, PreTrainedModel, PreTrainedTokenizerBase

from align.config import ModelConfig, PeftConfig
from align.errors import ModelError
from align.modeling import models
from align.modeling.chat import encode, end_of_turn_id, render
from align.modeling.rows import PaddedRows, Rows

log = logging.getLogger("align.rm")

SCORE_HEAD = "score"  # the head's name in every *ForSequenceClassification decoder of transformers


# --- loading -----------------------------------------------------------------------------------


def load_reward_model(
    source: str | Path | ModelConfig,
    tokenizer: PreTrainedTokenizerBase | None = None,
    *,
    precision: str = "fp32",
    seed: int = 0,
    dropout: float | None = None,
) -> PreTrainedModel | PeftModel:
    """A scalar reward model (``AutoModelForSequenceClassification``, ``num_labels=1``).

    ``source`` is a directory or hub id, or a ModelConfig (``init: random`` builds the model from
    its config.json with ``seed``, the tiny demo). A causal-LM checkpoint (base or SFT) gets its
    backbone loaded and a new ``score`` head; an RM checkpoint keeps its head; a LoRA RM directory
    (an rm run's final/ with ``peft=lora``) loads its base, adapter and trained head. Every
    backbone weight must come from the checkpoint: a missing one fails here instead of training a
    half-random model. ``tokenizer`` sets ``pad_token_id`` and grows the embeddings to its size.
    """
    cfg = source if isinstance(source, ModelConfig) else ModelConfig(name_or_path=str(source))
    if cfg.init == "pretrained" and models.is_adapter_dir(cfg.name_or_path):
        return _load_adapter(Path(cfg.name_or_path), tokenizer, precision)
    config = models.load_model_config(cfg)
    config.num_labels = 1
    if dropout is not None and hasattr(config, "attention_dropout"):
        config.attention_dropout = dropout
    if tokenizer is not None:
        config.pad_token_id = tokenizer.pad_token_id
    kwargs = {"trust_remote_code": cfg.trust_remote_code, "attn_implementation": cfg.attn_implementation}
    dtype = models.torch_dtype(precision)
    if cfg.init == "random":
        torch.manual_seed(seed)
        model = AutoModelForSequenceClassification.from_config(config, dtype=dtype, **kwargs)
    else:
        torch.manual_seed(seed)  # the new score head of a causal-LM checkpoint is drawn here
        try:
            model, info = AutoModelForSequenceClassification.from_pretrained(
                cfg.name_or_path,
                config=config,
                revision=cfg.revision,
                dtype=dtype,
                use_safetensors=True,
                output_loading_info=True,
                **kwargs,
            )
        except (OSError, ValueError) as exc:
            raise ModelError(
                f"cannot load a reward model from '{cfg.name_or_path}': {str(exc).splitlines()[0]}"
            ) from exc
        _check_backbone_loaded(cfg.name_or_path, info)
    if tokenizer is not None:
        if len(tokenizer) > model.get_input_embeddings().num_embeddings:
            model.resize_token_embeddings(len(tokenizer))
        model.config.pad_token_id = tokenizer.pad_token_id
        model.config.eos_token_id = tokenizer.eos_token_id
    return model


def _check_backbone_loaded(path: str, info: dict) -> None:
    missing = [k for k in info.get("missing_keys", []) if not k.startswith(f"{SCORE_HEAD}.")]
    if missing:
        raise ModelError(
            f"'{path}' does not hold the reward model's backbone: {len(missing)} weights missing "
            f"(e.g. {missing[0]}); is it a checkpoint of model.name_or_path's architecture?"
        )
    if any(k.startswith(f"{SCORE_HEAD}.") for k in info.get("missing_keys", [])):
        log.info("'%s' has no reward head (a base or SFT checkpoint): a new score head is trained", path)
    else:
        log.info("'%s' is a reward model: its backbone and score head are loaded", path)


def _load_adapter(path: Path, tokenizer: PreTrainedTokenizerBase | None, precision: str) -> PeftModel:
    adapter = json.loads((path / models.ADAPTER_CONFIG).read_text())
    if adapter.get("task_type") != "SEQ_CLS":
        raise ModelError(
            f"'{path}' is a {adapter.get('task_type')} adapter, not a reward model's; start the reward "
            "model from merged weights (peft.merge=true writes final/merged/)"
        )
    base = load_reward_model(adapter["base_model_name_or_path"], tokenizer, precision=precision)
    return PeftModel.from_pretrained(base, str(path))


def apply_lora(model: PreTrainedModel, cfg: PeftConfig, *, new_tokens: bool) -> PeftModel:
    """LoRA for a reward model: adapters as configured, the score head trained in full.

    The head starts random (or from a PMP run) and is the whole output of the model, so it is
    trained and saved beside the adapter (``modules_to_save``), not given a low-rank update.
    """
    return models.apply_lora(model, cfg, new_tokens=new_tokens, task_type="SEQ_CLS", trained_in_full=(SCORE_HEAD,))


def lora_target_config(cfg: PeftConfig) -> PeftConfig:
    """The peft config ``models.check_lora_targets`` can check against the causal-LM module names
    (``score`` exists only on the sequence-classification model)."""
    return dataclasses.replace(cfg, modules_to_save=[m for m in cfg.modules_to_save if m != SCORE_HEAD])


def merge_reward_adapter(adapter_dir: Path, target: Path, tokenizer: PreTrainedTokenizerBase) -> None:
    """Fold a LoRA RM (adapter + trained head) into full weights in ``target``, on CPU."""
    merged = load_reward_model(adapter_dir, tokenizer).merge_and_unload()
    merged.save_pretrained(target)
    tokenizer.save_pretrained(target)


# --- reading the reward --------------------------------------------------------------------------


def rewards_at_last_token(model: torch.nn.Module, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
    """``[B, T]`` ids and 0/1 mask -> ``[B]`` rewards read at each row's last real token.

    Works for left, right or both-sided padding and whatever the pad id is (it may equal EOS).
    Position ids count real tokens only, so a left-padded row sees the same positions as the
    unpadded one.
    """
    return row_rewards(model, PaddedRows(input_ids, attention_mask))


def row_rewards(model: torch.nn.Module, rows: Rows) -> Tensor:
    """``[B]`` rewards at each row's last real token, for padded or packed rows (align/modeling/rows.py).

    The forward goes through ``model`` itself (DDP, DeepSpeed and PEFT wrappers see it); the score
    head is applied to the final hidden state at each row's last token only.
    """
    outputs = model(**rows.model_inputs(), output_hidden_states=True, use_cache=False)
    hidden = rows.at_last_token(outputs.hidden_states[-1])  # [B, H], after the final norm
    head = getattr(models.unwrap_model(model), SCORE_HEAD)
    return head(hidden.to(head.weight.dtype if hasattr(head, "weight") else hidden.dtype)).squeeze(-1).float()


def trim_to_end_of_turn(input_ids: Sequence[int], end_of_turn: int) -> list[int]:
    """Cut a rendered conversation after its last end-of-turn token (ChatML writes ``<|im_end|>\\n``,
    see chat.end_of_turn_id), so the reward is read there, as it is for a PPO response that stops there."""
    ids = list(input_ids)
    for i in range(len(ids) - 1, -1, -1):
        if ids[i] == end_of_turn:
            return ids[: i + 1]
    return ids


def pad_batch(sequences: Sequence[Sequence[int]], pad_token_id: int, side: str = "right") -> tuple[Tensor, Tensor]:
    """Token lists -> ``[B, T]`` ids and 0/1 attention mask, padded on ``side``."""
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, seq in enumerate(sequences):
        span = slice(0, len(seq)) if side == "right" else slice(width - len(seq), width)
        ids[row, span] = torch.tensor(list(seq), dtype=torch.long)
        mask[row, span] = 1
    return ids, mask


@torch.no_grad()
def score_token_ids(
    model: torch.nn.Module, sequences: Sequence[Sequence[int]], pad_token_id: int, batch_size: int = 16
) -> Tensor:
    """``[N]`` rewards of N token sequences, in batches, in eval mode."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    scores = []
    for start in range(0, len(sequences), batch_size):
        ids, mask = pad_batch(sequences[start : start + batch_size], pad_token_id)
        scores.append(rewards_at_last_token(model, ids.to(device), mask.to(device)).cpu())
    model.train(was_training)
    return torch.cat(scores) if scores else torch.zeros(0)


# --- evaluation ------------------------------------------------------------------------------------


def pair_metrics(chosen: Tensor, rejected: Tensor) -> dict[str, float]:
    """Held-out pair metrics from ``[N]`` chosen and rejected rewards (ties count as wrong)."""
    diff = chosen - rejected
    both = torch.cat([chosen, rejected])
    return {
        "accuracy": (diff > 0).float().mean().item(),
        "margin": diff.mean().item(),
        "reward_mean": both.mean().item(),
        "reward_std": both.std(unbiased=False).item(),
        "loss": -torch.nn.functional.logsigmoid(diff).mean().item(),
    }


def score_pairs(model: torch.nn.Module, rows, pad_token_id: int, batch_size: int = 16) -> tuple[Tensor, Tensor]:
    """Chosen and rejected rewards ``[N]`` of preference rows with ``chosen_ids`` and ``rejected_ids``."""
    chosen = score_token_ids(model, rows["chosen_ids"], pad_token_id, batch_size)
    rejected = score_token_ids(model, rows["rejected_ids"], pad_token_id, batch_size)
    return chosen, rejected


def example_rows(rows, chosen: Tensor, rejected: Tensor, n: int = 8) -> list[list]:
    """The first ``n`` pairs as table rows: prompt, chosen, rejected, their rewards, correct."""
    out = []
    for i in range(min(n, len(chosen))):
        row = rows[i]
        out.append(
            [
                row["prompt"][-1]["content"],
                row["chosen"][-1]["content"],
                row["rejected"][-1]["content"],
                round(chosen[i].item(), 4),
                round(rejected[i].item(), 4),
                bool(chosen[i] > rejected[i]),
            ]
        )
    return out


EXAMPLE_COLUMNS = ["prompt", "chosen", "rejected", "reward_chosen", "reward_rejected", "correct"]


# --- for users and PPO -------------------------------------------------------------------------


def score_conversations(
    model_dir: str | Path, conversations: list[list[dict[str, str]]], batch_size: int = 16
) -> list[float]:
    """Score whole conversations with a trained reward model (an rm run's ``final/``).

    Each conversation is a list of ``{"role", "content"}`` messages ending with the assistant turn
    to judge. It is rendered with the model's own chat template, cut after the last end-of-turn
    token and read there, exactly as in training. Works for full and LoRA reward models::

        score_conversations("runs/rm/final", [[{"role": "user", "content": "Sort: 3 1"},
                                               {"role": "assistant", "content": "1 3"}]])
    """
    tokenizer = models.load_tokenizer(ModelConfig(name_or_path=str(model_dir)))
    model = load_reward_model(model_dir, tokenizer)
    end_of_turn = end_of_turn_id(tokenizer)
    sequences = [_turn_ids(tokenizer, conv, end_of_turn) for conv in conversations]
    return score_token_ids(model, sequences, tokenizer.pad_token_id, batch_size).tolist()


def _turn_ids(tokenizer: PreTrainedTokenizerBase, conversation: list[dict[str, str]], end_of_turn: int) -> list[int]:
    """A conversation rendered with the template, cut after its last end of turn: what the reward reads."""
    return trim_to_end_of_turn(encode(tokenizer, render(tokenizer, conversation, False)), end_of_turn)


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def own_tokenizer(path: str, policy_tokenizer: PreTrainedTokenizerBase) -> PreTrainedTokenizerBase | None:
    """The reward model's tokenizer when it would read the policy's token ids differently (another
    vocabulary, chat template or end-of-turn token, as with a public reward model of another
    family); None when the ids can be scored as they are. A folder without tokenizer files is
    taken to share the policy's."""
    folder = Path(path)
    if folder.is_dir() and not any((folder / name).is_file() for name in TOKENIZER_FILES):
        return None
    tokenizer = models.load_tokenizer(ModelConfig(name_or_path=path))
    same = (
        tokenizer.get_vocab() == policy_tokenizer.get_vocab()
        and tokenizer.chat_template == policy_tokenizer.chat_template
        and tokenizer.eos_token == policy_tokenizer.eos_token
    )
    if same:
        return None
    vocab = models.load_model_config(ModelConfig(name_or_path=path)).vocab_size
    if len(tokenizer) > vocab:
        # load_tokenizer gave a template-less tokenizer ChatML tokens this model has never seen.
        raise ModelError(
            f"reward model '{path}' has no chat template (its tokenizer has {len(tokenizer)} tokens with ChatML, "
            f"the model {vocab}); PPO renders each prompt and response with the reward model's template"
        )
    return tokenizer


@torch.no_grad()
def text_rewards(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    prompts: list[list[dict[str, str]]],
    responses: list[str],
    ended: list[bool],
    device: torch.device,
) -> Tensor:
    """``[N]`` rewards of prompts (messages) and response texts through the reward model's own
    tokenizer and chat template. A response that ended is a whole assistant turn, read at its
    end-of-turn token as in training; one cut off at the length limit is the prompt's generation
    header and the text, without an end of turn, as the policy's own tokens were."""
    end_of_turn = end_of_turn_id(tokenizer)
    sequences = [
        _turn_ids(tokenizer, [*prompt, {"role": "assistant", "content": response}], end_of_turn)
        if finished
        else encode(tokenizer, render(tokenizer, prompt, True) + response)
        for prompt, response, finished in zip(prompts, responses, ended, strict=True)
    ]
    context = getattr(getattr(models.unwrap_model(model), "config", None), "max_position_embeddings", None)
    if context is not None and any(len(ids) > context for ids in sequences):
        # Rendered again, an episode can outgrow a reward model of shorter context than the policy;
        # the reward is read at the last token, so the end (the response) is kept.
        warnings.warn(
            f"the reward model reads {context} tokens at most: longer episodes lose the start of their prompt",
            stacklevel=2,
        )
        sequences = [ids[-context:] for ids in sequences]
    ids, mask = pad_batch(sequences, tokenizer.pad_token_id)
    return rewards_at_last_token(model, ids.to(device), mask.to(device))


def episode_rewards(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase | None,
    rows: Rows,
    prompts: list[list[dict[str, str]]],
    responses: list[str],
    ended: list[bool],
) -> Tensor:
    """``[N]`` rewards of sampled episodes: on the policy's token ids as they are, or as text through
    the reward model's own tokenizer when `own_tokenizer` gave one."""
    if tokenizer is None:
        return row_rewards(model, rows)
    return text_rewards(model, tokenizer, prompts, responses, ended, rows.input_ids.device)


# --- training --------------------------------------------------------------------------------------


def pairwise_loss(chosen: Tensor, rejected: Tensor, margin: Tensor | None = None) -> Tensor:
    """Bradley-Terry loss ``mean(-log sigmoid(r_c - r_r - margin))`` over ``[N]`` pairs."""
    diff = chosen - rejected
    if margin is not None:
        diff = diff - margin
    return -torch.nn.functional.logsigmoid(diff).mean()


def reward_rows(dataset, end_of_turn: int):
    """Preference rows from ``load_recipe_data`` -> with ``chosen_ids`` / ``rejected_ids`` cut at the
    end-of-turn token (the columns TRL's RewardTrainer and ``score_pairs`` read)."""

    def cut(row):
        return {
            "chosen_ids": trim_to_end_of_turn(row["chosen_input_ids"], end_of_turn),
            "rejected_ids": trim_to_end_of_turn(row["rejected_input_ids"], end_of_turn),
        }

    return dataset.map(cut, remove_columns=["chosen_input_ids", "rejected_input_ids"])
