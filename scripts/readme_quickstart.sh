#!/usr/bin/env bash
# Runs README.md's "Quick start" section as written, so that CI fails when a newcomer's first
# commands do. Called by scripts/test.sh after `cargo test --release`; alone:
#
#     bash scripts/readme_quickstart.sh
#
# What runs: every fenced code block between "## Quick start" and the next "## " heading, in order,
# each as one bash script under `set -euo pipefail`. An HTML comment (invisible on GitHub) on the
# line right before a block says more about it:
#
#     <!-- quickstart: skip (why) -->               not run: downloads real weights, or is the test
#                                                   suite itself (which runs this script)
#     <!-- quickstart: writes GLOB [GLOB ...] -->   after the block, each glob must match a file
#
# Where: in one fresh temporary folder, shared by the blocks (a later block sees an earlier one's
# files), not in the repository, so the README's `outputs/...` land there and nothing under the
# repository's outputs/ is created or overwritten. The README's commands say
# `cargo run --release -- ARGS`, which from another folder would find no Cargo.toml. Rather than
# edit the commands, a `cargo` shim first on PATH runs what `cargo run --release` would run, the
# binary `target/release/sdfix`, with ARGS; the real `cargo build --release` brings that binary up
# to date first. The shim refuses any other cargo command, so a quick start that needs more than
# that fails here instead of passing untested. HF_HUB_OFFLINE=1: a block that would download fails.
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
readme="$repo/README.md"
cd "$repo"
cargo build --release --quiet
bin="$repo/target/release/sdfix"
[[ -x $bin ]] || { echo "readme_quickstart: no $bin after cargo build --release" >&2; exit 1; }

work="$(mktemp -d "${TMPDIR:-/tmp}/sdfix-quickstart.XXXXXX")"
ok=0
trap 'if [[ $ok == 1 ]]; then rm -rf "$work"; else echo "readme_quickstart: left $work for a look" >&2; fi' EXIT
mkdir -p "$work/bin" "$work/blocks" "$work/run"

cat >"$work/bin/cargo" <<EOF
#!/usr/bin/env bash
# readme_quickstart.sh's shim: \`cargo run --release -- ARGS\` runs the already built sdfix.
if [[ \$# -ge 3 && \$1 == run && \$2 == --release && \$3 == -- ]]; then
    shift 3
    exec "$bin" "\$@"
fi
echo "readme_quickstart: the cargo shim runs only 'cargo run --release -- ARGS', not: cargo \$*" >&2
exit 127
EOF
chmod +x "$work/bin/cargo"

# Split the section into blocks/N.sh, with blocks/N.skip (the reason) and blocks/N.writes (globs).
awk -v out="$work/blocks" '
    function fail(msg) { print "readme_quickstart: README.md line " NR ": " msg > "/dev/stderr"; bad = 1; exit 1 }
    in_block && /^```[ \t]*$/ { in_block = 0; close(file); next }
    in_block { print > file; next }
    /^## / { in_section = ($0 == "## Quick start"); if (in_section) found = 1; next }
    !in_section { next }
    /^```/ {
        lang = substr($0, 4)
        if (lang != "" && lang != "bash" && lang != "sh" && lang != "shell")
            fail("a ```" lang " block in Quick start: only shell blocks can be run")
        n++; in_block = 1; file = sprintf("%s/%02d.sh", out, n)
        printf "" > file
        if (skip != "") { print skip > (file ".skip"); close(file ".skip") }
        if (writes != "") { print writes > (file ".writes"); close(file ".writes") }
        skip = ""; writes = ""; next
    }
    /^<!-- quickstart: skip/ { skip = $0; sub(/^<!-- quickstart: skip[ \t]*/, "", skip); sub(/[ \t]*-->[ \t]*$/, "", skip); if (skip == "") skip = "(no reason given)"; next }
    /^<!-- quickstart: writes / { writes = $0; sub(/^<!-- quickstart: writes[ \t]*/, "", writes); sub(/[ \t]*-->[ \t]*$/, "", writes); next }
    /^<!-- quickstart:/ { fail("unknown quickstart comment: " $0) }
    /[^ \t]/ { skip = ""; writes = "" }
    END {
        if (bad) exit 1
        if (!found) { print "readme_quickstart: README.md has no \"## Quick start\" section" > "/dev/stderr"; exit 1 }
        if (in_block) { print "readme_quickstart: an unclosed code block in Quick start" > "/dev/stderr"; exit 1 }
    }
' "$readme"

ran=0
skipped=0
for block in "$work"/blocks/*.sh; do
    name="block $(basename "$block" .sh)"
    if [[ -f $block.skip ]]; then
        echo "== $name: skipped $(cat "$block.skip")"
        skipped=$((skipped + 1))
        continue
    fi
    echo "== $name:"
    sed 's/^/   $ /' "$block"
    if ! (cd "$work/run" && PATH="$work/bin:$PATH" HF_HUB_OFFLINE=1 bash -euo pipefail "$block"); then
        echo "readme_quickstart: FAIL: $name exited non-zero" >&2
        exit 1
    fi
    if [[ -f $block.writes ]]; then
        read -r -a globs <"$block.writes"
        for glob in "${globs[@]}"; do
            if ! (cd "$work/run" && compgen -G "$glob" >/dev/null); then
                echo "readme_quickstart: FAIL: $name: README says it writes $glob; no such file" >&2
                exit 1
            fi
            echo "   wrote $(cd "$work/run" && compgen -G "$glob" | head -1)"
        done
    fi
    ran=$((ran + 1))
done
if [[ $ran == 0 ]]; then
    echo "readme_quickstart: FAIL: no runnable block in README's Quick start" >&2
    exit 1
fi
ok=1
echo "readme_quickstart: PASS ($ran block(s) run, $skipped skipped)"
