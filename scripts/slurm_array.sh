#!/usr/bin/env bash
# Render a prompt file on many GPUs with a Slurm job array: each task finds its shard itself
# (`--shard auto`: task I of the array's N takes the prompt entries whose index mod N is I, from
# SLURM_ARRAY_TASK_ID, _MIN, _STEP and _COUNT), so the array covers the file exactly once, whatever
# its size or first id. A task that is preempted, cancelled and requeued resumes where it
# stopped (`--skip-existing`). All tasks write one --out-dir; `sdfix manifest check OUT_DIR
# --prompts PROMPTS` then says what, if anything, to requeue.
#
#   sbatch --array=0-7 scripts/slurm_array.sh prompts/brightness.txt outputs/run1
#
# Settings from the environment (sbatch passes it on): SDFIX_MODEL, SDFIX_DEVICE (cuda),
# SDFIX_SEED (0), SDFIX_BATCH (4), SDFIX_BIN (sdfix on PATH), SDFIX_ARGS (more generate flags,
# split on spaces). scripts/slurm_e2e.sh runs this on a local CPU cluster.
#
#SBATCH --job-name=sdfix
#SBATCH --gres=gpu:1
#SBATCH --cpus-per-task=4
#SBATCH --time=04:00:00
#SBATCH --requeue
#SBATCH --output=%x-%A_%a.log
set -euo pipefail
prompts=${1:?usage: sbatch --array=0-N scripts/slurm_array.sh PROMPTS OUT_DIR}
out_dir=${2:?usage: sbatch --array=0-N scripts/slurm_array.sh PROMPTS OUT_DIR}
model=${SDFIX_MODEL:-ByteDance/sd2.1-base-zsnr-laionaes5}
# All tasks share one Hugging Face cache; download the model once before submitting, or set
# HF_HUB_OFFLINE=1 here once it is cached.
# shellcheck disable=SC2086 # SDFIX_ARGS is a list of flags
exec "${SDFIX_BIN:-sdfix}" generate --model "$model" --prompts "$prompts" --out-dir "$out_dir" \
  --seed "${SDFIX_SEED:-0}" --batch-size "${SDFIX_BATCH:-4}" --device "${SDFIX_DEVICE:-cuda}" \
  --skip-existing --shard auto ${SDFIX_ARGS:-}
