#!/usr/bin/env bash
# The README's test command: every check CI runs, from a fresh clone.
# Needs Rust (cargo) and Python >= 3.10 with pip; run as root for the privileged tests.
set -euo pipefail
cd "$(dirname "$0")/.."

step() { printf '\n== %s\n' "$*"; }

step "python: install pykp (editable, with the Rust extension) and test dependencies"
python3 -m pip install --quiet -e '.[test]'

step "rust: format"
cargo fmt --all -- --check

step "rust: clippy, warnings denied"
cargo clippy --workspace --all-targets -- -D warnings
cargo clippy --workspace --features python --lib -- -D warnings

step "rust: tests"
cargo test --workspace

step "rust: bounded fuzz run of the packet parser"
bash crates/fastpath/fuzz/run.sh "${PYKP_FUZZ_RUNS:-200000}"

step "python: stubs match the extension"
python3 -m mypy.stubtest pykp._fastpath
python3 -m mypy pykp

step "python: tests"
python3 -m pytest -q
