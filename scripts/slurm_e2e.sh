#!/usr/bin/env bash
# End to end on a real (one-node, local) Slurm cluster, run by hand; a few minutes on 2 cores.
#
#   bash scripts/slurm_e2e.sh
#
# 1. Starts the cluster (scripts/slurm_local.sh start; installs slurm-wlm + munge if missing).
# 2. Renders prompts/brightness.txt unsharded with `sdfix generate` (the reference).
# 3. `sbatch --array=0-3 scripts/slurm_array.sh prompts/brightness.txt OUT` on the demo model on
#    the CPU; waits; checks every task COMPLETED, the union of the shards equals the reference
#    byte for byte, and `sdfix manifest check` finds each image once with one manifest line each.
# 4. Again into a new folder, `scancel`s one array task once it has written an image, checks that
#    it stopped short, `scontrol requeue`s it, and checks that it resumed with --skip-existing
#    (skipped > 0) and that the set is again identical to the reference.
# Leaves the cluster running (stop it with scripts/slurm_local.sh stop) and the files in $work.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD

prompts=prompts/brightness.txt
# Enough work per task that one can be cancelled mid-run: 12 prompts x 4 images, 3 prompts a task.
num_images=4
steps=20
seed=0
batch=4
tasks=4
# Seconds to wait for an array before giving up.
readonly ARRAY_TIMEOUT_S=900

say() { echo "[e2e $(date +%H:%M:%S)] $*"; }
fail() { echo "[e2e] FAIL: $*" >&2; exit 1; }

if [[ -z ${SDFIX_BIN:-} ]]; then
  cargo build --release --quiet
  SDFIX_BIN=$root/target/release/sdfix
fi
export SDFIX_BIN
work=$(mktemp -d /tmp/sdfix-e2e.XXXXXX)
say "work folder $work, sdfix $SDFIX_BIN"

bash scripts/slurm_local.sh start
export SLURM_CONF=${SDFIX_SLURM_DIR:-/tmp/sdfix-slurm}/slurm.conf
sinfo

# What slurm_array.sh reads; sbatch hands the environment to the tasks.
export SDFIX_MODEL=demo SDFIX_DEVICE=cpu SDFIX_SEED=$seed SDFIX_BATCH=$batch
export SDFIX_ARGS="--num-images $num_images --steps $steps"
entries=$(grep -cv '^\s*\(#\|$\)' "$prompts")
expected=$((entries * num_images))
# Task 1 takes the entries whose index mod $tasks is 1.
task1=$(((entries + tasks - 2) / tasks * num_images))

say "reference: unsharded generate of $prompts ($expected images)"
# shellcheck disable=SC2086
"$SDFIX_BIN" generate --model demo --prompts "$prompts" --out-dir "$work/whole" --seed "$seed" \
  --batch-size "$batch" --device cpu --quiet $SDFIX_ARGS

# The node has no GPUs and 2 cores: the script's --gres=gpu:1 and --cpus-per-task=4 are
# overridden on the command line (sbatch lets command-line options win over #SBATCH lines).
submit() {
  sbatch --parsable --gres=none --cpus-per-task=1 --array=0-$((tasks - 1)) \
    --output="$work/$1-%A_%a.log" --chdir="$root" scripts/slurm_array.sh "$prompts" "$work/$1"
}

wait_array() {
  local job=$1 waited=0
  while [[ -n $(squeue --noheader --jobs "$job" 2>/dev/null) ]]; do
    ((waited < ARRAY_TIMEOUT_S)) || fail "array $job still queued after ${ARRAY_TIMEOUT_S} s"
    sleep 2
    waited=$((waited + 2))
  done
}

# Every task of the array ended COMPLETED (scontrol keeps ended jobs for MinJobAge, 300 s).
check_completed() {
  local job=$1 states
  states=$(scontrol --oneliner show job "$job" | grep -o 'JobState=[A-Z_]*' | sort | uniq -c | tr -s ' ')
  say "array $job task states:$states"
  [[ $states == " $tasks JobState=COMPLETED" ]] || fail "not every task completed"
}

# The PNGs of $1 are exactly the reference's, byte for byte, each recorded once in its manifest.
same_as_reference() {
  local out=$1 name count
  diff <(cd "$work/whole" && ls -- *.png) <(cd "$out" && ls -- *.png) >/dev/null ||
    fail "$out does not hold the reference's file names"
  for name in $(cd "$work/whole" && ls -- *.png); do
    cmp -s "$work/whole/$name" "$out/$name" || fail "$out/$name differs from the reference"
  done
  count=$(ls "$out"/*.png | wc -l)
  say "$out: $count PNGs, identical to the unsharded run byte for byte"
  "$SDFIX_BIN" manifest check "$out" --prompts "$prompts" --seed "$seed" --num-images "$num_images" |
    tee "$work/check.txt"
  grep -q "$expected present, 0 missing, 0 doubled, 0 orphan(s); manifest: 0 image(s) with several lines, 0 with none, 0 line(s) for no file, 0 unreadable" \
    "$work/check.txt" || fail "manifest check of $out is not clean"
  [[ $(wc -l <"$out/manifest.jsonl") -eq $expected ]] || fail "manifest of $out has not $expected lines"
}

say "sbatch --array=0-$((tasks - 1)) scripts/slurm_array.sh $prompts $work/array"
job=$(submit array)
wait_array "$job"
check_completed "$job"
same_as_reference "$work/array"

say "again into $work/requeue; task 1 is cancelled after its first image"
job=$(submit requeue)
log=$work/requeue-${job}_1.log
waited=0
until [[ -f $log ]] && grep -q '^wrote .*\.png' "$log"; do
  ((waited < ARRAY_TIMEOUT_S * 10)) || fail "task ${job}_1 wrote nothing"
  sleep 0.1
  waited=$((waited + 1))
done
scancel "${job}_1"
sleep 2
done_before=$(grep -c '^wrote .*\.png' "$log" || true)
say "scancel ${job}_1 after $done_before of its $task1 images; state: $(scontrol --oneliner show job "${job}_1" | grep -o 'JobState=[A-Z_]*')"
((done_before < task1)) || fail "task 1 finished before it was cancelled; raise num_images"
left=$(find "$work/requeue" -name '.*.tmp' | wc -l)
say "temporaries left by the cancelled task: $left"
scontrol requeue "${job}_1"
# Slurm holds a requeued job back for a while (Reason=BeginTime, EligibleTime about 2 minutes on).
say "scontrol requeue ${job}_1: $(scontrol --oneliner show job "${job}_1" | grep -o 'JobState=[A-Z_]*\|Reason=[A-Za-z]*\|EligibleTime=[^ ]*' | tr '\n' ' ')"
wait_array "$job"
check_completed "$job"
grep -E 'skipped [1-9][0-9]* existing' "$log" | tail -1 | sed 's/^/[task 1 after requeue] /' ||
  fail "the requeued task did not skip what it had written"
same_as_reference "$work/requeue"
say "PASS"
