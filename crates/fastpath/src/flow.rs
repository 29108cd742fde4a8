//! Flow identity shared by every part of the core: protocol, 5-tuple, TCP flags, time.

use std::fmt;
use std::net::IpAddr;

/// Monotonic time in nanoseconds. The core never reads a clock: callers pass `now`,
/// so every table and policy is a pure function of its inputs (and testable as such).
pub type Nanos = u64;

pub const NANOS_PER_SEC: Nanos = 1_000_000_000;

/// Transport protocols a service can expose (kube-proxy's TCP, UDP and SCTP).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[repr(u8)]
pub enum Protocol {
    Tcp = 6,
    Udp = 17,
    Sctp = 132,
}

impl Protocol {
    /// The IANA protocol number (IPv4 `protocol`, IPv6 `next header`).
    pub const fn number(self) -> u8 {
        self as u8
    }

    pub const fn from_number(n: u8) -> Option<Protocol> {
        match n {
            6 => Some(Protocol::Tcp),
            17 => Some(Protocol::Udp),
            132 => Some(Protocol::Sctp),
            _ => None,
        }
    }

    /// Kubernetes spelling: "TCP", "UDP", "SCTP".
    pub const fn as_str(self) -> &'static str {
        match self {
            Protocol::Tcp => "TCP",
            Protocol::Udp => "UDP",
            Protocol::Sctp => "SCTP",
        }
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for Protocol {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.to_ascii_uppercase().as_str() {
            "TCP" => Ok(Protocol::Tcp),
            "UDP" => Ok(Protocol::Udp),
            "SCTP" => Ok(Protocol::Sctp),
            other => Err(format!("unknown protocol {other:?} (expected TCP, UDP or SCTP)")),
        }
    }
}

/// A connection's identity in its original direction (client to frontend).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct FlowKey {
    pub src: IpAddr,
    pub dst: IpAddr,
    pub src_port: u16,
    pub dst_port: u16,
    pub proto: Protocol,
}

impl FlowKey {
    pub fn new(proto: Protocol, src: IpAddr, src_port: u16, dst: IpAddr, dst_port: u16) -> Self {
        FlowKey { src, dst, src_port, dst_port, proto }
    }

    /// The same flow seen from the other end.
    pub fn reversed(&self) -> FlowKey {
        FlowKey {
            src: self.dst,
            dst: self.src,
            src_port: self.dst_port,
            dst_port: self.src_port,
            proto: self.proto,
        }
    }
}

impl fmt::Display for FlowKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} {} -> {}",
            self.proto,
            std::net::SocketAddr::new(self.src, self.src_port),
            std::net::SocketAddr::new(self.dst, self.dst_port)
        )
    }
}

/// TCP header flags (the low byte of the flags field).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct TcpFlags(pub u8);

impl TcpFlags {
    pub const FIN: u8 = 0x01;
    pub const SYN: u8 = 0x02;
    pub const RST: u8 = 0x04;
    pub const PSH: u8 = 0x08;
    pub const ACK: u8 = 0x10;

    pub const fn syn(self) -> bool {
        self.0 & Self::SYN != 0
    }
    pub const fn ack(self) -> bool {
        self.0 & Self::ACK != 0
    }
    pub const fn fin(self) -> bool {
        self.0 & Self::FIN != 0
    }
    pub const fn rst(self) -> bool {
        self.0 & Self::RST != 0
    }
    /// A connection opener: SYN without ACK.
    pub const fn is_initial_syn(self) -> bool {
        self.syn() && !self.ack()
    }
}
