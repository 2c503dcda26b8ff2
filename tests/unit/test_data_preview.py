"""``python -m align.data preview``: the report and rendered examples with masked spans visible."""

from __future__ import annotations

import json

import yaml

from align.data.__main__ import main


def test_preview_sft_shows_report_and_masked_spans(tmp_path, capsys):
    assert main(["preview", "data=demo_sft", "n=2", f"cache_dir={tmp_path}"]) == 0
    out = capsys.readouterr().out
    assert "train source 'demo/sft.jsonl' (messages, data_recipes/demo_sft.yaml): read 600, kept 600" in out
    assert "=== train example 1 ===" in out
    # The prompt and the assistant header are masked; the answer and its end token are learned.
    assert "[[<|im_start|>user\n" in out
    assert "<|im_start|>assistant\n]]" in out
    assert "<|im_end|>\n]]" not in out.split("=== train example 0 ===")[1].split("]]", 1)[0]


def test_preview_preference_and_prompt_kinds(tmp_path, capsys):
    assert main(["preview", "data=demo_prefs", "n=1", f"cache_dir={tmp_path}"]) == 0
    out = capsys.readouterr().out
    assert "--- chosen:" in out and "--- rejected:" in out
    assert main(["preview", "data=demo_prompts", "kind=prompt", "n=1", f"cache_dir={tmp_path}"]) == 0
    assert "<|im_start|>assistant\n]]<generation>" in capsys.readouterr().out


def test_preview_counts_drops_and_reports_errors(tmp_path, capsys):
    (tmp_path / "rows.jsonl").write_text(json.dumps({"prompt": "ok"}) + "\n{bad\n")
    spec = {"kind": "prompt", "sources": [{"path": "rows.jsonl", "format": "prompt"}]}
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(spec))
    recipe = f"data={tmp_path / 'r.yaml'}"
    assert main(["preview", recipe, "on_error=skip", f"cache_dir={tmp_path}"]) == 0
    assert "read 2, kept 1, dropped 1 (bad_json 1)" in capsys.readouterr().out
    assert main(["preview", recipe, f"cache_dir={tmp_path}"]) == 3
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "source 'rows.jsonl' line 2: bad JSON" in err


def test_preview_usage(capsys):
    assert main([]) == 2
    assert main(["preview", "dta=demo_sft"]) == 2
    assert "usage: python -m align.data preview data=<recipe>" in capsys.readouterr().err
