from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from align.config import REPO_ROOT
from align.modeling.chat import (
    CHATML_TEMPLATE,
    end_of_turn_id,
    ensure_chat_template,
    stop_token_ids,
    tokenize_conversation,
)

TINY = REPO_ROOT / "align" / "assets" / "tiny"


def _pieces(tokenizer, ids, mask, want):
    return "".join(tokenizer.decode([i]) for i, m in zip(ids, mask, strict=True) if m == want)


def test_assistant_only_mask_on_multi_turn_with_system():
    tok = AutoTokenizer.from_pretrained(TINY)
    messages = [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": "Sort: 5 3 9"},
        {"role": "assistant", "content": "3 5 9"},
        {"role": "user", "content": "Now reverse."},
        {"role": "assistant", "content": "9 5 3"},
    ]
    out = tokenize_conversation(tok, messages)
    ids, mask = out["input_ids"], out["assistant_masks"]
    assert len(ids) == len(mask)
    # Learned: each assistant's content, its <|im_end|> and the newline after it; nothing else.
    assert _pieces(tok, ids, mask, 1) == "3 5 9<|im_end|>\n9 5 3<|im_end|>\n"
    assert _pieces(tok, ids, mask, 0) == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\nSort: 5 3 9<|im_end|>\n<|im_start|>assistant\n"
        "<|im_start|>user\nNow reverse.<|im_end|>\n<|im_start|>assistant\n"
    )
    # The exact positions: the masked run ends right after each assistant header.
    text = [tok.decode([i]) for i in ids]
    ones = [i for i, m in enumerate(mask) if m]
    first_header_end = text.index("assistant") + 2  # "assistant", "\n"
    assert ones[0] == first_header_end
    assert ids[ones[-1] - 1] == tok.convert_tokens_to_ids("<|im_end|>")
    assert ones[-1] == len(ids) - 1


def _plain_bpe_tokenizer() -> PreTrainedTokenizerFast:
    """A base-model-like tokenizer: no chat template, no ChatML tokens."""
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    bpe.train_from_iterator(["hello there", "sort these numbers 1 2 3"] * 20, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|endoftext|>", pad_token="<|endoftext|>")


def test_tokenizer_without_template_gets_chatml_and_tokens():
    tok = _plain_bpe_tokenizer()
    before = len(tok)
    assert tok.chat_template is None
    assert ensure_chat_template(tok) == 2
    assert len(tok) == before + 2
    assert tok.chat_template == CHATML_TEMPLATE
    assert tok.eos_token == "<|im_end|>"
    rendered = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert rendered == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    ids = tok("<|im_start|>user", add_special_tokens=False)["input_ids"]
    assert ids[0] == tok.convert_tokens_to_ids("<|im_start|>")
    # A tokenizer that already has a template is left alone.
    assert ensure_chat_template(tok) == 0


LLAMA3_LIKE = (
    "{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n{{ m['content'] }}<|eot_id|>"
    "{% endfor %}{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)


def _tokenizer(template: str | None = None, eos: str = "<|im_end|>", extra: tuple[str, ...] = ()):
    tok = AutoTokenizer.from_pretrained(TINY)
    tok.add_tokens(list(extra), special_tokens=True)
    tok.eos_token = eos
    if template is not None:
        tok.chat_template = template
    return tok


def test_the_end_of_turn_is_the_special_token_the_template_writes_after_an_answer():
    chatml = _tokenizer()
    assert end_of_turn_id(chatml) == chatml.convert_tokens_to_ids("<|im_end|>") == chatml.eos_token_id
    assert stop_token_ids(chatml) == [chatml.eos_token_id]
    # A base tokenizer's EOS ends documents, the template's token ends turns: sampling stops at both.
    base = _tokenizer(eos="<|endoftext|>")
    assert stop_token_ids(base) == [
        base.convert_tokens_to_ids("<|endoftext|>"),
        base.convert_tokens_to_ids("<|im_end|>"),
    ]
    llama = _tokenizer(LLAMA3_LIKE, "<|endoftext|>", ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"))
    assert end_of_turn_id(llama) == llama.convert_tokens_to_ids("<|eot_id|>")


def test_without_a_special_token_after_the_answer_the_eos_ends_the_turn():
    plain = _tokenizer("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}")
    assert end_of_turn_id(plain) == plain.eos_token_id
    strict = _tokenizer("{% if messages[0]['role'] != 'system' %}{{ raise_exception('system first') }}{% endif %}")
    assert end_of_turn_id(strict) == strict.eos_token_id
