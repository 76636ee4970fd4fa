#!/usr/bin/env bash
# The whole test suite, as README's quick start and .ci/run run it: formatting, lints, then every
# test in release mode (the model tests are too slow unoptimised), then README's quick start as
# written (scripts/readme_quickstart.sh). No network but crates.io, no Python, no GPU.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo fmt --all -- --check
cargo clippy --release --all-targets -- -D warnings
cargo test --release
bash scripts/readme_quickstart.sh
