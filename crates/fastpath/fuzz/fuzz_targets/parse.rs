//! parse, verify_checksums and the NAT rewrites on arbitrary bytes. The body lives in the
//! library (`fastpath::wire::fuzz_one`) so the stable driver in `tests/wire_props.rs` runs
//! exactly the same checks.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    fastpath::wire::fuzz_one(data);
});
