"""The pipeline's report: does alignment work? A table on the terminal and in summary.md, plots.

On held-out prompts it samples from the SFT policy and the tuned policy (PPO's, or DPO's in
`pipeline.stages=[sft,dpo]`) alike and compares the learned reward (the proxy PPO optimised) when
the pipeline trained a reward model, the task's gold score when one is configured, and the tuned
policy's KL to the SFT policy (its reference). Plots come from the stages' log.jsonl.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import torch

from align.config import AlignConfig, ModelConfig
from align.data import load_recipe_data
from align.data.formats import other_column_names
from align.modeling.chat import stop_token_ids
from align.modeling.models import load_causal_lm, load_tokenizer
from align.modeling.rows import PaddedRows
from align.rl.forward import response_logprobs
from align.rl.reward_fns import import_reward_fn
from align.rl.rollout import rollout_episodes, sample

log = logging.getLogger("align.run.summary")


TUNED_STAGES = ("ppo", "dpo")
"""The stages whose policy the held-out evaluation compares with the SFT policy."""


def tuned_stage(outputs: dict[str, Path]) -> str | None:
    """The last policy-tuning stage of the pipeline, if it has one."""
    return next((stage for stage in reversed(outputs) if stage in TUNED_STAGES), None)


def write_summary(config: AlignConfig, out: Path, outputs: dict[str, Path]) -> str:
    rows: list[tuple[str, str]] = []
    sft, rm, ppo, dpo = (_metrics(outputs.get(s)) for s in ("sft", "rm", "ppo", "dpo"))
    if sft:
        rows.append(("SFT eval loss", _fmt(sft.get("eval/loss"))))
    if rm:
        rows.append(("RM held-out accuracy", _fmt(rm.get("eval/accuracy"))))
    if dpo:
        rows.append(("DPO held-out preference accuracy", _fmt(dpo.get("eval/rewards/accuracies"))))
    tuned = tuned_stage(outputs)
    if tuned and config.pipeline.eval_prompts:
        evaluation = held_out_evaluation(config, out, outputs, tuned)
        name = tuned.upper()
        if "rm" in outputs:
            rows.append((f"{name} proxy reward, SFT -> {name} policy (held-out)", _arrow(evaluation, "proxy", tuned)))
        if config.pipeline.gold_fn:
            rows.append((f"Gold score, SFT -> {name} policy (held-out)", _arrow(evaluation, "gold", tuned)))
        rows.append((f"KL({name} policy || reference), held-out", _fmt(evaluation.get("kl"))))
    if ppo:
        rows.append(
            (
                "PPO reward during training, first -> last 10%",
                f"{_fmt(ppo.get('ppo/reward_start'))} -> {_fmt(ppo.get('ppo/reward_end'))}",
            )
        )
    for stage, path in outputs.items():
        wall = path / "wall_time.json"
        if wall.is_file():
            rows.append((f"Wall time, {stage}", f"{json.loads(wall.read_text())['seconds']:.0f} s"))
    table = "| metric | value |\n| --- | --- |\n" + "".join(f"| {k} | {v} |\n" for k, v in rows)
    (out / "summary.md").write_text(f"# align pipeline summary\n\n{table}")
    plot(outputs, out)
    print("\n" + table)
    return table


def held_out_evaluation(config: AlignConfig, out: Path, outputs: dict[str, Path], tuned: str) -> dict[str, float]:
    """`evaluate_policies`, or eval.json when it was computed from the same stage outputs, prompts
    and settings: rerunning a complete pipeline reports again without sampling again."""
    tokenizer = load_tokenizer(ModelConfig(name_or_path=str(outputs[tuned] / "final")))
    prompts = load_recipe_data(config.pipeline.eval_prompts, "prompt", tokenizer, seed=0)
    inputs = _evaluation_inputs(config, outputs, prompts.fingerprint)
    path = out / "eval.json"
    if path.is_file():
        saved = json.loads(path.read_text())
        if saved.pop("inputs_sha256", None) == inputs:
            log.info("held-out evaluation: stages, prompts and settings unchanged; read from %s", path)
            return saved
    evaluation = evaluate_policies(config, outputs, tuned, tokenizer, prompts.train)
    path.write_text(json.dumps({**evaluation, "inputs_sha256": inputs}, indent=2) + "\n")
    return evaluation


def _evaluation_inputs(config: AlignConfig, outputs: dict[str, Path], prompts_fingerprint: str) -> str:
    # A stage that runs again writes a new manifest (its creation time, metrics and config).
    digest = hashlib.sha256(prompts_fingerprint.encode())
    for stage, path in sorted(outputs.items()):
        digest.update(stage.encode() + (path / "manifest.json").read_bytes())
    p = config.pipeline
    settings = [p.gold_fn, p.eval_max_new_tokens, config.ppo.temperature, config.ppo.top_p, config.seed]
    digest.update(json.dumps(settings).encode())
    return digest.hexdigest()


def evaluate_policies(
    config: AlignConfig, outputs: dict[str, Path], tuned: str, tokenizer, prompts
) -> dict[str, float]:
    """Sample once per held-out prompt from the SFT policy and the `tuned` stage's with the same seed
    and settings."""
    from align.modeling.reward_model import episode_rewards, load_reward_model, own_tokenizer

    sft_dir = outputs["sft"] / "final" if "sft" in outputs else None
    tuned_dir = outputs[tuned] / "final"
    prompt_rows = list(prompts)
    ids = [row["prompt_input_ids"] for row in prompt_rows]
    reward_model = load_reward_model(str(outputs["rm"] / "final")).eval() if "rm" in outputs else None
    reward_tokenizer = own_tokenizer(str(outputs["rm"] / "final"), tokenizer) if "rm" in outputs else None
    gold = import_reward_fn(config.pipeline.gold_fn, "pipeline.gold_fn") if config.pipeline.gold_fn else None
    if gold is not None and gold.required_columns:
        gold.check_columns(other_column_names(prompts), f"pipeline.eval_prompts={config.pipeline.eval_prompts}")

    result: dict[str, float] = {"prompts": len(ids)}
    policies = {"sft": sft_dir, tuned: tuned_dir} if sft_dir else {tuned: tuned_dir}
    rollouts = {}
    for name, path in policies.items():
        model = load_causal_lm(ModelConfig(name_or_path=str(path)), tokenizer).eval()
        torch.manual_seed(config.seed)
        rollout = sample(
            model,
            ids,
            pad_id=tokenizer.pad_token_id,
            eos_ids=stop_token_ids(tokenizer),
            max_new_tokens=config.pipeline.eval_max_new_tokens,
            temperature=config.ppo.temperature,
            top_p=config.ppo.top_p,
            device=torch.device("cpu"),
        )
        rollouts[name] = (model, rollout)
        episodes = rollout_episodes(tokenizer, rollout, prompt_rows)
        if reward_model is not None:  # read as PPO read it (stages/ppo.py)
            rows = PaddedRows(rollout.input_ids, rollout.attention_mask)
            e = episodes
            with torch.no_grad():
                scores = episode_rewards(reward_model, reward_tokenizer, rows, e.prompts, e.responses, e.ended)
            result[f"proxy_{name}"] = scores.mean().item()
        if gold is not None:
            result[f"gold_{name}"] = gold.mean(episodes)
    if "sft" in rollouts:
        (tuned_model, rollout), (sft_model, _) = rollouts[tuned], rollouts["sft"]
        with torch.no_grad():
            rows = PaddedRows(rollout.input_ids, rollout.attention_mask, rollout.prompt_len)
            logp = response_logprobs(tuned_model, rows, config.ppo.temperature)[0]
            ref = response_logprobs(sft_model, rows, config.ppo.temperature)[0]
        # Per-sequence k1 KL on the tuned policy's own samples, as during PPO training.
        result["kl"] = ((logp - ref) * rollout.response_mask).sum(-1).mean().item()
    return result


def plot(outputs: dict[str, Path], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ppo_log = _log(outputs.get("ppo"))
    if ppo_log:
        steps = [r["step"] for r in ppo_log]
        fig, ax = plt.subplots(1, 2, figsize=(10, 3.5))
        ax[0].plot(steps, [r["ppo/reward_raw"] for r in ppo_log])
        ax[0].set(title="PPO reward (proxy)", xlabel="step")
        ax[1].plot(steps, [r["ppo/kl"] for r in ppo_log], color="tab:red")
        ax[1].set(title="KL to reference", xlabel="step")
        fig.tight_layout()
        fig.savefig(out / "ppo_reward_kl.png", dpi=100)
        plt.close(fig)
        if "ppo/gold" in ppo_log[-1]:
            # Two scales: the reward model's is arbitrary, the gold score's is the task's.
            fig, ax = plt.subplots(figsize=(6, 3.5))
            ax.plot(steps, [r["ppo/reward_raw"] for r in ppo_log], color="tab:blue")
            ax.set_ylabel("proxy (reward model)", color="tab:blue")
            gold = ax.twinx()
            gold.plot(steps, [r["ppo/gold"] for r in ppo_log], color="tab:orange")
            gold.set_ylabel("gold score", color="tab:orange")
            ax.set(title="Proxy up while gold falls = reward hacking", xlabel="step")
            fig.tight_layout()
            fig.savefig(out / "ppo_gold_vs_proxy.png", dpi=100)
            plt.close(fig)
    rm_log = [r for r in _log(outputs.get("rm")) if "eval/accuracy" in r]
    if rm_log:
        fig, ax = plt.subplots(figsize=(5, 3.5))
        ax.plot([r["step"] for r in rm_log], [r["eval/accuracy"] for r in rm_log], marker="o")
        ax.set(title="Reward model held-out accuracy", xlabel="step", ylim=(0, 1))
        fig.tight_layout()
        fig.savefig(out / "rm_accuracy.png", dpi=100)
        plt.close(fig)


def _metrics(path: Path | None) -> dict:
    if path is None or not (path / "metrics.json").is_file():
        return {}
    return json.loads((path / "metrics.json").read_text())


def _log(path: Path | None) -> list[dict]:
    if path is None or not (path / "log.jsonl").is_file():
        return []
    return [json.loads(line) for line in (path / "log.jsonl").read_text().splitlines()]


def _fmt(value) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def _arrow(evaluation: dict, key: str, tuned: str) -> str:
    return f"{_fmt(evaluation.get(f'{key}_sft'))} -> {_fmt(evaluation.get(f'{key}_{tuned}'))}"
