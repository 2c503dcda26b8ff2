"""``python -m align.data preview data=<recipe> [kind=..] [model=<dir>] [n=3] [max_length=N]``

Other options: on_error=skip, cache_dir=<dir>, seed=N.

Prints the per-source report and a few rows rendered with the chat template, tokens the loss
ignores wrapped in [[...]], so a user sees exactly what the model is trained on.
"""

from __future__ import annotations

import logging
import sys
from typing import Any

from align.data.load import load_recipe_data
from align.data.recipe import REPO_ROOT, load_recipe
from align.errors import AlignError
from align.modeling.chat import ensure_chat_template

TINY_TOKENIZER = REPO_ROOT / "align" / "assets" / "tiny"
USAGE = __doc__.strip().splitlines()[0].strip("`")
OPTIONS = ("data", "kind", "model", "n", "max_length", "on_error", "cache_dir", "seed")


def _spans(tokenizer: Any, ids: list[int], learned: list[int]) -> str:
    """Decode runs of equal mask value; wrap the runs the loss ignores in [[...]]."""
    out, start = [], 0
    for i in range(1, len(ids) + 1):
        if i == len(ids) or learned[i] != learned[start]:
            text = tokenizer.decode(ids[start:i])
            out.append(text if learned[start] else f"[[{text}]]")
            start = i
    return "".join(out)


def _shared_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def render_example(tokenizer: Any, kind: str, row: dict[str, Any]) -> str:
    if kind == "sft":
        return _spans(tokenizer, row["input_ids"], row["assistant_masks"])
    if kind == "prompt":
        # The whole prompt is context; the policy's generation starts where it ends.
        ids = row["prompt_input_ids"]
        return _spans(tokenizer, ids, [0] * len(ids)) + "<generation>"
    chosen, rejected = row["chosen_input_ids"], row["rejected_input_ids"]
    shared = _shared_prefix(chosen, rejected)  # the prompt, shown once, marked as context
    return "\n".join(
        [
            _spans(tokenizer, chosen[:shared], [0] * shared),
            "--- chosen:",
            tokenizer.decode(chosen[shared:]),
            "--- rejected:",
            tokenizer.decode(rejected[shared:]),
        ]
    )


def preview(options: dict[str, str]) -> None:
    from transformers import AutoTokenizer

    recipe = options["data"]
    kind = options.get("kind") or load_recipe(recipe).kind
    tokenizer = AutoTokenizer.from_pretrained(options.get("model", str(TINY_TOKENIZER)))
    ensure_chat_template(tokenizer)
    data = load_recipe_data(
        recipe,
        kind,
        tokenizer,
        seed=int(options.get("seed", 0)),
        max_length=int(options["max_length"]) if "max_length" in options else None,
        on_error=options.get("on_error"),
        cache_dir=options.get("cache_dir"),
    )
    print(f"recipe {recipe} (kind {kind})")
    for report in data.reports:
        print("  " + report.line())
    print("  " + data.summary())
    print("[[...]] marks tokens the loss ignores (context)")
    for i in range(min(int(options.get("n", 3)), len(data.train))):
        print(f"\n=== train example {i} ===")
        print(render_example(tokenizer, kind, data.train[i]))


def main(argv: list[str]) -> int:
    if not argv or argv[0] != "preview":
        print(f"usage: {USAGE}", file=sys.stderr)
        return 2
    options = dict(arg.split("=", 1) for arg in argv[1:] if "=" in arg)
    bad = [a for a in argv[1:] if "=" not in a or a.split("=", 1)[0] not in OPTIONS]
    if bad or "data" not in options:
        print(f"usage: {USAGE}\n(options: {', '.join(OPTIONS)})", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    try:
        preview(options)
    except AlignError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
