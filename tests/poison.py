"""`python -m tests.poison <overrides>`: `python -m align <overrides>` with NaN put into chosen training steps.

POISON_STEPS="3,5" picks training forward passes (1-based, counted over this process; one per
optimizer step with train.grad_accum=1 and no resume), POISON what goes wrong in them:

- `loss`: the token embeddings come out NaN, so the loss and every gradient are NaN (an overflow
  in the forward pass);
- `grad`: the forward pass is untouched and the loss finite, but the gradient flowing back into
  the embeddings is NaN (an overflow in the backward pass).

Nothing in align is patched: a global forward hook on torch modules does it, counting only
embedding lookups made in training mode with gradients on (never evaluation or generation).
"""

from __future__ import annotations

import os
import sys

import torch

from align.cli import main

STEPS = {int(s) for s in os.environ["POISON_STEPS"].split(",")}
MODE = os.environ.get("POISON", "loss")
assert MODE in ("loss", "grad"), MODE
_forwards = 0


def _poison(module: torch.nn.Module, args, output):
    global _forwards
    if not (isinstance(module, torch.nn.Embedding) and module.training and torch.is_grad_enabled()):
        return None
    _forwards += 1
    if _forwards not in STEPS:
        return None
    if MODE == "loss":
        return output * float("nan")
    output.register_hook(lambda grad: torch.full_like(grad, float("nan")))
    return None


if __name__ == "__main__":
    torch.nn.modules.module.register_module_forward_hook(_poison)
    sys.argv = ["align", *sys.argv[1:]]
    main()
