#!/usr/bin/env bash
# Bounded fuzzing of fastpath::wire (parse, verify_checksums, rewrites).
#
#   crates/fastpath/fuzz/run.sh [RUNS]          # default 200000 inputs
#
# With a nightly toolchain and cargo-fuzz installed, runs the libFuzzer target `parse`
# (ASan, overflow checks on) for RUNS inputs or FUZZ_MAX_TIME seconds, whichever comes first,
# starting from the committed seeds in fuzz/seeds. Otherwise (or with FUZZ_MODE=stable) it
# runs the stable driver `fuzz_fallback` in tests/wire_props.rs, which feeds RUNS mutated
# seed packets to the same body, fastpath::wire::fuzz_one.
#
# FUZZ_MODE=auto|libfuzzer|stable  (default auto; libfuzzer fails if nightly/cargo-fuzz are missing)
# FUZZ_MAX_TIME=seconds            (libFuzzer only; default 600)
# FASTPATH_FUZZ_SEED=n             (stable driver only)
# cargo-fuzz is one `cargo install cargo-fuzz --locked` away (about a minute on 2 cores).
set -euo pipefail

runs="${1:-200000}"
max_time="${FUZZ_MAX_TIME:-600}"
mode="${FUZZ_MODE:-auto}"
fuzz_dir="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
crate_dir="$(dirname "$fuzz_dir")"

have_libfuzzer() {
    rustup toolchain list 2>/dev/null | grep -q '^nightly' &&
        cargo +nightly fuzz --version >/dev/null 2>&1
}

if [[ $mode != stable ]] && have_libfuzzer; then
    echo "run.sh: cargo-fuzz (libFuzzer) on nightly, $runs runs, at most ${max_time}s" >&2
    mkdir -p "$fuzz_dir/corpus/parse"
    cd "$crate_dir" # cargo fuzz finds ./fuzz
    # The first corpus directory collects new inputs; the seeds stay read-only.
    exec cargo +nightly fuzz run parse "$fuzz_dir/corpus/parse" "$fuzz_dir/seeds" -- \
        -runs="$runs" -max_total_time="$max_time" -print_final_stats=1
fi

if [[ $mode == libfuzzer ]]; then
    echo "run.sh: FUZZ_MODE=libfuzzer but nightly + cargo-fuzz are not available" >&2
    exit 1
fi

echo "run.sh: stable fallback (tests/wire_props.rs fuzz_fallback), $runs runs" >&2
FASTPATH_FUZZ_RUNS="$runs" exec cargo test --release --manifest-path "$crate_dir/Cargo.toml" \
    --test wire_props fuzz_fallback -- --nocapture
