//! The AF_PACKET datapath: a user-space L4 load balancer for traffic entering an interface,
//! in the manner of Maglev and Katran. pykp's own connection table carries every packet.
//!
//! - [`forward`]: the per-frame logic without I/O (decide, encapsulate, ARP/ND, ICMP).
//! - [`ring`]: the layout of a TPACKET_V3 receive block, read from bytes (no I/O).
//! - [`sys`]: the only module with system calls and `unsafe` (the AF_PACKET socket, its
//!   mapped ring, fanout, `sendmmsg`, ring statistics, interface index/MAC/MTU).
//! - [`worker`]: worker threads: ring -> [`forward::Forwarder`] -> batched sends, counters.
//!
//! # Forwarding model: direct server return with IP-in-IP
//!
//! The load balancer wraps the client's packet, untouched, in an outer IP header from this
//! node to the chosen backend (protocol 4 for IPv4 inside, 41 for IPv6 inside). The backend
//! has a tunnel device that unwraps it and the VIP on its loopback, so its socket sees the
//! client's own packet and answers from the VIP straight to the client. Why this model
//! rather than full NAT:
//!
//! - Replies, usually the bulk of the bytes, never cross the load balancer: it handles one
//!   direction only, and needs no reverse-path state or rewrite.
//! - The load balancer's only state is its connection table, and that is a cache: Maglev
//!   gives every load-balancer node with the same services and seed the same backend for a
//!   5-tuple, so when a router moves a flow to another node (one died, ECMP rehashed) that
//!   node picks the same backend and the established connection carries on. Full NAT would
//!   need the lost node's translation state.
//! - What it costs: backends need the tunnel device and the VIP on loopback (a CNI or a
//!   DaemonSet sets that up) with `arp_ignore=1` and `arp_announce=2`, or they answer ARP
//!   for the VIP themselves and clients on their segment bypass the load balancer (the
//!   privileged test caught exactly that); the backend must listen on the service port (no port
//!   translation, as with Katran); and the outer header takes 20 (IPv4) or 40 (IPv6) bytes
//!   of the MTU, which [`forward`] handles with ICMP "fragmentation needed" / "packet too
//!   big" to the client.
//!
//! [`Forwarding::L2Dsr`] is the other direct-server-return model (IPVS "direct routing"):
//! when the backends share the load balancer's segment, the frame goes to the backend's
//! MAC with nothing else changed: no overhead and no tunnel device on the backends (which
//! still hold the VIP on loopback, with the same ARP settings). It is also what a kernel
//! without tunnel support can do (this project's CI kernel has no `ipip`; its privileged
//! IP-in-IP tests decapsulate in user space instead, see `tests/afpacket_privileged.rs`).
//!
//! # Keeping the kernel out of VIP traffic
//!
//! AF_PACKET gets a copy of every frame; the kernel still gets the original. The VIPs are
//! not configured on any interface of the load-balancer node and the node does not forward
//! (`net.ipv4.ip_forward=0`, `net.ipv6.conf.all.forwarding=0` in its namespace): the kernel
//! drops a VIP packet at its routing decision (counted as `InAddrErrors` in
//! `/proc/net/snmp`), sends no ICMP for it, and never answers ARP for a VIP (the load
//! balancer does). The privileged test checks both counters. IPv6 needs one more step:
//! its stack answers a packet it cannot route with ICMPv6 "no route" even when not
//! forwarding, which aborts the client's connection, so the IPv6 VIPs get a blackhole
//! route on the load-balancer node (`ip -6 route add blackhole VIP/128`), where the kernel
//! drops its copy silently (the IPv6 privileged test found this and does so).
//!
//! # Offloads: GSO super-packets and partial checksums
//!
//! The ring can hold frames far larger than the MTU: a veth hands its peer's GSO
//! super-packets over whole (up to 64 kB of TCP segments in one frame, to be cut up by
//! whichever device finally transmits them), and so does a NIC with GRO or LRO on. The
//! sockets use `PACKET_VNET_HDR` ([`WorkerConfig::vnet_hdr`], on by default): the kernel
//! writes each frame's offload state (GSO type and segment size, partial checksum) in a
//! virtio header before it, and takes one before each frame sent. With L2 direct routing
//! a super-packet goes on whole with its header, the kernel segments it (or hands it to
//! the next veth whole), and no byte is copied per segment; the largest segment must fit
//! the MTU, else the client gets "too big". The worker does not copy the packet either:
//! it sends the new headers and the frame where it lies in the ring, two iovecs of one
//! `sendmmsg` message ([`Forwarder::process_vnet_spliced`]); a frame the kernel will not
//! send (larger than it takes) is counted in `tx_errors`. IP-in-IP cannot do this: the
//! header has no GSO type for a tunnel, so there a GSO frame is dropped and counted
//! (`drops_gso_tunnel`), and the interface must not coalesce (`ethtool -K IF gro off lro
//! off`, what Katran requires too, and `pykp lb` warns about; veth pairs hand over their
//! peer's GSO frames whatever GRO says, so a tunnel lab needs its senders' `tso`/`gso` off).
//!
//! A frame from a local or virtual sender (a veth peer, a tap) may carry a partial L4
//! checksum (`TP_STATUS_CSUMNOTREADY` / the header's `NEEDS_CSUM`: only the pseudo-header's,
//! left for the device to finish): L2 direct routing passes it on in the header; IP-in-IP
//! completes it on the forwarded copy, since no device down the tunnel will.
//!
//! # Limits (today)
//!
//! - Too big once encapsulated with DF clear: dropped and counted, not fragmented.
//! - Non-first fragments to a VIP are dropped (no ports to find the flow by); the fanout's
//!   defragmentation flag reassembles fragments that reach the node whole, for hashing
//!   only.
//! - No port translation (DSR): a backend port other than the service port reaches the
//!   backend on the service port.
//! - ICMP to a VIP (echo, errors about a flow) is left to the kernel, which drops it.
//! - "Too big" answers are not rate-limited.
//! - A ring block is handed over when full or after `RingConfig::retire_ms` (1 ms): the
//!   added latency at low packet rates.
//! - VLAN-tagged frames are ignored and counted (`rx_vlan`).
//!
//! Linux only.

pub mod forward;
pub mod ring;
pub mod sys;
pub mod worker;

pub use forward::{
    fuzz_frame, DropReason, ForwardCounters, Forwarder, Forwarding, IgnoreReason, LbConfig,
    Neighbours, Outcome, TxKind,
};
pub use ring::VnetHeader;
pub use sys::{interface_info, InterfaceInfo, RingConfig};
pub use worker::{IoCounters, LbWorkers, WorkerConfig};
