#!/usr/bin/env bash
# Submit SFT -> RM -> PPO as three SLURM jobs chained with --dependency=afterok, and print
# their ids, one a line: "sft <id>", "rm <id>", "ppo <id>". Run it on a login node; it
# submits and returns. Logs: logs/align-<stage>-<job id>.out in the repository root.
#
# Usage:
#   RUN_ROOT=runs/qwen7b-v1 jobs/pipeline.sh [HYDRA_OVERRIDE...]
#   RUN_ROOT=runs/qwen7b-v1 NODES=2 RM_INIT_FROM_SFT=0 jobs/pipeline.sh model=qwen2.5-7b deepspeed=zero3
#
# Environment:
#   RUN_ROOT          required; stages write $RUN_ROOT/sft, $RUN_ROOT/rm and $RUN_ROOT/ppo.
#   RM_INIT_FROM_SFT  1 (default): the RM starts from $RUN_ROOT/sft/final and waits for SFT;
#                     0: the RM starts from the base model and runs beside SFT.
#   SFT_DATA, RM_DATA, PPO_DATA  optional; the data recipe of each stage (data=...);
#                     unset: the stage config's default.
#   NODES             optional; nodes per job (default: what the sbatch scripts ask for, 1).
#   WANDB_RUN_GROUP   optional; the W&B group of all three (default: basename of RUN_ROOT).
#   WANDB_* and the SBATCH_* input variables of sbatch (SBATCH_PARTITION, SBATCH_ACCOUNT,
#   SBATCH_TIMELIMIT, ...) reach every job as usual.
# Arguments are Hydra overrides given to all three stages, so use keys every stage has
# (model=, deepspeed=, ...). Each job is requeued on preemption and resumes (jobs/README.md);
# if a stage fails, the jobs waiting on it are cancelled (--kill-on-invalid-dep=yes).
set -euo pipefail

[[ -n "${RUN_ROOT:-}" ]] || { echo "pipeline.sh: error: RUN_ROOT is not set (see the usage header)" >&2; exit 1; }
case "${RM_INIT_FROM_SFT:=1}" in
    0 | 1) ;;
    *) echo "pipeline.sh: error: RM_INIT_FROM_SFT must be 0 or 1, not '$RM_INIT_FROM_SFT'" >&2; exit 1 ;;
esac

# Absolute, because the jobs run from the repository root; the sbatch scripts find
# jobs/common.sh and write logs/ relative to the directory they were submitted from.
RUN_ROOT="$(realpath -m "$RUN_ROOT")"
cd "$(dirname "${BASH_SOURCE[0]}")/.."
mkdir -p logs
export WANDB_RUN_GROUP="${WANDB_RUN_GROUP:-$(basename "$RUN_ROOT")}"

sbatch_args=(--parsable --kill-on-invalid-dep=yes)
[[ -n "${NODES:-}" ]] && sbatch_args+=(--nodes="$NODES")

# submit STAGE DATA [SBATCH_OPTION...] -- [OVERRIDE...]: prints the job id.
submit() {
    local stage="$1" data="$2"
    shift 2
    local -a options=()
    while [[ "$1" != "--" ]]; do options+=("$1"); shift; done
    shift
    local -a overrides=("$@")
    [[ -n "$data" ]] && overrides=("data=$data" "${overrides[@]}")
    # --parsable prints "id" or "id;cluster".
    OUTPUT_DIR="$RUN_ROOT/$stage" WANDB_JOB_TYPE="$stage" \
        sbatch "${sbatch_args[@]}" "${options[@]}" "jobs/$stage.sbatch" "${overrides[@]}" | cut -d';' -f1
}

sft_id="$(submit sft "${SFT_DATA:-}" -- "$@")"

if [[ "$RM_INIT_FROM_SFT" == 1 ]]; then
    rm_id="$(submit rm "${RM_DATA:-}" --dependency="afterok:$sft_id" -- \
        "rm.init_from=$RUN_ROOT/sft/final" "$@")"
else
    rm_id="$(submit rm "${RM_DATA:-}" -- "$@")"
fi

ppo_id="$(submit ppo "${PPO_DATA:-}" --dependency="afterok:$sft_id:$rm_id" -- \
    "ppo.policy=$RUN_ROOT/sft/final" "ppo.reward_model=$RUN_ROOT/rm/final" "$@")"

echo "sft $sft_id"
echo "rm $rm_id"
echo "ppo $ppo_id"
