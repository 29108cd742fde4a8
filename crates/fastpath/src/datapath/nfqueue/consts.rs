//! Constants of `linux/netlink.h`, `linux/netfilter/nfnetlink.h` and
//! `linux/netfilter/nfnetlink_queue.h`, with the two helpers the wire layout needs.

// ---------------------------------------------------------------------------------------
// linux/netlink.h
// ---------------------------------------------------------------------------------------

/// `NLMSG_HDRLEN`: size of `struct nlmsghdr`.
pub const NLMSG_HDRLEN: usize = 16;
/// `NLA_HDRLEN`: size of `struct nlattr`.
pub const NLA_HDRLEN: usize = 4;
/// `NLMSG_NOOP`.
pub const NLMSG_NOOP: u16 = 0x1;
/// `NLMSG_ERROR`: an error, or an ack when the error code is 0.
pub const NLMSG_ERROR: u16 = 0x2;
/// `NLMSG_DONE`: end of a multipart message.
pub const NLMSG_DONE: u16 = 0x3;
/// `NLMSG_OVERRUN`.
pub const NLMSG_OVERRUN: u16 = 0x4;
/// `NLM_F_REQUEST`: must be set on every message to the kernel.
pub const NLM_F_REQUEST: u16 = 0x01;
/// `NLM_F_MULTI`.
pub const NLM_F_MULTI: u16 = 0x02;
/// `NLM_F_ACK`: ask for an `NLMSG_ERROR` with code 0 on success.
pub const NLM_F_ACK: u16 = 0x04;
/// `NLA_F_NESTED`.
pub const NLA_F_NESTED: u16 = 1 << 15;
/// `NLA_F_NET_BYTEORDER`.
pub const NLA_F_NET_BYTEORDER: u16 = 1 << 14;
/// `NLA_TYPE_MASK`.
pub const NLA_TYPE_MASK: u16 = !(NLA_F_NESTED | NLA_F_NET_BYTEORDER);

// ---------------------------------------------------------------------------------------
// linux/netfilter/nfnetlink.h
// ---------------------------------------------------------------------------------------

/// Size of `struct nfgenmsg`.
pub const NFGENMSG_LEN: usize = 4;
/// `NFNETLINK_V0`.
pub const NFNETLINK_V0: u8 = 0;
/// `NFNL_SUBSYS_QUEUE`.
pub const NFNL_SUBSYS_QUEUE: u8 = 3;
/// `AF_UNSPEC` (the family of configuration and verdict messages).
pub const AF_UNSPEC: u8 = 0;

// ---------------------------------------------------------------------------------------
// linux/netfilter/nfnetlink_queue.h
// ---------------------------------------------------------------------------------------

/// `NFQNL_MSG_PACKET`: packet from kernel to user space.
pub const NFQNL_MSG_PACKET: u8 = 0;
/// `NFQNL_MSG_VERDICT`: verdict for one packet id.
pub const NFQNL_MSG_VERDICT: u8 = 1;
/// `NFQNL_MSG_CONFIG`: bind / unbind / configure a queue.
pub const NFQNL_MSG_CONFIG: u8 = 2;
/// `NFQNL_MSG_VERDICT_BATCH`: one verdict for every queued id `<=` the given id.
pub const NFQNL_MSG_VERDICT_BATCH: u8 = 3;

/// `NFQA_PACKET_HDR` (`struct nfqnl_msg_packet_hdr`, 7 bytes packed).
pub const NFQA_PACKET_HDR: u16 = 1;
/// `NFQA_VERDICT_HDR` (`struct nfqnl_msg_verdict_hdr`, 8 bytes).
pub const NFQA_VERDICT_HDR: u16 = 2;
/// `NFQA_MARK` (be32 skb->mark).
pub const NFQA_MARK: u16 = 3;
/// `NFQA_TIMESTAMP`.
pub const NFQA_TIMESTAMP: u16 = 4;
/// `NFQA_IFINDEX_INDEV` (be32).
pub const NFQA_IFINDEX_INDEV: u16 = 5;
/// `NFQA_IFINDEX_OUTDEV` (be32).
pub const NFQA_IFINDEX_OUTDEV: u16 = 6;
/// `NFQA_IFINDEX_PHYSINDEV` (be32).
pub const NFQA_IFINDEX_PHYSINDEV: u16 = 7;
/// `NFQA_IFINDEX_PHYSOUTDEV` (be32).
pub const NFQA_IFINDEX_PHYSOUTDEV: u16 = 8;
/// `NFQA_HWADDR`.
pub const NFQA_HWADDR: u16 = 9;
/// `NFQA_PAYLOAD`: the packet from its network header on, up to the copy range.
pub const NFQA_PAYLOAD: u16 = 10;
/// `NFQA_CT` (nested, only with `NFQA_CFG_F_CONNTRACK`).
pub const NFQA_CT: u16 = 11;
/// `NFQA_CT_INFO` (be32 `enum ip_conntrack_info`).
pub const NFQA_CT_INFO: u16 = 12;
/// `NFQA_CAP_LEN` (be32 full packet length, sent when the payload was cut).
pub const NFQA_CAP_LEN: u16 = 13;
/// `NFQA_SKB_INFO` (be32 `NFQA_SKB_*` flags).
pub const NFQA_SKB_INFO: u16 = 14;
/// `NFQA_EXP`.
pub const NFQA_EXP: u16 = 15;
/// `NFQA_UID` (be32).
pub const NFQA_UID: u16 = 16;
/// `NFQA_GID` (be32).
pub const NFQA_GID: u16 = 17;
/// `NFQA_SECCTX`.
pub const NFQA_SECCTX: u16 = 18;
/// `NFQA_VLAN` (nested).
pub const NFQA_VLAN: u16 = 19;
/// `NFQA_L2HDR`.
pub const NFQA_L2HDR: u16 = 20;
/// `NFQA_PRIORITY`.
pub const NFQA_PRIORITY: u16 = 21;

/// `NFQA_CFG_CMD` (`struct nfqnl_msg_config_cmd`, 4 bytes).
pub const NFQA_CFG_CMD: u16 = 1;
/// `NFQA_CFG_PARAMS` (`struct nfqnl_msg_config_params`, 5 bytes packed).
pub const NFQA_CFG_PARAMS: u16 = 2;
/// `NFQA_CFG_QUEUE_MAXLEN` (be32).
pub const NFQA_CFG_QUEUE_MAXLEN: u16 = 3;
/// `NFQA_CFG_MASK` (be32): which flags `NFQA_CFG_FLAGS` changes.
pub const NFQA_CFG_MASK: u16 = 4;
/// `NFQA_CFG_FLAGS` (be32).
pub const NFQA_CFG_FLAGS: u16 = 5;

/// `NFQNL_CFG_CMD_BIND`.
pub const NFQNL_CFG_CMD_BIND: u8 = 1;
/// `NFQNL_CFG_CMD_UNBIND`.
pub const NFQNL_CFG_CMD_UNBIND: u8 = 2;

/// `NFQNL_COPY_NONE`.
pub const NFQNL_COPY_NONE: u8 = 0;
/// `NFQNL_COPY_META`.
pub const NFQNL_COPY_META: u8 = 1;
/// `NFQNL_COPY_PACKET`.
pub const NFQNL_COPY_PACKET: u8 = 2;
/// `NFQNL_MAX_COPY_RANGE` (`0xffff - NLA_HDRLEN`); the kernel clamps larger ranges and 0.
pub const NFQNL_MAX_COPY_RANGE: u32 = 0xffff - NLA_HDRLEN as u32;

/// `NFQA_CFG_F_FAIL_OPEN`: accept instead of drop when the queue is full.
pub const NFQA_CFG_F_FAIL_OPEN: u32 = 1 << 0;
/// `NFQA_CFG_F_CONNTRACK`: attach conntrack info (`NFQA_CT`, `NFQA_CT_INFO`).
pub const NFQA_CFG_F_CONNTRACK: u32 = 1 << 1;
/// `NFQA_CFG_F_GSO`: hand GSO packets over unsegmented.
pub const NFQA_CFG_F_GSO: u32 = 1 << 2;
/// `NFQA_CFG_F_UID_GID`.
pub const NFQA_CFG_F_UID_GID: u32 = 1 << 3;
/// `NFQA_CFG_F_SECCTX`.
pub const NFQA_CFG_F_SECCTX: u32 = 1 << 4;

/// `NFQA_SKB_CSUMNOTREADY`: checksums look wrong but will be filled in (offload).
pub const NFQA_SKB_CSUMNOTREADY: u32 = 1 << 0;
/// `NFQA_SKB_GSO`: the packet is a GSO super-packet (longer than the MTU).
pub const NFQA_SKB_GSO: u32 = 1 << 1;
/// `NFQA_SKB_CSUM_NOTVERIFIED`.
pub const NFQA_SKB_CSUM_NOTVERIFIED: u32 = 1 << 2;

/// `NF_DROP`.
pub const NF_DROP: u32 = 0;
/// `NF_ACCEPT`.
pub const NF_ACCEPT: u32 = 1;
/// `NF_REPEAT`.
pub const NF_REPEAT: u32 = 4;

/// Size of one encoded `NFQNL_MSG_VERDICT` with a mark (the largest verdict message).
pub const VERDICT_MSG_MAX_LEN: usize =
    NLMSG_HDRLEN + NFGENMSG_LEN + NLA_HDRLEN + 8 + NLA_HDRLEN + 4;

/// `(NFNL_SUBSYS_QUEUE << 8) | msg`.
#[inline]
pub const fn nfq_msg_type(msg: u8) -> u16 {
    ((NFNL_SUBSYS_QUEUE as u16) << 8) | msg as u16
}

/// `NLMSG_ALIGN` / `NLA_ALIGN`: round up to 4.
#[inline]
pub const fn align4(n: usize) -> usize {
    (n + 3) & !3
}
