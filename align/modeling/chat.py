"""ChatML rendering and the assistant-only loss mask.

Every stage renders conversations through the tokenizer's own chat template; a tokenizer without
one gets ChatML, the format of the Qwen report (``<|im_start|>role\\n...<|im_end|>\\n``).
"""

from __future__ import annotations

from transformers import PreTrainedTokenizerBase

from align.errors import DataError

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
CHATML_TOKENS = ("<|im_start|>", "<|im_end|>")

Message = dict[str, str]


def ensure_chat_template(tokenizer: PreTrainedTokenizerBase) -> int:
    """Give a template-less tokenizer ChatML and its special tokens; return how many tokens were added.

    The caller resizes the model's embeddings when this returns more than zero.
    """
    if tokenizer.chat_template:
        return 0
    added = tokenizer.add_special_tokens({"additional_special_tokens": list(CHATML_TOKENS)})
    tokenizer.chat_template = CHATML_TEMPLATE
    # Generation must stop at the end of the assistant turn, not at the document end.
    tokenizer.eos_token = "<|im_end|>"
    if tokenizer.pad_token is None:
        # Padding is masked everywhere, so any existing token serves.
        tokenizer.pad_token = tokenizer.eos_token
    return added


def render(tokenizer: PreTrainedTokenizerBase, messages: list[Message], generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)


def encode(tokenizer: PreTrainedTokenizerBase, text: str) -> list[int]:
    # The template already wrote every special token; the tokenizer must not add BOS/EOS again.
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def tokenize_conversation(tokenizer: PreTrainedTokenizerBase, messages: list[Message]) -> dict[str, list[int]]:
    """Token ids of a whole conversation and a mask that is 1 on the tokens the model learns.

    As in the Qwen report and its finetune code: system and user turns and each assistant header
    (``<|im_start|>assistant\\n``) are masked; assistant content with its end-of-turn token and the
    newline after it are learned. Turn boundaries come from rendering growing prefixes of the
    conversation, which works for any template that renders a prefix as a prefix.
    """
    input_ids = encode(tokenizer, render(tokenizer, messages, generation_prompt=False))
    mask = [0] * len(input_ids)
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        start = len(encode(tokenizer, render(tokenizer, messages[:i], generation_prompt=True)))
        prefix = encode(tokenizer, render(tokenizer, messages[: i + 1], generation_prompt=False))
        if input_ids[: len(prefix)] != prefix or start > len(prefix):
            raise DataError(
                "the chat template does not render a conversation prefix as a prefix of the whole; "
                f"assistant-only masking needs that (turn {i})"
            )
        mask[start : len(prefix)] = [1] * (len(prefix) - start)
    return {"input_ids": input_ids, "assistant_masks": mask}


_PROBE = "align probe 7f3a"


def end_of_turn_id(tokenizer: PreTrainedTokenizerBase) -> int:
    """The token that closes an assistant turn in the chat template: ChatML ``<|im_end|>``, Llama 3
    ``<|eot_id|>``, Gemma ``<end_of_turn>``. A policy finetuned on rendered conversations learns to
    emit it, which is not always the tokenizer's EOS (Llama 3 base: ``<|end_of_text|>``). The EOS
    when the template writes no special token right after the assistant's text."""
    conversation = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": _PROBE}]
    try:
        text = render(tokenizer, conversation, generation_prompt=False)
    except Exception:  # a template with rules of its own (a system turn first, ...): nothing to learn here
        return tokenizer.eos_token_id
    if _PROBE not in text:
        return tokenizer.eos_token_id
    after = encode(tokenizer, text.rsplit(_PROBE, 1)[1])
    special = set(tokenizer.all_special_ids) | {i for i, t in tokenizer.added_tokens_decoder.items() if t.special}
    return after[0] if after and after[0] in special else tokenizer.eos_token_id


def stop_token_ids(tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """Where sampling stops: the tokenizer's EOS and the template's end of turn, when they differ."""
    return list(dict.fromkeys([tokenizer.eos_token_id, end_of_turn_id(tokenizer)]))
