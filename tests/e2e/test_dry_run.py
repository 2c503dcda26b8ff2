"""`dry_run=true` sizes a 7B job without weights, a GPU or a process group."""

import json
import shutil

from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs

from align.config import REPO_ROOT

QWEN25_7B = {
    "architectures": ["Qwen2ForCausalLM"],
    "model_type": "qwen2",
    "vocab_size": 152064,
    "hidden_size": 3584,
    "intermediate_size": 18944,
    "num_hidden_layers": 28,
    "num_attention_heads": 28,
    "num_key_value_heads": 4,
    "max_position_embeddings": 32768,
    "tie_word_embeddings": False,
    "rms_norm_eps": 1e-6,
}


def test_dry_run_prints_plan_and_zero_estimates(run_align, tmp_path):
    model_dir = tmp_path / "qwen-7b-config-only"
    model_dir.mkdir()
    (model_dir / "config.json").write_text(json.dumps(QWEN25_7B))
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(REPO_ROOT / "align" / "assets" / "tiny" / name, model_dir / name)
    out = tmp_path / "never-written"
    proc = run_align(
        "stage=sft",
        f"model.name_or_path={model_dir}",
        "model.init=pretrained",
        "train.batch_size=2",
        "train.grad_accum=4",
        "dry_run=true",
        f"output_dir={out}",
        env={"WORLD_SIZE": "16", "LOCAL_WORLD_SIZE": "8"},
    )
    text = proc.stdout
    assert "world: 16 processes (2 node(s) x 8)" in text
    assert "global batch: 2 per device x 4 accumulation x 16 = 128 sequences per optimizer step" in text
    assert ": 7615.6M parameters" in text
    _, gpu, _ = estimate_zero3_model_states_mem_needs(
        7615616512, 544997376, 8, 2, cpu_offload=False, cpu_offload_params=False
    )
    zero3 = next(line for line in text.splitlines() if line.strip().startswith("zero3 "))
    assert f"{gpu / 2**30:6.2f} GiB" in zero3
    assert "stage_name: sft" in text  # the resolved config
    assert not (out / "final").exists()
