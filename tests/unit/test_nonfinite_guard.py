"""NonFiniteGuard on hand-made gradients: stop at the first bad step, or skip a bounded number."""

import logging

import pytest
import torch
from transformers import TrainerControl, TrainerState, TrainingArguments

from align.errors import TrainingError
from align.hf.callbacks import NonFiniteGuard

ARGS = TrainingArguments(output_dir="unused", report_to=[])


def _model_with_grad(value: float) -> torch.nn.Linear:
    model = torch.nn.Linear(2, 2)
    for p in model.parameters():
        p.grad = torch.full_like(p, 0.5)
    model.weight.grad[0, 0] = value
    return model


def _step(guard: NonFiniteGuard, model: torch.nn.Module, global_step: int, loss: float = 1.0) -> None:
    guard.record_loss(torch.tensor(loss))
    guard.on_pre_optimizer_step(ARGS, TrainerState(global_step=global_step), TrainerControl(), model=model)


def test_finite_step_passes_untouched():
    model = _model_with_grad(1.0)
    _step(NonFiniteGuard(), model, global_step=4)
    assert torch.equal(model.weight.grad, _model_with_grad(1.0).weight.grad)


@pytest.mark.parametrize(
    ("grad", "loss", "what"),
    [(float("nan"), 1.0, "gradient"), (float("inf"), 1.0, "gradient"), (1.0, float("nan"), "train/loss")],
)
def test_stop_mode_names_what_and_the_step(grad, loss, what):
    with pytest.raises(TrainingError) as err:
        _step(NonFiniteGuard(skip_limit=0), _model_with_grad(grad), global_step=6, loss=loss)
    assert str(err.value) == f"non-finite {what} at step 7; the last good checkpoint is kept in checkpoints/"


def test_a_bad_loss_in_any_micro_batch_counts():
    guard = NonFiniteGuard()
    guard.record_loss(torch.tensor(float("inf")))
    with pytest.raises(TrainingError, match="non-finite train/loss at step 1"):
        _step(guard, _model_with_grad(1.0), global_step=0)  # the step's last micro-batch was fine


def test_skip_mode_drops_the_update_then_stops_past_the_limit(caplog):
    guard = NonFiniteGuard(skip_limit=2)
    with caplog.at_level(logging.WARNING, logger="align"):
        for step in (2, 5):
            model = _model_with_grad(float("nan"))
            _step(guard, model, global_step=step)
            assert all(p.grad is None for p in model.parameters())  # AdamW then leaves the weights alone
        _step(guard, _model_with_grad(1.0), global_step=6)  # good steps do not reset the count
    assert [r.message for r in caplog.records] == [
        "non-finite gradient at step 3: update skipped (1 of train.nan_skip_limit=2)",
        "non-finite gradient at step 6: update skipped (2 of train.nan_skip_limit=2)",
    ]
    with pytest.raises(TrainingError) as err:
        _step(guard, _model_with_grad(float("nan")), global_step=9)
    assert str(err.value) == (
        "non-finite gradient at step 10, 3 steps skipped: more than train.nan_skip_limit=2; "
        "the last good checkpoint is kept in checkpoints/"
    )


def test_a_skipped_step_leaves_adamw_state_and_weights_alone():
    model = _model_with_grad(1.0)
    optimizer = torch.optim.AdamW(model.parameters(), weight_decay=0.1)
    optimizer.step()
    weights = [p.detach().clone() for p in model.parameters()]
    state = [{k: v.clone() for k, v in optimizer.state[p].items()} for p in model.parameters()]
    for p in model.parameters():
        p.grad = torch.full_like(p, float("nan"))
    _step(NonFiniteGuard(skip_limit=1), model, global_step=1)
    optimizer.step()
    assert all(torch.equal(a, b) for a, b in zip(weights, model.parameters(), strict=True))
    for p, saved in zip(model.parameters(), state, strict=True):
        assert saved.keys() == {"step", "exp_avg", "exp_avg_sq"}
        assert all(torch.equal(saved[k], optimizer.state[p][k]) for k in saved)


def test_logs_backstop():
    guard = NonFiniteGuard()
    state = TrainerState(global_step=3)
    with pytest.raises(TrainingError, match=r"non-finite eval/loss \(nan\) at step 3"):
        guard.on_log(ARGS, state, TrainerControl(), logs={"eval_loss": float("nan")})
    with pytest.raises(TrainingError, match=r"non-finite train/grad_norm \(inf\) at step 3"):
        guard.on_log(ARGS, state, TrainerControl(), logs={"loss": 1.0, "grad_norm": float("inf")})
    # Skipping: a skipped step's gradient norm is logged as it was, NaN, and the run goes on.
    NonFiniteGuard(skip_limit=1).on_log(ARGS, state, TrainerControl(), logs={"grad_norm": float("nan")})
