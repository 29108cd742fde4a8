//! Arbitrary bytes as Ethernet frames through the AF_PACKET load balancer's per-frame logic
//! (decide, encapsulate, ARP/ND, ICMP too-big). The body lives in the library
//! (`fastpath::datapath::afpacket::fuzz_frame`) so the stable driver in
//! `tests/wire_props.rs` runs exactly the same checks.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    fastpath::datapath::afpacket::fuzz_frame(data);
});
