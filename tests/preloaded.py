"""`python -m align` without paying for its imports on every run.

Most of a short run on the tiny model is a fresh interpreter importing torch, transformers and
PEFT (about 5 s of CPU each time, measured on the 2-core CI machine). A preloaded Python imports
them once and, for each run, forks a child that does what `python -m align ARGS` does: it takes the
run's environment, working directory and argv, runs align/__main__.py as `__main__` (runpy, as
`-m` does) and exits the way that interpreter would (its exit code, or 1 and a traceback).

align itself is imported afresh in every child: only third-party libraries are preloaded, and
the parent never computes anything, so no OpenMP or torch thread pool exists to break in a fork.
A run whose environment differs from the parent's in a variable that those libraries may read
while importing (anything outside RUNTIME_ENV) runs as a real process instead, and so does every
run when ALIGN_TESTS_REAL_PROCESSES=1. tests/e2e/test_errors.py::test_preloaded_and_real_runs_agree
checks a run both ways.

Server: `python -m tests.preloaded`, one JSON request per stdin line, answered on stdout with the
child's pid, then its exit code.
"""

from __future__ import annotations

import json
import os
import runpy
import select
import subprocess
import sys
from pathlib import Path

RUNTIME_ENV = ("WANDB_", "ALIGN_", "POISON", "RANK", "WORLD_SIZE", "LOCAL_RANK", "PYTEST_")
"""Variables read only when a run starts (not while the preloaded libraries import)."""


def _preload() -> None:
    # Not TRL, which imports wandb: wandb makes its temporary media folder when imported and removes
    # it when the process that logged media exits, so the first child would take it from the rest.
    import accelerate  # noqa: F401
    import datasets  # noqa: F401
    import hydra  # noqa: F401
    import peft  # noqa: F401
    import safetensors.torch  # noqa: F401
    import torch  # noqa: F401
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, Trainer  # noqa: F401
    from transformers.models.llama import modeling_llama  # noqa: F401  (SmolLM2)
    from transformers.models.qwen2 import modeling_qwen2  # noqa: F401  (the tiny model, Qwen)

    assert "wandb" not in sys.modules, "preloading imported wandb (see above)"


def _child(request: dict) -> None:
    """In the forked child: become `python -m align ARGS`. Never returns into the server loop."""
    os.dup2(os.open(os.devnull, os.O_RDONLY), 0)
    os.dup2(os.open(request["stdout"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC), 1)
    os.dup2(os.open(request["stderr"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC), 2)
    os.environ.clear()
    os.environ.update(request["env"])
    os.chdir(request["cwd"])
    sys.argv = ["-m", *request["args"]]
    runpy.run_module("align", run_name="__main__", alter_sys=True)
    sys.exit(0)  # SystemExit (and any other exception) leaves through the interpreter's own exit


def serve() -> None:
    # Answers go to the original stdout alone: what the libraries print goes to stderr.
    answers = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    _preload()
    for line in sys.stdin:
        request = json.loads(line)
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            answers.close()
            _child(request)
        print(json.dumps({"pid": pid}), file=answers, flush=True)
        _, status = os.waitpid(pid, 0)
        print(json.dumps({"returncode": os.waitstatus_to_exitcode(status)}), file=answers, flush=True)


class PreloadedPython:
    """A server started with `env` from `cwd`; `run` is subprocess.run([python, -m, align, *args])."""

    def __init__(self, env: dict[str, str], cwd: Path, logs: Path) -> None:
        self.env, self.cwd, self.logs, self.runs = env, cwd, logs, 0
        self.server = subprocess.Popen(
            [sys.executable, "-m", "tests.preloaded"],
            cwd=cwd,
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )

    def forkable(self, env: dict[str, str]) -> bool:
        changed = {k for k in env.keys() | self.env.keys() if env.get(k) != self.env.get(k)}
        return all(k.startswith(RUNTIME_ENV) for k in changed)

    def _answer(self, timeout: float | None) -> dict:
        ready, _, _ = select.select([self.server.stdout], [], [], timeout)
        if not ready:
            raise TimeoutError
        line = self.server.stdout.readline()
        if not line:
            raise RuntimeError(f"the preloaded Python exited ({self.server.poll()})")
        return json.loads(line)

    def run(self, args: list[str], env: dict[str, str], timeout: float) -> subprocess.CompletedProcess:
        command = [sys.executable, "-m", "align", *args]
        if not self.forkable(env) or os.environ.get("ALIGN_TESTS_REAL_PROCESSES"):
            return subprocess.run(command, cwd=self.cwd, env=env, capture_output=True, text=True, timeout=timeout)
        self.runs += 1
        out, err = self.logs / f"{self.runs}.stdout", self.logs / f"{self.runs}.stderr"
        request = {"args": args, "env": env, "cwd": str(self.cwd), "stdout": str(out), "stderr": str(err)}
        self.server.stdin.write(json.dumps(request) + "\n")
        self.server.stdin.flush()
        pid = self._answer(30)["pid"]
        try:
            code = self._answer(timeout)["returncode"]
        except TimeoutError:
            os.kill(pid, 9)
            self._answer(30)
            raise subprocess.TimeoutExpired(command, timeout, out.read_text(), err.read_text()) from None
        return subprocess.CompletedProcess(command, code, out.read_text(), err.read_text())

    def close(self) -> None:
        self.server.stdin.close()
        self.server.wait(timeout=30)


if __name__ == "__main__":
    serve()
