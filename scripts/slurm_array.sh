#!/usr/bin/env bash
# Render a prompt file on many GPUs with a Slurm job array: task I of N takes the prompt entries
# whose index mod N is I (`--shard I/N`), so the array covers the file exactly once. A task that is
# preempted and requeued resumes where it stopped (`--skip-existing`).
#
#   sbatch --array=0-7 scripts/slurm_array.sh prompts/brightness.txt outputs/run1
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
exec sdfix generate --model "$model" --prompts "$prompts" --out-dir "$out_dir" \
  --seed "${SDFIX_SEED:-0}" --batch-size "${SDFIX_BATCH:-4}" --device cuda --skip-existing \
  --shard "${SLURM_ARRAY_TASK_ID}/${SLURM_ARRAY_TASK_COUNT}"
