"""`python -m align` with a read-only probe in every Trainer; launched by test_stages_zero.py.

    torchrun --nproc_per_node 2 tests/distributed/align_probe.py stage=sft deepspeed=zero3 ...

It runs align's own entry point (`align.cli.main`) unchanged: the stage builds its model, data and
Trainer as always. The only addition is a callback appended to each Trainer (by wrapping
`transformers.Trainer.__init__`, so every subclass gets it) and a record of the rows each
`training_step` sees. Set ALIGN_PROBE_DIR and each rank writes ALIGN_PROBE_DIR/rank{N}.json with:

- `params`: at train begin, the parameter elements this rank holds (`p.ds_tensor.numel()` for
  ZeRO-3 partitioned parameters, else `p.numel()`) and the full model's (`p.ds_numel`, else
  `p.numel()`), summed over all parameters, and which parameters are ZeRO-3 partitioned;
- `optimizer_state`: after the first optimizer step, the elements of Adam state (exp_avg) this
  rank's torch optimizer holds: ZeRO-2 and ZeRO-3 both partition it;
- `batches`: per optimizer step, the rows this rank trained on, each as its token ids without
  padding, so the test can compare the global batches of runs with different world sizes;
- `init.safetensors` (rank 0): the full initial weights (gathered under ZeRO-3), so the test can
  check that `final/` moved away from them.

In PPO (no Trainer) each rank writes ALIGN_PROBE_DIR/kl_rank{N}.json instead: every call of the
adaptive KL controller's `update` as this rank made it (the KL and episode count it was given, the
coefficient after).

ALIGN_PROBE_PREEMPT_AT=N sends this process SIGUSR1 as step N begins, so align's own preemption
handler (align/run/preemption.py, what SLURM triggers) checkpoints at the end of step N and the run
exits with REQUEUE_EXIT_CODE: a real mid-run stop, for the resume test.
"""

from __future__ import annotations

import json
import os
import signal
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
from transformers import Trainer, TrainerCallback

from align.rl.kl import AdaptiveKLController

PROBE_DIR = os.environ.get("ALIGN_PROBE_DIR")
PREEMPT_AT = int(os.environ.get("ALIGN_PROBE_PREEMPT_AT", "0"))


def _rank() -> int:
    return torch.distributed.get_rank() if torch.distributed.is_initialized() else 0


def _unpadded_rows(inputs: dict[str, Any]) -> list[list[int]]:
    """Each row's token ids without padding (by the attention mask, when the collator gives one)."""
    if "input_ids" not in inputs:
        return []
    ids = inputs["input_ids"]
    # PackedRowsCollator gives no mask: keep the whole row, padding included.
    keep = inputs["attention_mask"].bool() if "attention_mask" in inputs else torch.ones_like(ids, dtype=torch.bool)
    return [row[mask].tolist() for row, mask in zip(ids, keep, strict=True)]


class Probe(TrainerCallback):
    def __init__(self, trainer: Trainer) -> None:
        self.trainer = trainer
        self.record: dict[str, Any] = {"batches": [], "micro_batches": []}

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        params = list(model.parameters())
        held = sum(p.ds_tensor.numel() if hasattr(p, "ds_tensor") else p.numel() for p in params)
        total = sum(p.ds_numel if hasattr(p, "ds_numel") else p.numel() for p in params)
        self.record["params"] = {
            "held": held,
            "total": total,
            "n_tensors": len(params),
            "n_partitioned": sum(hasattr(p, "ds_tensor") for p in params),
            "param_device": str(params[0].ds_tensor.device if hasattr(params[0], "ds_tensor") else params[0].device),
        }
        if PROBE_DIR and state.global_step == 0:  # a resumed run starts from a checkpoint, not the init
            self._save_init(model)

    def _save_init(self, model: torch.nn.Module) -> None:
        from safetensors.torch import save_file

        partitioned = [p for p in model.parameters() if hasattr(p, "ds_tensor")]
        if partitioned:
            import deepspeed

            gather = deepspeed.zero.GatheredParameters(partitioned)  # a collective: every rank enters
        else:
            gather = nullcontext()
        with gather:
            # Tied weights (embeddings and LM head) are one tensor; save it once.
            seen: set[int] = set()
            weights = {}
            for name, p in model.named_parameters():
                if id(p) not in seen:
                    seen.add(id(p))
                    weights[name] = p.detach().clone().contiguous()
        if _rank() == 0:
            Path(PROBE_DIR).mkdir(parents=True, exist_ok=True)
            save_file(weights, str(Path(PROBE_DIR) / "init.safetensors"))

    def on_step_begin(self, args, state, control, **kwargs):
        if PREEMPT_AT and state.global_step + 1 == PREEMPT_AT:
            os.kill(os.getpid(), signal.SIGUSR1)

    def on_step_end(self, args, state, control, **kwargs):
        self.record["batches"].append(self.record.pop("micro_batches"))
        self.record["micro_batches"] = []
        if "optimizer_state" not in self.record:
            self.record["optimizer_state"] = self._optimizer_state()
        self._write()

    def on_train_end(self, args, state, control, **kwargs):
        self._write()

    def _optimizer_state(self) -> dict[str, Any]:
        optimizer = self.trainer.optimizer
        # accelerate's wrapper -> DeepSpeed's ZeRO optimizer -> the torch optimizer that holds state.
        while hasattr(optimizer, "optimizer"):
            optimizer = optimizer.optimizer
        exp_avg = [s["exp_avg"].numel() for s in optimizer.state.values() if "exp_avg" in s]
        return {"optimizer": type(optimizer).__name__, "exp_avg_numel": sum(exp_avg), "n_tensors": len(exp_avg)}

    def _write(self) -> None:
        if not PROBE_DIR:
            return
        Path(PROBE_DIR).mkdir(parents=True, exist_ok=True)
        record = {k: v for k, v in self.record.items() if k != "micro_batches"}
        (Path(PROBE_DIR) / f"rank{_rank()}.json").write_text(json.dumps(record))


_init = Trainer.__init__
_training_step = Trainer.training_step


def _init_with_probe(self: Trainer, *args: Any, **kwargs: Any) -> None:
    _init(self, *args, **kwargs)
    self._align_probe = Probe(self)
    self.add_callback(self._align_probe)


def _training_step_with_record(self: Trainer, model, inputs, *args: Any, **kwargs: Any):
    probe = getattr(self, "_align_probe", None)
    if probe is not None:
        probe.record["micro_batches"].extend(_unpadded_rows(inputs))
    return _training_step(self, model, inputs, *args, **kwargs)


Trainer.__init__ = _init_with_probe
Trainer.training_step = _training_step_with_record

_kl_update = AdaptiveKLController.update
_kl_calls: list[dict[str, float]] = []


def _kl_update_with_record(self: AdaptiveKLController, current_kl: float, n_steps: int) -> None:
    _kl_update(self, current_kl, n_steps)
    _kl_calls.append({"kl": current_kl, "n_steps": n_steps, "coef": self.value})
    if PROBE_DIR:
        Path(PROBE_DIR).mkdir(parents=True, exist_ok=True)
        (Path(PROBE_DIR) / f"kl_rank{_rank()}.json").write_text(json.dumps(_kl_calls))


AdaptiveKLController.update = _kl_update_with_record

if __name__ == "__main__":
    from align.cli import main

    main()
