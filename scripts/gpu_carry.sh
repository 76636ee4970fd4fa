#!/usr/bin/env bash
# Gets a GPU run of scripts/gpu_check.sh under the device tool's limit: at most 64 MiB travel per
# call, tracked files included, and the tracked tree alone is ~81 MiB (the SDXL fixtures). Files
# the check does not read are taken out of git's index for the run (they stay on disk, and
# .git/info/exclude hides them), and the two CUDA binaries travel stripped and xz-compressed with
# the one Python wheel the GPU image lacks (diffusers; torch and transformers are there).
#
#   bash scripts/build_cuda.sh && bash scripts/build_cuda.sh --cudnn   # here, first (see there)
#   bash scripts/gpu_carry.sh prepare   # .gpu-carry/, the index trimmed; prints the run's arguments
#   ... the device tool's run, with carry [".gpu-carry"] and the printed command ...
#   bash scripts/gpu_carry.sh restore   # the trimmed files tracked again (do it before any commit)
#   bash scripts/gpu_carry.sh size      # bytes of the tree that would travel once trimmed (changes
#                                       # nothing; tests/gpu_carry.rs keeps it under the limit)
#
# `prepare` refuses to start with staged changes (so that `restore` puts back exactly HEAD's
# index) and says what will travel. Without tests/fixtures/tiny-sdxl on the GPU machine,
# gpu_check.sh skips the tiny SDXL parity cases (the SDXL benchmark uses random weights).
set -euo pipefail
cd "$(dirname "$0")/.."
carry=.gpu-carry
exclude=.git/info/exclude
begin='# sdfix gpu_carry.sh: trimmed for a GPU run (scripts/gpu_carry.sh restore removes this block)'
end='# end of sdfix gpu_carry.sh'
# What gpu_check.sh does not read: fixtures of other tests (of the references, it reads
# pipeline.* and sdxl.* only), the demo models (built into the binaries), pictures in the docs.
trim=(tests/fixtures/tiny-sdxl tests/fixtures/tiny-sdxl-inpaint tests/fixtures/single-file
  tests/fixtures/tiny-sd-inpaint tests/fixtures/tiny-unet-sd1 tests/fixtures/fuzz tests/fixtures/tiny-taesd
  tests/fixtures/schedule_refs.json models/demo models/demo-flawed)
mapfile -t -O ${#trim[@]} trim < <(git ls-tree -r --name-only HEAD -- tests/fixtures/refs docs |
  grep -E '^tests/fixtures/refs/|\.png$' | grep -v -E '^tests/fixtures/refs/(pipeline|sdxl)\.')
limit_mib=64

# Bytes of what would travel: tracked files, untracked files git does not ignore, and the carry.
travelling_bytes() {
  { git ls-files -z; git ls-files -z --others --exclude-standard; } | xargs -0 -r stat -c %s 2>/dev/null |
    awk '{s += $1} END {print s + 0}'
  du -sb "$carry" 2>/dev/null | cut -f1 || echo 0
}

# Bytes of the tracked files outside the trim list, and of untracked files git does not ignore.
trimmed_tree_bytes() {
  { git ls-files -z; git ls-files -z --others --exclude-standard; } |
    awk -v RS='\0' -v ORS='\0' -v list="${trim[*]}" '
      BEGIN { n = split(list, paths, " ") }
      { for (i = 1; i <= n; i++) if ($0 == paths[i] || index($0, paths[i] "/") == 1) next; print }' |
    xargs -0 -r stat -c %s 2>/dev/null | awk '{s += $1} END {print s + 0}'
}

case ${1:-} in
  size)
    echo "tree_bytes $(trimmed_tree_bytes)"
    ;;
  prepare)
    if ! git diff --cached --quiet; then
      echo "error: staged changes; commit or unstage them first (restore resets the index to HEAD's files)" >&2
      exit 2
    fi
    if grep -qF "$begin" "$exclude" 2>/dev/null; then
      echo "error: already prepared; run 'bash scripts/gpu_carry.sh restore' first" >&2
      exit 2
    fi
    for build in target-cuda target-cudnn; do
      [ -x "$build/release/sdfix" ] || {
        echo "error: $build/release/sdfix missing: bash scripts/build_cuda.sh$([ $build = target-cudnn ] && echo ' --cudnn')" >&2
        exit 2
      }
    done
    rm -rf "$carry" && mkdir -p "$carry/wheels"
    for build in cuda cudnn; do
      strip -o "$carry/sdfix-$build" "target-$build/release/sdfix"
      xz -T0 -6 -f "$carry/sdfix-$build"
    done
    py=${PYTHON:-$([ -x .venv-cuda/bin/python ] && echo .venv-cuda/bin/python || echo python3)}
    "$py" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
      --platform manylinux2014_x86_64 -d "$carry/wheels" diffusers==0.42.1 importlib_metadata==8.7.0
    { echo "$begin"; printf '/%s\n' "${trim[@]}"; echo "$end"; } >>"$exclude"
    git rm -r -q --cached --ignore-unmatch -- "${trim[@]}"
    set -- $(travelling_bytes)
    total=$(( $1 + $2 ))
    printf 'travels: %.1f MiB (tree %.1f MiB, carry %.1f MiB), limit %d MiB\n' \
      "$(echo "$total / 1048576" | bc -l)" "$(echo "$1 / 1048576" | bc -l)" "$(echo "$2 / 1048576" | bc -l)" "$limit_mib"
    if [ "$total" -gt $(( limit_mib * 1048576 )) ]; then
      echo "error: over the limit; trim more in scripts/gpu_carry.sh" >&2
      exit 1
    fi
    cat <<EOF
index trimmed (git status shows the trimmed files as deleted: run 'bash scripts/gpu_carry.sh restore' after the run)
run with carry [".gpu-carry"], timeout_s 510 (the script gates its optional parts on time), command:
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site $carry/wheels/*.whl && export PYTHONPATH=/tmp/site || exit; SDFIX="$carry/sdfix-cudnn $carry/sdfix-cuda" bash scripts/gpu_check.sh
EOF
    ;;
  restore)
    git reset -q HEAD -- "${trim[@]}"
    if [ -f "$exclude" ]; then
      awk -v b="$begin" -v e="$end" '$0 == b {skip = 1} !skip {print} $0 == e {skip = 0}' "$exclude" >"$exclude.tmp"
      mv "$exclude.tmp" "$exclude"
    fi
    git status --short -- "${trim[@]}" | head -n 5
    echo "restored: the trimmed files are tracked again"
    ;;
  *)
    echo "usage: bash scripts/gpu_carry.sh prepare|restore|size" >&2
    exit 2
    ;;
esac
