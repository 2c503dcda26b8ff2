"""What the throughput benches share: the random Qwen2 sizes, and timing a child process by the
JSON lines it writes per step, with the same outside clock for every side."""

from __future__ import annotations

import json
import os
import subprocess
import time
from itertools import pairwise
from pathlib import Path
from statistics import median

ROOT = Path(__file__).resolve().parent.parent
SIZES = {
    # 123,168 parameters (untied embeddings): the size of TRL's tiny test models.
    "125k": dict(
        hidden_size=32,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=False,
    ),
    # 19.6M parameters.
    "20m": dict(
        hidden_size=512,
        intermediate_size=1536,
        num_hidden_layers=6,
        num_attention_heads=8,
        num_key_value_heads=4,
        tie_word_embeddings=True,
    ),
}
SPLIT = ("time/generate", "time/score", "time/update")


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


def run_stamped(cmd: list[str], lines_file: Path, log_file: Path, env: dict[str, str]) -> tuple[list[dict], float]:
    """Run `cmd`, stamping each JSON line it appends to `lines_file` with wall and CPU time.
    Returns the lines and the child's peak RSS in MiB (its own rusage, from os.wait4)."""
    rows: list[dict] = []
    lines_file.unlink(missing_ok=True)  # a kept --workdir holds the last run's lines
    with log_file.open("w") as log:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
        buffer, offset, usage = "", 0, None
        while True:
            pid, status, rusage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                proc.returncode, usage = os.waitstatus_to_exitcode(status), rusage
            if lines_file.exists():
                with lines_file.open() as f:
                    f.seek(offset)
                    chunk = f.read()
                    offset = f.tell()
                if chunk:
                    now = time.perf_counter()
                    try:
                        cpu = cpu_seconds(proc.pid)
                    except (OSError, IndexError):
                        cpu = float("nan")
                    buffer += chunk
                    *complete, buffer = buffer.split("\n")
                    for line in complete:
                        if line.strip():
                            rows.append({**json.loads(line), "_wall": now, "_cpu": cpu})
            if usage is not None:
                break
            time.sleep(0.002)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd[:4])} ... failed ({proc.returncode}); see {log_file}")
    return rows, usage.ru_maxrss / 1024  # KiB on Linux


def summarize(rows: list[dict], warmup: int, steps: int, batch: int) -> dict[str, float]:
    """Per-step medians over the timed window: a step slowed by another process on the machine
    moves neither side's number (the mean over the window is kept as `eps_mean`)."""
    start, window = rows[warmup - 1], rows[warmup : warmup + steps]
    if len(window) < steps:
        raise SystemExit(f"only {len(rows)} steps logged, {warmup + steps} needed")
    walls = [b["_wall"] - a["_wall"] for a, b in pairwise([start, *window])]
    cpus = [b["_cpu"] - a["_cpu"] for a, b in pairwise([start, *window])]
    step = median(walls)
    out = {
        "eps": batch / step,
        "eps_cpu": batch / median(cpus),
        "eps_mean": batch * steps / sum(walls),
        "step_s": step,
    }
    for key in SPLIT:
        out[key] = median(r[key] for r in window)
    out["other"] = median(w - sum(r[k] for k in SPLIT) for w, r in zip(walls, window, strict=True))
    return out
