"""Rebuild the embedded tiny model's files: a byte-level BPE tokenizer and a Qwen2 config.

The outputs are committed under ``align/assets/tiny/`` so the project runs with no network; this
script documents how they were made (``python -m align.assets.build_tiny``). The weights are not
stored: ``model=tiny`` builds them from ``config.json`` with the run's seed.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from align.modeling.chat import CHATML_TEMPLATE

TINY_DIR = Path(__file__).parent / "tiny"
VOCAB_SIZE = 2048
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]

# Qwen2 architecture at a few million parameters: small enough for minutes-long CPU runs,
# large enough that SFT, RM and PPO each show a measurable effect.
TINY_CONFIG = {
    "architectures": ["Qwen2ForCausalLM"],
    "model_type": "qwen2",
    "vocab_size": VOCAB_SIZE,
    "hidden_size": 256,
    "intermediate_size": 704,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 1024,
    "rope_theta": 10000.0,
    "rms_norm_eps": 1e-6,
    "tie_word_embeddings": True,
    "hidden_act": "silu",
    "initializer_range": 0.02,
    "attention_dropout": 0.0,
    "use_cache": True,
    "bos_token_id": None,
    "eos_token_id": 2,
    "pad_token_id": 0,
    "torch_dtype": "float32",
}

_WORDS = (
    "the a an and or but if then when because so to of in on at for with from by about as is are was "
    "were be been have has had do does did can could will would should may might must shall not no yes "
    "I you he she it we they me him her us them my your his its our their this that these those here "
    "there what which who whom whose why how where all any each few more most other some such only own "
    "same than too very just also now again once please thank thanks hello sorry sure okay answer "
    "question number numbers list sort sorted order reverse add sum total count first second last next "
    "word words letter letters sentence short long small large big little good bad new old right wrong "
    "true false help helpful assistant user system model reply response write read say tell explain give "
    "make use find know think want need like time day year people way thing man woman child world life "
    "hand part place case week company group problem fact story idea water food book music "
    "color red blue green yellow black white cat dog bird fish tree house car road city country"
).split()


def corpus_lines(n: int = 600, seed: int = 0) -> list[str]:
    """A few hundred lines of plain English, digits and chat turns to train the BPE merges on."""
    rng = random.Random(seed)
    lines = []
    for i in range(n):
        kind = i % 4
        if kind == 0:
            lines.append(" ".join(rng.choice(_WORDS) for _ in range(rng.randint(5, 16))).capitalize() + ".")
        elif kind == 1:
            nums = [str(rng.randint(0, 99)) for _ in range(rng.randint(3, 8))]
            lines.append("Sort: " + " ".join(nums) + "\n" + " ".join(sorted(nums, key=int)))
        elif kind == 2:
            a, b = rng.randint(0, 999), rng.randint(0, 999)
            lines.append(f"What is {a} + {b}? The answer is {a + b}.")
        else:
            q = " ".join(rng.choice(_WORDS) for _ in range(rng.randint(3, 9)))
            lines.append(f"<|im_start|>user\n{q}?<|im_end|>\n<|im_start|>assistant\n{q}.<|im_end|>")
    return lines


def build_tokenizer(lines: list[str]) -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(lines, trainer=trainer)
    return tok


def main() -> None:
    TINY_DIR.mkdir(parents=True, exist_ok=True)
    tok = build_tokenizer(corpus_lines())
    tok.save(str(TINY_DIR / "tokenizer.json"))
    tokenizer_config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "model_max_length": TINY_CONFIG["max_position_embeddings"],
        "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>",
        "bos_token": None,
        "unk_token": None,
        "additional_special_tokens": ["<|im_start|>", "<|im_end|>"],
        "padding_side": "right",
        "clean_up_tokenization_spaces": False,
        "chat_template": CHATML_TEMPLATE,
    }
    (TINY_DIR / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2) + "\n")
    config = dict(TINY_CONFIG, vocab_size=tok.get_vocab_size())
    config["eos_token_id"] = tok.token_to_id("<|im_end|>")
    config["pad_token_id"] = tok.token_to_id("<|endoftext|>")
    (TINY_DIR / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    print(f"wrote {TINY_DIR} (vocab {tok.get_vocab_size()})")


if __name__ == "__main__":
    main()
