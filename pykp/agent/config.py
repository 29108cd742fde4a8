"""`pykp run`'s settings: one dataclass, its defaults (kube-proxy's where it has the
flag) and its validation. The CLI and a KubeProxyConfiguration file layer onto it."""

from __future__ import annotations

import ipaddress
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from pykp.model import POLICIES
from pykp.netfilter.conntrack_sysctls import ConntrackSettings
from pykp.observe.health import parse_bind_address

__all__ = ["DEFAULT_STATE_DIR", "PROXY_MODE", "AgentConfig", "ConfigError", "check_mark_mask"]

DEFAULT_STATE_DIR: Final = Path("/run/pykp")
# What /proxyMode answers and `pykp status` shows, where kube-proxy says "iptables" or
# "nftables": new connections are decided by pykp's NFQUEUE readers (kernel path beside).
PROXY_MODE: Final = "nfqueue"
_MAX_MAGLEV_TABLE: Final = 1 << 24


class ConfigError(ValueError):
    """A setting is invalid; `flag` names it as the command line spells it."""

    def __init__(self, flag: str, message: str) -> None:
        super().__init__(f"{flag}: {message}")
        self.flag = flag
        self.message = message


@dataclass(frozen=True)
class AgentConfig:
    """Everything `pykp run` takes; the defaults are kube-proxy's where it has the flag."""

    services: Path | None = None  # the services file; None: the Kubernetes API
    kubeconfig: str | None = None  # None: in-cluster credentials, else ~/.kube/config
    master: str | None = None  # the API server's URL, overriding the kubeconfig's
    kube_context: str | None = None
    hostname_override: str | None = None
    cluster_cidrs: tuple[str, ...] = ()
    healthz_bind_address: str = "0.0.0.0:10256"  # "" turns the server off
    metrics_bind_address: str = "127.0.0.1:10249"  # "" turns the server off
    nodeport_addresses: tuple[str, ...] = ()  # CIDRs; () = every non-loopback address
    default_policy: str = "random"
    min_sync_period: float = 1.0
    sync_period: float = 30.0
    queue_num: int = 0  # the first NFQUEUE queue
    queues: int = 1  # queues (and datapath worker threads)
    mark_mask: int = 0xFFFF0000
    # A full queue (or socket buffer) accepts new packets undecided: the kernel path then
    # serves them, instead of dropping them while the reader is stalled or overloaded.
    fail_open: bool = True
    conntrack_capacity: int = 262144
    # The kernel's conntrack sysctls, set at start as kube-proxy sets them (--conntrack-*).
    conntrack: ConntrackSettings = ConntrackSettings()
    maglev_table_size: int = 65537
    maglev_seed: int = 0
    state_dir: Path | None = DEFAULT_STATE_DIR  # None: no status file
    # Remove the rules when stopping. False leaves them, as kube-proxy does: established
    # flows keep their NAT across a restart (deleting pykp's nat chains ends them), and the
    # kernel path serves new connections until the next agent.
    cleanup_on_exit: bool = False
    # A service IP (ClusterIP, externalIP, LB IP) equal to one of the node's own addresses
    # would capture the node's traffic to that port (the CVE-2020-8554 class): refused
    # unless this is set.
    allow_node_address_service_ips: bool = False
    # Random services without session affinity are decided in the kernel (numgen random,
    # as kube-proxy's nftables mode) instead of by pykp's reader: no user-space hop.
    kernel_random: bool = True
    # Round-robin services (without session affinity) rotate in the kernel (one `numgen
    # inc` counter per service and family) instead of in pykp's reader: no user-space hop,
    # and the rotation goes on while the agent is stopped. It restarts at the first slot
    # when the service's slot count changes or the agent restarts; False keeps pykp's
    # reader deciding, which keeps its place.
    kernel_round_robin: bool = True
    # Someone else's changes to pykp's rules are found as they commit (nf_tables'
    # notifications) and repaired at once; off, or where the notifications cannot be read,
    # the periodic check (every half --sync-period) finds them.
    watch_rules: bool = True
    # Follow the kernel's conntrack events so pykp's flow table holds the kernel's live
    # service flows: least-conn counts active connections, a flow's end frees its count at
    # once, and /metrics and `pykp flows` count exactly.
    follow_conntrack: bool = True
    conntrack_resync_interval: float = 30.0  # full listing of the kernel's table this often
    # (service, backend) series of pykp_backend_active_flows at most; past it, the rest is
    # summed per service under backend="other" (bounded cardinality).
    flow_metrics_limit: int = 1000
    # Packets that may wait for the reader's verdict: what a stalled reader holds up before
    # fail-open hands new connections to the kernel path.
    queue_max_len: int = 32
    poll_interval: float = 1.0  # how often the services file is checked
    status_flows: int = 100  # flows included in a status snapshot
    status_services: int = 1000  # services listed in a status snapshot (the first by name)
    # The status file is rewritten at most this often (0: at every sync); it lists every
    # service, so it is written off the sync path.
    status_interval: float = 5.0

    @property
    def first_queue(self) -> int:
        return self.queue_num

    @property
    def last_queue(self) -> int:
        return self.queue_num + self.queues - 1

    @property
    def health_timeout(self) -> float:
        """kube-proxy's: two sync periods."""
        return 2 * self.sync_period

    @property
    def node_name(self) -> str:
        return self.hostname_override or socket.gethostname()

    def validate(self) -> None:
        """Raise `ConfigError` for the first invalid setting."""
        if self.services is not None and (self.kubeconfig or self.master or self.kube_context):
            raise ConfigError(
                "--services", "a services file and a Kubernetes API source exclude each other"
            )
        for flag, cidrs in (
            ("--cluster-cidr", self.cluster_cidrs),
            ("--nodeport-addresses", self.nodeport_addresses),
        ):
            for cidr in cidrs:
                try:
                    ipaddress.ip_network(cidr, strict=False)
                except ValueError:
                    raise ConfigError(flag, f"{cidr!r} is not a CIDR") from None
        for flag, address in (
            ("--healthz-bind-address", self.healthz_bind_address),
            ("--metrics-bind-address", self.metrics_bind_address),
        ):
            if address:
                try:
                    parse_bind_address(address)
                except ValueError as error:
                    raise ConfigError(flag, str(error)) from None
        if self.default_policy not in POLICIES:
            raise ConfigError(
                "--default-policy",
                f"{self.default_policy!r} is not one of {', '.join(POLICIES)}",
            )
        if not self.min_sync_period >= 0:
            raise ConfigError("--min-sync-period", "must be >= 0")
        if not self.sync_period > 0:
            raise ConfigError("--sync-period", "must be > 0")
        if self.min_sync_period > self.sync_period:
            raise ConfigError(
                "--min-sync-period",
                f"{self.min_sync_period}s is longer than --sync-period ({self.sync_period}s)",
            )
        if not 0 <= self.queue_num <= 65535:
            raise ConfigError("--queue-num", "must be 0..65535")
        if self.queues < 1 or self.last_queue > 65535:
            raise ConfigError("--queues", "must be >= 1 with --queue-num + --queues - 1 <= 65535")
        message = check_mark_mask(self.mark_mask)
        if message:
            raise ConfigError("--mark-mask", message)
        if self.conntrack_capacity < 1:
            raise ConfigError("--conntrack-capacity", "must be >= 1")
        _check_conntrack(self.conntrack)
        if not (
            3 <= self.maglev_table_size <= _MAX_MAGLEV_TABLE and _is_prime(self.maglev_table_size)
        ):
            raise ConfigError(
                "--maglev-table-size",
                f"{self.maglev_table_size} is not a prime between 3 and {_MAX_MAGLEV_TABLE}"
                " (65537 is the default)",
            )
        if not 0 <= self.maglev_seed < 2**64:
            raise ConfigError("--maglev-seed", "must be 0..2^64-1")
        if self.poll_interval <= 0:
            raise ConfigError("--poll-interval", "must be > 0")


def check_mark_mask(mask: int) -> str | None:
    """Why `mask` cannot hold backend ids next to pykp's other mark bits, or None."""
    from pykp.netfilter.rules import MarkLayout

    try:
        MarkLayout(backend_mask=mask).validate()
    except ValueError as error:
        return f"{mask:#x}: {error}"
    return None


def _check_conntrack(settings: ConntrackSettings) -> None:
    """kube-proxy's validation of its conntrack settings: nothing negative; and, since the
    kernel counts timeouts in whole seconds, a timeout is 0 (left alone) or at least 1s."""
    for flag, number in (
        ("--conntrack-max-per-core", settings.max_per_core),
        ("--conntrack-min", settings.min),
    ):
        if not 0 <= number < 2**31:
            raise ConfigError(flag, "must be 0..2^31-1")
    for flag, seconds in (
        ("--conntrack-tcp-timeout-established", settings.tcp_established_timeout),
        ("--conntrack-tcp-timeout-close-wait", settings.tcp_close_wait_timeout),
        ("--conntrack-udp-timeout", settings.udp_timeout),
        ("--conntrack-udp-timeout-stream", settings.udp_stream_timeout),
    ):
        if not (seconds == 0 or 1 <= seconds < 2**31):
            raise ConfigError(flag, "must be 0 (leave the kernel's value) or at least 1s")


def _is_prime(n: int) -> bool:
    if n < 2:
        return False
    return all(n % d for d in range(2, int(n**0.5) + 1))
