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

import contextlib
import json
import os
import runpy
import select
import signal
import subprocess
import sys
import time
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
    if "output" in request:  # stdout and stderr appended to one file
        os.dup2(os.open(request["output"], os.O_WRONLY | os.O_CREAT | os.O_APPEND), 1)
        os.dup2(1, 2)
    else:
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
    """A server started with `env` from `cwd`. `run` stands for subprocess.run([python, -m, align,
    *args]) and `start` for subprocess.Popen of it; one run at a time."""

    def __init__(self, env: dict[str, str], cwd: Path, logs: Path) -> None:
        self.env, self.cwd, self.logs, self.runs = env, cwd, logs, 0
        self.server = subprocess.Popen(
            [sys.executable, "-m", "tests.preloaded"], cwd=cwd, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE
        )
        self._pending = b""

    def forkable(self, env: dict[str, str]) -> bool:
        if os.environ.get("ALIGN_TESTS_REAL_PROCESSES"):
            return False
        changed = {k for k in env.keys() | self.env.keys() if env.get(k) != self.env.get(k)}
        return all(k.startswith(RUNTIME_ENV) for k in changed)

    def answer(self, timeout: float | None) -> dict:
        """The server's next answer line; TimeoutError if none is whole within `timeout` seconds.
        Read a byte at a time from the pipe, so that select() never waits on a line already buffered."""
        deadline = None if timeout is None else time.monotonic() + timeout
        fd = self.server.stdout.fileno()
        while not self._pending.endswith(b"\n"):
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            if not select.select([fd], [], [], left)[0]:
                raise TimeoutError
            byte = os.read(fd, 1)
            if not byte:
                raise RuntimeError(f"the preloaded Python exited ({self.server.poll()})")
            self._pending += byte
        line, self._pending = self._pending, b""
        return json.loads(line)

    def _fork(self, args: list[str], env: dict[str, str], **output: str) -> int:
        request = {"args": args, "env": env, "cwd": str(self.cwd), **output}
        self.server.stdin.write((json.dumps(request) + "\n").encode())
        self.server.stdin.flush()
        return self.answer(30)["pid"]

    def run(self, args: list[str], env: dict[str, str], timeout: float) -> subprocess.CompletedProcess:
        command = [sys.executable, "-m", "align", *args]
        if not self.forkable(env):
            return subprocess.run(command, cwd=self.cwd, env=env, capture_output=True, text=True, timeout=timeout)
        self.runs += 1
        out, err = self.logs / f"{self.runs}.stdout", self.logs / f"{self.runs}.stderr"
        child = ForkedRun(self, self._fork(args, env, stdout=str(out), stderr=str(err)))
        try:
            code = child.wait(timeout)
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait(30)
            raise subprocess.TimeoutExpired(command, timeout, out.read_text(), err.read_text()) from None
        return subprocess.CompletedProcess(command, code, out.read_text(), err.read_text())

    def start(self, args: list[str], env: dict[str, str], output: Path) -> ForkedRun | subprocess.Popen:
        """The run started, its stdout and stderr appended to `output`; wait for it before the next."""
        if not self.forkable(env):
            with output.open("a") as file:
                command = [sys.executable, "-m", "align", *args]
                return subprocess.Popen(command, cwd=self.cwd, env=env, stdout=file, stderr=subprocess.STDOUT)
        return ForkedRun(self, self._fork(args, env, output=str(output)))

    def close(self) -> None:
        self.server.stdin.close()
        self.server.wait(timeout=30)


class ForkedRun:
    """What tests use of subprocess.Popen, for a child of the preloaded Python (not this process's
    child: the server reaps it and reports its exit code)."""

    def __init__(self, server: PreloadedPython, pid: int) -> None:
        self.server, self.pid, self.returncode = server, pid, None

    def poll(self) -> int | None:
        if self.returncode is None:
            with contextlib.suppress(TimeoutError):
                self.returncode = self.server.answer(0)["returncode"]
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        if self.returncode is None:
            try:
                self.returncode = self.server.answer(timeout)["returncode"]
            except TimeoutError:
                raise subprocess.TimeoutExpired(f"python -m align (pid {self.pid})", timeout) from None
        return self.returncode

    def send_signal(self, signum: int) -> None:
        if self.returncode is None:
            os.kill(self.pid, signum)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)


if __name__ == "__main__":
    serve()
