"""Type stubs for pykp._fastpath, the Rust core (crates/fastpath, feature "python").

Checked against the built extension by `python -m mypy.stubtest pykp._fastpath`.
"""

from collections.abc import Iterable, Sequence
from typing import Final, Self, final

__all__ = [
    "__version__",
    "POLICIES",
    "Frontend",
    "Backend",
    "ServiceUpdate",
    "StagedChange",
    "Decision",
    "Connection",
    "Engine",
    "NfqueueDatapath",
    "AfpacketDatapath",
    "ConntrackFollower",
    "KernelFlow",
    "kernel_flows",
    "loadgen_main",
    "queue_keeper",
    "encode_elements",
    "Explanation",
    "ExplainedBackend",
    "ExplainedAffinity",
    "ExplainedFlow",
    "explain",
]

__version__: Final[str]

POLICIES: Final[tuple[str, ...]]
"""Policy names accepted everywhere: "random", "round-robin", "maglev", "least-conn"."""

@final
class Frontend:
    """Where a service is reached: an address, a port and a protocol ("TCP", "UDP", "SCTP")."""

    def __new__(cls, ip: str, port: int, protocol: str = "TCP") -> Self: ...
    @property
    def ip(self) -> str: ...
    @property
    def port(self) -> int: ...
    @property
    def protocol(self) -> str: ...

@final
class Backend:
    """An endpoint of a service, with Kubernetes' endpoint conditions."""

    def __new__(
        cls,
        ip: str,
        port: int,
        weight: int = 1,
        ready: bool = True,
        serving: bool = True,
        terminating: bool = False,
        local: bool = False,
    ) -> Self: ...
    @property
    def ip(self) -> str: ...
    @property
    def port(self) -> int: ...
    @property
    def weight(self) -> int: ...
    @property
    def ready(self) -> bool: ...
    @property
    def serving(self) -> bool: ...
    @property
    def terminating(self) -> bool: ...
    @property
    def local(self) -> bool: ...

@final
class ServiceUpdate:
    """One service as `Engine.stage` upserts it: `Engine.upsert_service`'s arguments as a
    value. Raises ValueError on a bad policy, hash key or affinity timeout; what only the
    table can judge (a taken frontend, a bad port) is refused by `stage` instead."""

    def __new__(
        cls,
        name: str,
        frontends: Sequence[Frontend],
        backends: Sequence[Backend],
        *,
        policy: str | None = None,
        affinity_timeout: float | None = None,
        hash_key: str | None = None,
        short_circuit: str | None = None,
    ) -> Self:
        """`short_circuit`: a connection from inside the cluster (a packet the rules mark
        with the cluster-source bit) is decided as this other service (kube-proxy's
        short-circuit of externalTrafficPolicy Local)."""
    @property
    def name(self) -> str: ...
    @property
    def frontends(self) -> list[Frontend]: ...
    @property
    def backends(self) -> list[Backend]: ...
    @property
    def policy(self) -> str | None: ...
    @property
    def affinity_timeout(self) -> float | None: ...
    @property
    def hash_key(self) -> str | None: ...
    @property
    def short_circuit(self) -> str | None: ...

@final
class StagedChange:
    """A batch computed by `Engine.stage` (or applied by `Engine.apply`); readers see none
    of it until `Engine.commit`, then all of it at once."""

    @property
    def refused(self) -> dict[str, str]:
        """Refused upserts and why. A refused service's previous version is removed too."""
    @property
    def backends_added(self) -> dict[int, tuple[str, int]]:
        """Backend ids that come into use: program them before committing."""
    @property
    def backends_removed(self) -> dict[int, tuple[str, int]]:
        """Backend ids that leave use once committed (reused only after the commit)."""
    @property
    def pools(self) -> dict[str, tuple[list[tuple[int, int]], list[tuple[int, int]]]]:
        """The accepted upserts' pools, as `Engine.pools()` will give them."""
    def pool(self, name: str) -> tuple[list[tuple[int, int]], list[tuple[int, int]]] | None:
        """One accepted upsert's pools (None if `name` is not one): `pools` without
        making them all at once."""
    @property
    def removed(self) -> list[str]:
        """Services that no longer exist after the commit: removals that existed and
        refused upserts that existed."""
    @property
    def committed(self) -> bool:
        """True once committed (or refused as stale), and for `Engine.apply`'s result."""

@final
class Decision:
    """What a datapath does with one packet."""

    @property
    def action(self) -> str:
        """ "forward", "pass", "reject" or "drop"."""
    @property
    def reason(self) -> str | None:
        """Why a packet was passed, rejected or dropped (None for forward)."""
    @property
    def service(self) -> str | None: ...
    @property
    def backend(self) -> tuple[str, int] | None: ...
    @property
    def backend_id(self) -> int | None:
        """The backend's id, as the NFQUEUE datapath puts it in the packet mark."""
    @property
    def new_flow(self) -> bool:
        """True when this packet opened a flow; False when the connection table knew it."""

@final
class Connection:
    """One entry of the connection table."""

    @property
    def protocol(self) -> str: ...
    @property
    def client(self) -> tuple[str, int]: ...
    @property
    def frontend(self) -> tuple[str, int]: ...
    @property
    def backend(self) -> tuple[str, int]: ...
    @property
    def service(self) -> str: ...
    @property
    def state(self) -> str: ...
    @property
    def expires_in(self) -> float:
        """Seconds until the entry expires if no packet refreshes it."""

@final
class Engine:
    """The service table, the policies and the connection table behind one decision call.

    Times (`now`) are monotonic seconds; when omitted the engine reads its own clock.
    Every method releases the GIL around its work.
    """

    def __new__(
        cls,
        *,
        default_policy: str = "random",
        conntrack_capacity: int = 262144,
        maglev_table_size: int = 65537,
        maglev_seed: int = 0,
        hash_key: str = "5-tuple",
        seed: int | None = None,
        max_backend_id: int = 0xFFFFFFFE,
    ) -> Self:
        """`max_backend_id`: the largest backend id handed out (what the packet mark carries);
        a service that would need more is refused with ValueError, whole."""
    def upsert_service(
        self,
        name: str,
        frontends: list[Frontend],
        backends: list[Backend],
        *,
        policy: str | None = None,
        affinity_timeout: float | None = None,
        hash_key: str | None = None,
    ) -> int:
        """Add or replace a service (atomically); returns its id.

        `policy` None means the engine's default; `affinity_timeout` None means no
        session affinity (ClientIP affinity otherwise, in seconds); `hash_key` is
        "5-tuple" or "source-ip" for Maglev. Raises ValueError on bad input.
        """
    def remove_service(self, name: str) -> bool:
        """Remove a service and its frontends; False when there was none."""
    def stage(self, upserts: Sequence[ServiceUpdate], removals: Sequence[str]) -> StagedChange:
        """Compute a batch without publishing it. Removals go first; then upserts claim their
        frontends in the order given (put the oldest service first: on a conflict the
        earlier one wins and the later is refused). Backend ids are allocated here (an
        address already live keeps its id): program `backends_added` before `commit`."""
    def commit(self, staged: StagedChange) -> None:
        """Publish a staged batch at once, forgetting the flows it strands. Raises ValueError
        when it was already committed, or when another change was committed after it was
        staged (stale: stage again)."""
    def apply(self, upserts: Sequence[ServiceUpdate], removals: Sequence[str]) -> StagedChange:
        """`stage` then `commit`."""
    def services(self) -> list[str]: ...
    def holds(self, name: str) -> bool:
        """Whether a service of this name is published (one lookup, not a list of all)."""
    def service_count(self) -> int: ...
    def pools(
        self, names: Sequence[str] | None = None
    ) -> dict[str, tuple[list[tuple[int, int]], list[tuple[int, int]]]]:
        """Each service's eligible backends as (id, weight), IPv4 then IPv6 (kube-proxy's
        rule: ready ones, else serving and terminating; weight above 0), sorted by address.
        Only the services in `names` when given (unknown names are left out)."""
    def backend_ids(self) -> dict[int, tuple[str, int]]:
        """Every live backend id and the address and port it stands for."""
    def decide(
        self,
        src: str,
        src_port: int,
        dst: str,
        dst_port: int,
        protocol: str = "TCP",
        *,
        tcp_flags: int = 0x02,
        now: float | None = None,
    ) -> Decision:
        """Decide for a packet described by its 5-tuple (SYN by default)."""
    def decide_packet(self, packet: bytes, *, now: float | None = None) -> Decision:
        """Decide for a raw IPv4 or IPv6 packet; malformed input gives a "drop" with a reason."""
    def expire(self, *, now: float | None = None, budget: int = 4096) -> int:
        """Run one bounded step of connection-table GC; returns entries removed."""
    def flush_backend(self, ip: str, port: int) -> int:
        """Forget every flow to a backend (kube-proxy's stale-UDP cleanup); returns how many."""
    def counters(self) -> dict[str, int]:
        """All counters: decisions by action and policy, drops by reason, conntrack stats."""
    def connections(self, limit: int = 1000, *, now: float | None = None) -> list[Connection]:
        """Open flows; expiry is measured at `now`, by default the latest time the engine saw."""
    def flow_counts(self, *, now: float | None = None) -> dict[tuple[str, str, int], int]:
        """Live flows in the connection table per (service, backend ip, backend port)."""
    def maglev_table(self, name: str) -> list[int]:
        """The Maglev lookup table of a service, as backend ids (empty if not Maglev)."""

@final
class NfqueueDatapath:
    """Rust threads reading NFQUEUE queues `first_queue..=last_queue` and deciding with `engine`.

    A forwarded packet is accepted with the mark `backend_id << shift` (inside
    `backend_mask`); a rejected one with `reject_mark`; a malformed one is dropped. The
    queues are bound in the network namespace of the thread that calls `start()`.
    """

    def __new__(
        cls,
        engine: Engine,
        *,
        first_queue: int = 0,
        last_queue: int = 0,
        backend_mask: int = 0xFFFF0000,
        fail_open: bool = False,
        max_len: int = 4096,
        cluster_source_bit: int = 0,
    ) -> Self:
        """`max_len`: packets that may wait for a verdict (what a stalled reader holds up);
        with `fail_open`, packets past it (or past the socket buffer) are accepted unmarked."""
    def start(self) -> None:
        """Bind the queues and start the threads; raises OSError (e.g. a queue already bound)."""
    def dup_sockets(self) -> list[tuple[int, int]]:
        """Duplicates of the bound queue sockets as (fd, queue); the caller owns the fds."""
    def heartbeat(self) -> int:
        """The read end of the readers' heartbeat pipe; the caller owns the fd."""
    @property
    def max_len(self) -> int: ...
    @property
    def fail_open(self) -> bool: ...
    def stop(self) -> None: ...
    @property
    def running(self) -> bool: ...
    @property
    def reject_mark(self) -> int: ...
    @property
    def max_backend_id(self) -> int: ...
    def stats(self) -> dict[str, int]:
        """Worker counters (packets, verdicts, accepted, dropped, errors, batches, ...),
        verdicts by kind (forwarded, passed, rejected, decision_drops, id_overflow) and the
        kernel's drops for these queues (kernel_queue_dropped, kernel_user_dropped)."""

@final
class AfpacketDatapath:
    """The AF_PACKET load balancer: Rust threads reading `interface`'s frames (a TPACKET_V3
    ring per worker with virtio headers, hash fanout), deciding with `engine`, and sending
    each VIP packet to its backend in IP-in-IP from `address` (direct server return). Answers ARP/ND for
    `vips`; next-hop MACs come from `neighbours` (IP -> MAC), else `gateway_mac`. The
    sockets open in the network namespace of the thread that calls `start()`.
    """

    def __new__(
        cls,
        engine: Engine,
        interface: str,
        address: str,
        vips: list[str],
        *,
        neighbours: dict[str, str] = ...,
        gateway_mac: str | None = None,
        workers: int = 1,
        qdisc_bypass: bool = True,
        forwarding: str = "ipip",
    ) -> Self:
        """`forwarding`: "ipip" (IP-in-IP, backends anywhere routable) or "l2-dsr" (only the
        MACs change: backends on this segment, each in `neighbours`)."""
    def start(self) -> None:
        """Open the sockets and start the threads; raises OSError (e.g. no such interface)."""
    def stop(self) -> None: ...
    @property
    def running(self) -> bool: ...
    def stats(self) -> dict[str, int]:
        """Every worker's counters added up: rx/tx/ring counters (rx_gso: GSO super-packets
        received), transmitted frames by kind (tx_forward, tx_arp_reply, tx_neighbor_advert,
        tx_too_big), ignored_* and drops_* by reason (drops_gso_tunnel: a GSO frame that
        IP-in-IP cannot carry)."""

@final
class ConntrackFollower:
    """A Rust thread following the kernel's conntrack events (NEW, DESTROY) in the network
    namespace of the thread that calls `start()`, so that `engine`'s connection table holds
    the kernel's live service flows: a flow's end frees its backend's count at once, and
    flows the kernel balanced itself are counted too. Lost events (ENOBUFS) and every
    `resync_interval` seconds trigger a full listing of the kernel's table; an entry the
    kernel never confirmed is forgotten once `grace` seconds old."""

    def __new__(
        cls,
        engine: Engine,
        *,
        resync_interval: float = 30.0,
        grace: float = 2.0,
        closing_mark: int = 0,
    ) -> Self:
        """`closing_mark`: the conntrack mark bit the rules set on a flow's first FIN or RST
        (0: none; a closing TCP state then says it)."""
    def start(self) -> None:
        """Subscribe and start the thread; raises OSError (no CAP_NET_ADMIN, say)."""
    def stop(self) -> None: ...
    @property
    def running(self) -> bool: ...
    def stats(self) -> dict[str, int]:
        """events_new, events_update, events_destroy, flows_confirmed, flows_adopted, flows_ended,
        events_lost, resyncs, resync_removed, parse_errors, recv_errors (empty when stopped)."""

@final
class KernelFlow:
    """One service flow of the kernel's conntrack table."""

    @property
    def protocol(self) -> str: ...
    @property
    def client(self) -> tuple[str, int]: ...
    @property
    def frontend(self) -> tuple[str, int]: ...
    @property
    def backend(self) -> tuple[str, int]: ...
    @property
    def service(self) -> str: ...
    @property
    def state(self) -> str:
        """The kernel's TCP state (ESTABLISHED, TIME_WAIT, ...), or UDP / SCTP."""
    @property
    def timeout(self) -> int | None:
        """Seconds before the kernel times the entry out unless a packet refreshes it."""
    @property
    def age(self) -> float | None:
        """Seconds since the kernel confirmed the flow, when the engine's follower saw it."""

def kernel_flows(engine: Engine, limit: int = 1000) -> list[KernelFlow]:
    """The kernel's conntrack entries (caller's network namespace) addressed to one of
    `engine`'s frontends, at most `limit`; raises OSError when the table cannot be read."""

def encode_elements(kind: str, texts: Iterable[str], max_chunk: int = 60000) -> list[bytes]:
    """nf_tables set elements in netlink form, from nft's text of them: chunks of
    concatenated NFTA_LIST_ELEM attributes of at most `max_chunk` bytes each. `kind`:
    "frontend", "frontend-verdict", "rotation-slot", "slot", "slot-key", "address",
    "pair", "backend" or "mark". ValueError for a text that is not of `kind`."""

def loadgen_main(args: list[str]) -> None:
    """`pykp-loadgen ARGS...` (pykp bench's load generator) in this process, GIL released."""

def queue_keeper(
    sockets: list[tuple[int, int]],
    parent: int,
    heartbeat: int | None = None,
    max_len: int = 4096,
    fail_open: bool = False,
) -> None:
    """Hold the queue sockets (fd, queue) until the pipe end `parent` reaches end of file,
    then accept what still waits and close (all fds owned from here on); with `heartbeat`,
    hand the queues over while the readers stall and give them back (the readers'
    `max_len` and `fail_open`) after."""

@final
class ExplainedBackend:
    """One backend of an explained service, with why it is (not) in the policy's pool."""

    @property
    def ip(self) -> str: ...
    @property
    def port(self) -> int: ...
    @property
    def id(self) -> int: ...
    @property
    def weight(self) -> int: ...
    @property
    def ready(self) -> bool: ...
    @property
    def serving(self) -> bool: ...
    @property
    def terminating(self) -> bool: ...
    @property
    def local(self) -> bool: ...
    @property
    def eligible(self) -> bool:
        """In the pool the policy chooses from."""
    @property
    def reason(self) -> str:
        """Why (not): ready, terminating-fallback (in the pool: no backend is ready),
        terminating (ready ones exist), not-serving, not-ready, weight-0 or other-family."""
    @property
    def active(self) -> int:
        """Flows pykp's connection table binds to it (what least-conn compares)."""
    @property
    def maglev_slots(self) -> int | None:
        """Slots it owns in the Maglev table (None: not Maglev)."""

@final
class ExplainedAffinity:
    """The client's session-affinity entry."""

    @property
    def backend(self) -> tuple[str, int]: ...
    @property
    def expires_in(self) -> float: ...
    @property
    def in_pool(self) -> bool:
        """False: its backend left the pool, so the policy chooses again."""

@final
class ExplainedFlow:
    """A live flow in pykp's connection table with the probe's 5-tuple."""

    @property
    def backend(self) -> tuple[str, int]: ...
    @property
    def state(self) -> str: ...
    @property
    def expires_in(self) -> float: ...
    @property
    def kept(self) -> bool:
        """False: a new connection on this tuple is decided afresh (the flow is closing, or
        its backend left the pool)."""

@final
class Explanation:
    """What a new connection would get, and why: `explain`'s answer."""

    @property
    def service(self) -> str: ...
    @property
    def policy(self) -> str: ...
    @property
    def hash_key(self) -> str | None:
        """Maglev's ("5-tuple", "source-ip"); None for the other policies."""
    @property
    def affinity_timeout(self) -> float | None: ...
    @property
    def frontends(self) -> list[tuple[str, int, str]]: ...
    @property
    def frontend(self) -> tuple[str, int, str] | None:
        """The frontend the connection goes to (None: the service has none)."""
    @property
    def backends(self) -> list[ExplainedBackend]:
        """Every backend, in the order the service gave them."""
    @property
    def fallback(self) -> bool:
        """The pool is the terminating fallback (no backend is ready)."""
    @property
    def round_robin_ticket(self) -> int | None:
        """Round-robin: connections handed out since the service was last written (the
        next one takes this ticket)."""
    @property
    def round_robin_cycle(self) -> int | None:
        """Round-robin: tickets in one turn of the pool (or of the weighted schedule)."""
    @property
    def maglev_table_size(self) -> int | None: ...
    @property
    def maglev_slot(self) -> int | None:
        """The connection's slot in the Maglev table, when the client given is enough."""
    @property
    def policy_choice(self) -> tuple[str, int] | None:
        """What the policy alone picks now (affinity and live flows aside)."""
    @property
    def affinity(self) -> ExplainedAffinity | None: ...
    @property
    def flow(self) -> ExplainedFlow | None: ...
    @property
    def backend(self) -> tuple[str, int] | None:
        """The backend the connection gets on this engine (None: see `decided_by`)."""
    @property
    def decided_by(self) -> str:
        """What decides: flow, affinity, policy, reject (no backend in the pool) or
        undetermined (the policy needs more of the client: see `note`)."""
    @property
    def note(self) -> str | None: ...
    @property
    def short_circuited_from(self) -> str | None:
        """The service the probe addressed, when its short-circuit (a client inside the
        cluster, externalTrafficPolicy Local) sent it to `service`."""

def explain(
    engine: Engine,
    *,
    service: str | None = None,
    frontend: tuple[str, int, str] | None = None,
    client: str | None = None,
    client_port: int | None = None,
    now: float | None = None,
    from_cluster: bool = False,
) -> Explanation:
    """A dry run of a new connection to a service (by engine service `name` or by
    `frontend` (ip, port, protocol)) from `client`: changes nothing in the engine (no
    round-robin ticket, no entropy drawn, no flow or affinity entry made or refreshed).
    `from_cluster`: the client is a pod or the node (the short-circuit applies).
    Raises KeyError for an unknown service or frontend, ValueError for a bad address."""
