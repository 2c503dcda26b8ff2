# shellcheck shell=bash
# Helpers sourced by jobs/*.sbatch; not run on its own. See jobs/README.md.
#
# run_align launches one torchrun per node with `srun --ntasks-per-node=1`; torchrun starts
# one worker per GPU and meets the other nodes at a c10d rendezvous on the allocation's first
# node. The same command serves one node and many.
#
# Preemption: the sbatch scripts ask for `--signal=USR1@<s>` *without* `B:`, so SLURM signals
# the processes of the job steps (the torchrun agents and, on the usual proctrack/cgroup, the
# trainers) and not this batch shell. jobs/torchrun_requeue.py is torchrun plus two things:
# it forwards SIGUSR1 to its workers (they live in their own sessions, so a process-group
# signal misses them) instead of dying of it, and it exits ALIGN_EXIT_REQUEUE when the
# workers did, where plain torchrun turns every worker failure into exit code 1.
# The trainers checkpoint and exit ALIGN_EXIT_REQUEUE; run_align then requeues this job,
# and the requeued job runs the same command, whose resume=auto picks up that checkpoint.

# EX_TEMPFAIL from sysexits.h: "checkpoint written, run me again".
export ALIGN_EXIT_REQUEUE=75

ALIGN_JOBS_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"

die() {
    echo "align job: error: $*" >&2
    exit 1
}

# require_env NAME [NAME...]: fail with one line naming the first unset variable.
require_env() {
    local name
    for name in "$@"; do
        [[ -n "${!name:-}" ]] || die "$name is not set (see the usage header of the job script in jobs/)"
    done
}

# Outside an allocation these are unset; a clear error beats srun's.
require_slurm() {
    [[ -n "${SLURM_JOB_ID:-}" ]] || die "SLURM_JOB_ID is not set: submit with sbatch, do not run this script directly"
    require_env SLURM_JOB_NODELIST SLURM_NNODES
}

# W&B reads WANDB_API_KEY, WANDB_PROJECT, WANDB_ENTITY, WANDB_RUN_GROUP, WANDB_MODE and
# WANDB_JOB_TYPE from the environment, which srun passes on; nothing here prints the key.
require_wandb() {
    case "${WANDB_MODE:-online}" in
        offline | disabled) return 0 ;;
    esac
    if [[ -z "${WANDB_API_KEY:-}" ]] && ! grep -qs "api.wandb.ai" "${HOME:-/nonexistent}/.netrc"; then
        die "WANDB_API_KEY is not set (and no 'wandb login' in ~/.netrc); set it, or WANDB_MODE=offline"
    fi
}

# GPUs per node: SLURM_GPUS_ON_NODE (set on the node) or SLURM_GPUS_PER_NODE ("[type:]N").
gpus_per_node() {
    local gpus="${SLURM_GPUS_ON_NODE:-${SLURM_GPUS_PER_NODE:-}}"
    gpus="${gpus##*:}"
    [[ "$gpus" =~ ^[1-9][0-9]*$ ]] ||
        die "cannot tell the GPUs per node from SLURM_GPUS_ON_NODE/SLURM_GPUS_PER_NODE; submit with --gpus-per-node=N"
    echo "$gpus"
}

# run_align OVERRIDE...: srun + torchrun + `python -m align OVERRIDE...`; requeues on 75.
run_align() {
    require_slurm
    local nnodes gpus rdzv_host rdzv_port
    nnodes="$SLURM_NNODES"
    gpus="$(gpus_per_node)"
    rdzv_host="$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1)"
    [[ -n "$rdzv_host" ]] || die "no host in SLURM_JOB_NODELIST=$SLURM_JOB_NODELIST"
    # A port per job, so that two jobs sharing a node do not meet at the same rendezvous.
    rdzv_port="${RDZV_PORT:-$((20000 + SLURM_JOB_ID % 20000))}"

    # ALIGN_TORCHRUN replaces the launcher (the tests put a stand-in there).
    local -a torchrun=(python -u "$ALIGN_JOBS_DIR/torchrun_requeue.py")
    [[ -n "${ALIGN_TORCHRUN:-}" ]] && torchrun=("$ALIGN_TORCHRUN")

    # --kill-on-bad-exit=0: when one node exits 75 a moment before the others, do not kill
    # the others mid-exit (their code would become a signal and the job would not requeue).
    # --ntasks too: srun would otherwise take SLURM_NTASKS from a job submitted with more.
    local -a srun_args=(--nodes="$nnodes" --ntasks="$nnodes" --ntasks-per-node=1 --kill-on-bad-exit=0)
    # srun >= 22.05 no longer inherits --cpus-per-task from sbatch; without it the step
    # would run all workers of a node on one CPU.
    [[ -n "${SLURM_CPUS_PER_TASK:-}" ]] && srun_args+=(--cpus-per-task="$SLURM_CPUS_PER_TASK")

    echo "align job $SLURM_JOB_ID (restart ${SLURM_RESTART_COUNT:-0}): $nnodes node(s) x $gpus GPU(s)," \
        "rendezvous $rdzv_host:$rdzv_port, W&B project=${WANDB_PROJECT:-<default>} group=${WANDB_RUN_GROUP:-<none>}"
    echo "align job: python -m align $*"

    local rc=0
    srun "${srun_args[@]}" \
        "${torchrun[@]}" \
        --nnodes "$nnodes" \
        --nproc_per_node "$gpus" \
        --rdzv_backend c10d \
        --rdzv_endpoint "$rdzv_host:$rdzv_port" \
        --rdzv_id "$SLURM_JOB_ID" \
        -m align "$@" || rc=$?

    if [[ "$rc" -eq "$ALIGN_EXIT_REQUEUE" ]]; then
        # A run that never gets past one time limit would otherwise requeue forever.
        local restarts="${SLURM_RESTART_COUNT:-0}" max="${ALIGN_MAX_REQUEUES:-20}"
        ((restarts < max)) || die "exit $rc but already requeued $restarts times (ALIGN_MAX_REQUEUES=$max)"
        echo "align job: checkpoint written (exit $rc); requeueing job $SLURM_JOB_ID"
        scontrol requeue "$SLURM_JOB_ID" || die "scontrol requeue $SLURM_JOB_ID failed"
        exit 0
    fi
    if [[ "$rc" -ne 0 ]]; then
        echo "align job: failed with exit code $rc" >&2
        exit "$rc"
    fi
}
