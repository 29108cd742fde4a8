#!/usr/bin/env bash
# The README's test command: every check CI runs, from a fresh clone. Run as root: it
# installs what the tests need (scripts/install.sh --test) and the privileged tests build
# network namespaces. pykp is tested as installed (a real install into .venv), not from
# the source tree.
set -euo pipefail
cd "$(dirname "$0")/.."

step() { printf '\n== %s\n' "$*"; }

step "install: system packages, pykp and its test dependencies into .venv"
bash scripts/install.sh --test
py=$(pwd)/.venv/bin/python

step "rust: format"
cargo fmt --all -- --check

step "rust: clippy, warnings denied"
cargo clippy --workspace --all-targets -- -D warnings
cargo clippy --workspace --features python --lib -- -D warnings

step "rust: tests"
cargo test --workspace

step "rust: bounded fuzz run of the packet parser"
bash crates/fastpath/fuzz/run.sh "${PYKP_FUZZ_RUNS:-200000}"

step "python: stubs match the installed extension; types"
# From outside the tree: `python -m` puts the current directory first on sys.path, and the
# tree's pykp/ has no built extension.
(cd / && "$py" -m mypy.stubtest pykp._fastpath)
"$py" -m mypy pykp

step "python: lint"
"$py" -m ruff check pykp tests benches
"$py" -m ruff format --check pykp tests benches

step "python: tests (against the installed pykp)"
# The venv's pytest script, not `python -m pytest`, for the same reason: tests import the
# installed package.
.venv/bin/pytest -q
