#!/usr/bin/env bash
# Bounded fuzzing of fastpath::wire (parse, verify_checksums, rewrites) and of the AF_PACKET
# load balancer's frame path (fastpath::datapath::afpacket::fuzz_frame).
#
#   crates/fastpath/fuzz/run.sh [RUNS]          # default 200000 inputs
#
# With a nightly toolchain and cargo-fuzz installed, runs the libFuzzer targets `parse` then
# `frame` (ASan, overflow checks on), each for RUNS inputs or FUZZ_MAX_TIME seconds, whichever comes first,
# starting from the committed seeds in fuzz/seeds. Otherwise (or with FUZZ_MODE=stable) it
# runs the stable drivers `fuzz_fallback` and `fuzz_fallback_frames` in tests/wire_props.rs,
# which feed RUNS mutated seeds each to the same bodies (fuzz_one, fuzz_frame).
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
    cd "$crate_dir" # cargo fuzz finds ./fuzz
    for target in parse frame; do
        mkdir -p "$fuzz_dir/corpus/$target"
        # The first corpus directory collects new inputs; the seeds stay read-only (the IP
        # packet seeds serve `frame` too: it also wraps each input in an Ethernet header).
        cargo +nightly fuzz run "$target" "$fuzz_dir/corpus/$target" "$fuzz_dir/seeds" -- \
            -runs="$runs" -max_total_time="$max_time" -print_final_stats=1
    done
    exit 0
fi

if [[ $mode == libfuzzer ]]; then
    echo "run.sh: FUZZ_MODE=libfuzzer but nightly + cargo-fuzz are not available" >&2
    exit 1
fi

echo "run.sh: stable fallback (tests/wire_props.rs fuzz_fallback, fuzz_fallback_frames), $runs runs each" >&2
FASTPATH_FUZZ_RUNS="$runs" exec cargo test --release --manifest-path "$crate_dir/Cargo.toml" \
    --test wire_props fuzz_fallback -- --nocapture
