//! Per-flow protocol state: just enough to pick a timeout, so closed TCP flows leave the
//! table in seconds instead of a day. Pure functions of (state, flags).

use crate::flow::{Protocol, TcpFlags};

/// A flow's state. TCP is tracked from the original direction only (the packets pykp sees
/// and looks up), which is enough to tell opening, open and closing flows apart.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum ConnState {
    /// TCP: an initial SYN was seen, nothing else yet.
    SynSent,
    /// TCP: a non-SYN packet followed (or the flow was picked up mid-stream).
    Established,
    /// TCP: a FIN was seen; lingers like the kernel's TIME_WAIT for late packets.
    Closing,
    /// TCP: a RST was seen.
    Closed,
    /// UDP: one packet so far.
    Udp,
    /// UDP: more than one packet.
    UdpStream,
    /// SCTP (no chunk parsing: a plain idle timeout).
    Sctp,
    /// The kernel's conntrack confirmed the flow (NFQUEUE datapath, any protocol): it lives
    /// until the kernel reports its end, whatever its packets (pykp no longer sees them).
    Kernel,
}

impl ConnState {
    /// Name shown in snapshots.
    pub const fn as_str(self) -> &'static str {
        match self {
            ConnState::SynSent => "SYN_SENT",
            ConnState::Established => "ESTABLISHED",
            ConnState::Closing => "CLOSING",
            ConnState::Closed => "CLOSED",
            ConnState::Udp => "UDP",
            ConnState::UdpStream => "UDP_STREAM",
            ConnState::Sctp => "SCTP",
            ConnState::Kernel => "KERNEL",
        }
    }

    /// State of a new entry created by a packet of `proto` with `flags`.
    ///
    /// TCP: initial SYN -> `SynSent`; RST -> `Closed`; FIN -> `Closing`; any other packet,
    /// or no flags at all (`None`: the caller could not see them), is a flow picked up
    /// mid-stream (after a restart, say) -> `Established`, like the kernel's loose pickup.
    /// UDP and SCTP ignore flags.
    #[inline]
    pub fn initial(proto: Protocol, flags: Option<TcpFlags>) -> ConnState {
        match proto {
            Protocol::Udp => ConnState::Udp,
            Protocol::Sctp => ConnState::Sctp,
            Protocol::Tcp => match flags {
                Some(f) if f.rst() => ConnState::Closed,
                Some(f) if f.fin() => ConnState::Closing,
                Some(f) if f.is_initial_syn() => ConnState::SynSent,
                _ => ConnState::Established,
            },
        }
    }

    /// State after one more packet of an existing flow; `None` means "this packet starts a
    /// new connection on a reused 5-tuple": an initial SYN for a flow that is closing or
    /// closed. The caller then drops the old entry and balances the SYN afresh.
    ///
    /// TCP with `None` flags keeps its state (the timeout is still refreshed). RST wins over
    /// everything; a FIN moves an open flow to `Closing` (a closed one stays closed); a
    /// retransmitted SYN leaves `SynSent`/`Established` alone; any other packet opens a
    /// `SynSent` flow.
    #[inline]
    pub fn on_packet(self, flags: Option<TcpFlags>) -> Option<ConnState> {
        use ConnState::*;
        match self {
            // Only a packet the kernel takes for a new connection reaches pykp under
            // NFQUEUE: the flow this entry stood for is gone from the kernel.
            Kernel => None,
            Udp | UdpStream => Some(UdpStream),
            Sctp => Some(Sctp),
            SynSent | Established | Closing | Closed => {
                let Some(f) = flags else { return Some(self) };
                if f.rst() {
                    Some(Closed)
                } else if f.is_initial_syn() {
                    match self {
                        Closing | Closed => None,
                        s => Some(s),
                    }
                } else if f.fin() {
                    match self {
                        Closed => Some(Closed),
                        _ => Some(Closing),
                    }
                } else {
                    match self {
                        SynSent => Some(Established),
                        s => Some(s),
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::ConnState::*;
    use super::*;

    const SYN: Option<TcpFlags> = Some(TcpFlags(TcpFlags::SYN));
    const ACK: Option<TcpFlags> = Some(TcpFlags(TcpFlags::ACK));
    const PSH_ACK: Option<TcpFlags> = Some(TcpFlags(TcpFlags::PSH | TcpFlags::ACK));
    const FIN_ACK: Option<TcpFlags> = Some(TcpFlags(TcpFlags::FIN | TcpFlags::ACK));
    const RST: Option<TcpFlags> = Some(TcpFlags(TcpFlags::RST));

    #[test]
    fn initial_states() {
        assert_eq!(ConnState::initial(Protocol::Tcp, SYN), SynSent);
        assert_eq!(ConnState::initial(Protocol::Tcp, ACK), Established);
        assert_eq!(ConnState::initial(Protocol::Tcp, None), Established);
        assert_eq!(ConnState::initial(Protocol::Tcp, FIN_ACK), Closing);
        assert_eq!(ConnState::initial(Protocol::Tcp, RST), Closed);
        assert_eq!(ConnState::initial(Protocol::Udp, SYN), Udp);
        assert_eq!(ConnState::initial(Protocol::Sctp, None), Sctp);
    }

    #[test]
    fn tcp_transitions() {
        assert_eq!(SynSent.on_packet(SYN), Some(SynSent), "retransmitted SYN");
        assert_eq!(SynSent.on_packet(ACK), Some(Established));
        assert_eq!(SynSent.on_packet(None), Some(SynSent));
        assert_eq!(Established.on_packet(PSH_ACK), Some(Established));
        assert_eq!(Established.on_packet(SYN), Some(Established));
        assert_eq!(Established.on_packet(FIN_ACK), Some(Closing));
        assert_eq!(SynSent.on_packet(FIN_ACK), Some(Closing));
        assert_eq!(Closing.on_packet(ACK), Some(Closing));
        assert_eq!(Closing.on_packet(FIN_ACK), Some(Closing));
        assert_eq!(Closed.on_packet(FIN_ACK), Some(Closed));
        for s in [SynSent, Established, Closing, Closed] {
            assert_eq!(s.on_packet(RST), Some(Closed));
        }
        assert_eq!(Closing.on_packet(SYN), None, "port reuse after FIN");
        assert_eq!(Closed.on_packet(SYN), None, "port reuse after RST");
        let syn_ack = Some(TcpFlags(TcpFlags::SYN | TcpFlags::ACK));
        assert_eq!(Closed.on_packet(syn_ack), Some(Closed), "only an initial SYN reopens");
    }

    #[test]
    fn udp_and_sctp() {
        assert_eq!(Udp.on_packet(None), Some(UdpStream));
        assert_eq!(UdpStream.on_packet(None), Some(UdpStream));
        assert_eq!(Sctp.on_packet(SYN), Some(Sctp));
        assert_eq!(Udp.as_str(), "UDP");
        assert_eq!(Closing.as_str(), "CLOSING");
    }

    #[test]
    fn a_kernel_flow_met_again_is_a_new_connection() {
        for flags in [SYN, ACK, None] {
            assert_eq!(Kernel.on_packet(flags), None);
        }
        assert_eq!(Kernel.as_str(), "KERNEL");
    }
}
