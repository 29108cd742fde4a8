"""The `pykp` command: a thin Typer layer over plain functions.

Commands import the Rust extension only when they run, so `pykp --help` and
`pykp validate` work without it.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import random
import re
import signal
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Annotated

import typer

import pykp
from pykp.model import (
    DEFAULT_POLICY,
    LB_DEFAULT_POLICY,
    POLICIES,
    Catalog,
    Problem,
    family_warnings,
)
from pykp.sources.services_file import ServicesFileError, load_bundled_example, load_services_file

# rich is imported where something is printed: `pykp run` prints nothing with it, and
# importing it cost 25 ms of the agent's start.
if TYPE_CHECKING:
    from rich.console import Console

    from pykp.agent.agent import Agent, AgentConfig

app = typer.Typer(
    name="pykp",
    no_args_is_help=True,
    add_completion=False,
    # Click's plain help: it wraps at 80 columns without cutting flag names (rich's panels
    # squeeze `pykp run`'s 25 flags into a narrow column), and `pykp run --help | grep` works.
    rich_markup_mode=None,
    pretty_exceptions_enable=False,
)

_EXTENSION = "pykp._fastpath"
_NOT_BUILT = (
    f"{_EXTENSION} (the Rust extension) is not built: run `maturin develop` or `pip install -e .`"
)


def _console() -> Console:
    from rich.console import Console

    console = Console()
    if not console.is_terminal:
        # Piped or captured output has no width to fit: do not cut tables at rich's default 80.
        console.width = 200
    return console


def _print_version(value: bool) -> None:
    if value:
        typer.echo(f"pykp {pykp.__version__}")
        raise typer.Exit()


@app.callback()
def main(
    version: Annotated[
        bool,
        typer.Option(
            "--version",
            help="Print the version and exit.",
            callback=_print_version,
            is_eager=True,
        ),
    ] = False,
) -> None:
    """pykp: a Kubernetes node service proxy (Rust fast path, Python control plane)."""


# --- validate -----------------------------------------------------------------------------


def _plural(count: int, noun: str) -> str:
    return f"{count} {noun}" if count == 1 else f"{count} {noun}s"


def services_summary(services: Catalog, problems: list[Problem]) -> str:
    """One line: what loaded, and how many problems were skipped."""
    summary = ", ".join(
        (
            _plural(len(services.services), "service"),
            _plural(services.port_count, "port"),
            _plural(services.endpoint_count, "endpoint"),
        )
    )
    if problems:
        summary += f"; {_plural(len(problems), 'problem')} (invalid entries skipped)"
    return summary


@app.command()
def validate(
    file: Annotated[
        Path,
        typer.Argument(help="The services file (YAML).", exists=True, dir_okay=False),
    ],
) -> None:
    """Check a services file: print each problem with its location, then a summary.

    Exits with 1 when there is any problem (invalid entries), 0 otherwise; warnings (valid
    but likely wrong, e.g. an IPv6 ClusterIP with only IPv4 endpoints) do not fail it.
    """
    try:
        services, problems = load_services_file(file)
    except ServicesFileError as error:
        typer.echo(str(error), err=True)
        raise typer.Exit(1) from None
    for problem in problems:
        typer.echo(str(problem))
    warnings = family_warnings(services)
    for warning in warnings:
        typer.echo(f"warning: {warning}")
    summary = services_summary(services, problems)
    if warnings:
        summary += f"; {_plural(len(warnings), 'warning')}"
    typer.echo(summary)
    if problems:
        raise typer.Exit(1)


# --- simulate -----------------------------------------------------------------------------


def _check_policy(value: str | None) -> str | None:
    if value is not None and value not in POLICIES:
        raise typer.BadParameter(f"{value!r} is not one of {', '.join(POLICIES)}")
    return value


def _check_schedule(value: str) -> str:
    from pykp.labs.simulate_nodes import SCHEDULES  # the labs: imported by their commands

    if value not in SCHEDULES:
        raise typer.BadParameter(f"{value!r} is not one of {', '.join(SCHEDULES)}")
    return value


def _check_nodes(value: int | None) -> int | None:
    from pykp.labs.simulate_nodes import MAX_NODES

    if value is not None and not 1 <= value <= MAX_NODES:
        raise typer.BadParameter(f"{value} is not in the range 1<=x<={MAX_NODES}.")
    return value


def _load_services(path: Path | None, default_policy: str = DEFAULT_POLICY) -> Catalog:
    """The services file at `path` (the bundled example if None); problems go to stderr.
    `default_policy`: of services when neither they nor the file's `defaults` name one."""
    try:
        services, problems = (
            load_bundled_example()
            if path is None
            else load_services_file(path, default_policy=default_policy)
        )
    except ServicesFileError as error:
        typer.echo(str(error), err=True)
        raise typer.Exit(1) from None
    for problem in problems:
        typer.echo(f"warning: {problem} (skipped)", err=True)
    for warning in family_warnings(services):
        typer.echo(f"warning: {warning}", err=True)
    return services


@app.command()
def simulate(
    services: Annotated[
        Path | None,
        typer.Option(
            "--services",
            "-f",
            help="The services file (default: the bundled example).",
            exists=True,
            dir_okay=False,
        ),
    ] = None,
    connections: Annotated[
        int | None,
        typer.Option(
            "--connections",
            "-n",
            help="New connections per service port (default 1000; with --nodes 10000, "
            "enough for random and Maglev to settle).",
            min=1,
        ),
    ] = None,
    seed: Annotated[
        int | None,
        typer.Option(help="Seed for the clients and the engine (default: random, printed).", min=0),
    ] = None,
    policy: Annotated[
        str | None,
        typer.Option(
            help=f"Override every service's policy: {', '.join(POLICIES)}.",
            callback=_check_policy,
        ),
    ] = None,
    nodes: Annotated[
        int | None,
        typer.Option(
            help="Simulate this many nodes (node-1 ... node-N), each with its own engine and "
            "policy state; compares random, round-robin and Maglev.",
            callback=_check_nodes,
        ),
    ] = None,
    schedule: Annotated[
        str,
        typer.Option(
            help="With --nodes: which node each connection starts on: round-robin (every "
            "node in turn), alternate (the first two nodes in turn) or random.",
            callback=_check_schedule,
        ),
    ] = "round-robin",
    steps: Annotated[
        int, typer.Option(help="With --nodes: connections shown one by one.", min=0)
    ] = 8,
    plot_file: Annotated[
        Path | None,
        typer.Option(
            "--plot",
            help="With --nodes: write a PNG of share versus connections per policy "
            "(needs matplotlib).",
            dir_okay=False,
        ),
    ] = None,
) -> None:
    """Show how the engine spreads synthetic connections over backends (no cluster needed)."""
    if nodes is None:
        given = [
            flag
            for flag, value, default in (
                ("--schedule", schedule, "round-robin"),
                ("--steps", steps, 8),
                ("--plot", plot_file, None),
            )
            if value != default
        ]
        if given:
            raise typer.BadParameter(f"{', '.join(given)} needs --nodes")
    from pykp.labs.simulate import render_simulation, simulate_connections
    from pykp.labs.simulate_nodes import render_nodes_simulation, simulate_nodes
    from pykp.labs.simulate_plot import plot_shares

    services_file = _load_services(services)
    if seed is None:
        seed = random.SystemRandom().randrange(2**32)
    try:
        if nodes is None:
            result = simulate_connections(
                services_file, connections=connections or 1000, seed=seed, policy=policy
            )
        else:
            nodes_result = simulate_nodes(
                services_file,
                nodes=nodes,
                schedule=schedule,
                connections=connections or 10000,
                seed=seed,
                policy=policy,
            )
    except ModuleNotFoundError as error:
        if error.name != _EXTENSION:
            raise
        typer.echo(_NOT_BUILT, err=True)
        raise typer.Exit(1) from None
    if nodes is None:
        render_simulation(result, _console())
        return
    render_nodes_simulation(nodes_result, _console(), steps=steps)
    if plot_file is not None:
        skipped = plot_shares(nodes_result, plot_file)
        if skipped:
            typer.echo(f"plot skipped: {skipped}", err=True)
            raise typer.Exit(1)
        typer.echo(f"plot written to {plot_file}")


# --- run ----------------------------------------------------------------------------------

_GO_DURATION = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|ms|s|m|h)")
_UNIT_SECONDS = {
    "ns": 1e-9,
    "us": 1e-6,
    "µs": 1e-6,
    "ms": 1e-3,
    "s": 1.0,
    "m": 60.0,
    "h": 3600.0,
}


def parse_duration(text: str) -> float:
    """Seconds, as a number ("0.5") or as Go writes kube-proxy's durations ("1s", "1m30s")."""
    try:
        seconds = float(text)
    except ValueError:
        parts = list(_GO_DURATION.finditer(text))
        if not parts or "".join(part.group(0) for part in parts) != text:
            raise typer.BadParameter(
                f"{text!r} is not a duration (e.g. 30s, 500ms, 1m30s, or seconds: 0.5)"
            ) from None
        seconds = sum(float(part.group(1)) * _UNIT_SECONDS[part.group(2)] for part in parts)
    if not seconds >= 0 or seconds == float("inf"):
        raise typer.BadParameter(f"{text!r} is not a duration >= 0")
    return seconds


def parse_cidrs(text: str | None) -> tuple[str, ...]:
    """Comma-separated CIDRs (dual-stack: one per family, or more), normalised."""
    if not text:
        return ()
    cidrs = []
    for item in text.split(","):
        try:
            cidrs.append(str(ipaddress.ip_network(item.strip(), strict=False)))
        except ValueError:
            raise typer.BadParameter(
                f"{item.strip()!r} is not a CIDR (e.g. 10.244.0.0/16)"
            ) from None
    return tuple(dict.fromkeys(cidrs))


def parse_mask(text: str) -> int:
    """A hexadecimal 32-bit mask, with or without 0x."""
    try:
        value = int(text, 16)
    except ValueError:
        raise typer.BadParameter(f"{text!r} is not a hexadecimal mask (e.g. 0xffff0000)") from None
    if not 0 < value <= 0xFFFFFFFF:
        raise typer.BadParameter(f"{text!r} is not a non-zero 32-bit mask")
    return value


def _configure_logging(verbose: int) -> None:
    """-v: pykp's debug messages; -vv: every library's too (pyroute2's are a flood)."""
    logging.basicConfig(
        level=logging.DEBUG if verbose > 1 else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    logging.getLogger("pykp").setLevel(logging.DEBUG if verbose > 0 else logging.INFO)


def require(command: str, tools: tuple[str, ...] | None = None, extension: bool = True) -> None:
    """Exit with one line per unmet need (root, commands, the extension) before doing anything."""
    from pykp.cli.preflight import NODE_TOOLS, problems

    unmet = problems(command, NODE_TOOLS if tools is None else tools, extension=extension)
    for line in unmet:
        typer.echo(line, err=True)
    if unmet:
        raise typer.Exit(1)


def make_agent(config: AgentConfig) -> Agent:
    """The agent `pykp run` drives (tests replace this to run without root)."""
    from pykp.agent.agent import Agent

    agent = Agent(config)  # touches no kernel state: a bad source is reported first
    require("run")
    return agent


@contextmanager
def _stop_on_signals(stop: threading.Event) -> Iterator[None]:
    """SIGTERM and SIGINT set `stop` (the agent then cleans up) instead of killing us."""

    def handler(signum: int, frame: FrameType | None) -> None:
        logging.getLogger("pykp").info("%s received, stopping", signal.Signals(signum).name)
        stop.set()

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def _cleanup_rules() -> list[str]:
    from pykp.netfilter.rules import cleanup_all

    require("cleanup", extension=False)
    return cleanup_all()


def _kubeproxy_settings(ctx: typer.Context, path: Path) -> dict[str, str]:
    """The settings a KubeProxyConfiguration gives for parameters not set on the command line."""
    from pykp.agent.kubeproxy_config import KubeProxyConfigError, load_kubeproxy_config

    try:
        loaded = load_kubeproxy_config(path)
    except KubeProxyConfigError as error:
        raise typer.BadParameter(str(error), param_hint="'--config'") from None
    if loaded.ignored:
        typer.echo(
            f"{path}: pykp ignores these KubeProxyConfiguration fields: "
            + ", ".join(loaded.ignored),
            err=True,
        )

    def from_command_line(name: str) -> bool:
        source = ctx.get_parameter_source(name)
        return source is not None and source.name != "DEFAULT"

    return {name: value for name, value in loaded.settings.items() if not from_command_line(name)}


@app.command()
def run(
    ctx: typer.Context,
    services: Annotated[
        Path | None,
        typer.Option(
            "--services",
            "-f",
            help="The services file (YAML), watched for changes. Without it pykp watches the "
            "Kubernetes API (--kubeconfig, --master, or in-cluster credentials).",
            exists=True,
            dir_okay=False,
        ),
    ] = None,
    kubeconfig: Annotated[
        str | None,
        typer.Option(help="Path to a kubeconfig file (default: in-cluster, else ~/.kube/config)."),
    ] = None,
    master: Annotated[
        str | None,
        typer.Option(help="The Kubernetes API server's address (overrides the kubeconfig's)."),
    ] = None,
    context: Annotated[str | None, typer.Option(help="The kubeconfig context to use.")] = None,
    hostname_override: Annotated[
        str | None,
        typer.Option(help="The node's name (endpoints with this nodeName are local)."),
    ] = None,
    cluster_cidr: Annotated[
        str | None,
        typer.Option(
            help="The pods' CIDRs, comma-separated (dual-stack); traffic to ClusterIPs "
            "from outside them is masqueraded."
        ),
    ] = None,
    healthz_bind_address: Annotated[
        str, typer.Option(help="IP:port of /healthz and /livez; empty turns them off.")
    ] = "0.0.0.0:10256",
    metrics_bind_address: Annotated[
        str, typer.Option(help="IP:port of /metrics and /status; empty turns them off.")
    ] = "127.0.0.1:10249",
    nodeport_addresses: Annotated[
        str | None,
        typer.Option(
            help="CIDRs, comma-separated, of the node addresses NodePorts listen on "
            "(default: every non-loopback address)."
        ),
    ] = None,
    cleanup: Annotated[
        bool, typer.Option("--cleanup", help="Remove pykp's rules and exit.")
    ] = False,
    default_policy: Annotated[
        str,
        typer.Option(
            help=f"Policy of services that name none: {', '.join(POLICIES)}.",
            callback=_check_policy,
        ),
    ] = "random",
    min_sync_period: Annotated[
        str,
        typer.Option(help="Shortest time between syncs (changes in between coalesce)."),
    ] = "1s",
    sync_period: Annotated[
        str,
        typer.Option(help="Longest time between syncs (a full resync repairs the rules)."),
    ] = "30s",
    queue_num: Annotated[int, typer.Option(help="The first NFQUEUE queue.", min=0, max=65535)] = 0,
    queues: Annotated[
        int, typer.Option(help="NFQUEUE queues, one worker thread each.", min=1, max=65536)
    ] = 1,
    mark_mask: Annotated[
        str, typer.Option(help="Where backend ids go in the packet mark (hex).")
    ] = "0xffff0000",
    fail_open: Annotated[
        bool,
        typer.Option(
            "--fail-open/--no-fail-open",
            help="When the queue is full (the reader stalled or overloaded), new connections "
            "go to the kernel path (random choice from the last synced backends) instead of "
            "being dropped.",
        ),
    ] = True,
    queue_max_len: Annotated[
        int,
        typer.Option(
            help="Packets that may wait for pykp's verdict: what a stalled reader holds up.",
            min=1,
            max=1 << 20,
        ),
    ] = 32,
    kernel_random: Annotated[
        bool,
        typer.Option(
            "--kernel-random/--no-kernel-random",
            help="Decide random services (without session affinity) in the kernel, as "
            "kube-proxy's nftables mode does: no user-space hop. --no-kernel-random sends "
            "their first packets to pykp like the other policies.",
        ),
    ] = True,
    kernel_round_robin: Annotated[
        bool,
        typer.Option(
            "--kernel-round-robin/--no-kernel-round-robin",
            help="Rotate round-robin services (without session affinity, at most 128 "
            "backends) in the kernel: one numgen counter per service, no user-space hop, "
            "and the rotation goes on while the agent is away. It restarts at the first "
            "backend when the number of backends changes or the agent restarts. "
            "--no-kernel-round-robin sends their first packets to pykp's reader, which "
            "keeps its place across those changes.",
        ),
    ] = True,
    watch_rules: Annotated[
        bool,
        typer.Option(
            "--watch-rules/--no-watch-rules",
            help="Find someone else's changes to pykp's rules as they commit (nf_tables "
            "notifications) and repair them at once. --no-watch-rules leaves it to the "
            "periodic check (every half --sync-period).",
        ),
    ] = True,
    follow_conntrack: Annotated[
        bool,
        typer.Option(
            "--follow-conntrack/--no-follow-conntrack",
            help="Follow the kernel's conntrack events so pykp's flow table holds the "
            "kernel's live service flows: least-conn counts active connections (a closed "
            "connection frees its backend at once), and /metrics and `pykp flows` count "
            "exactly. Lost events are repaired by listing the table.",
        ),
    ] = True,
    flow_metrics_limit: Annotated[
        int,
        typer.Option(
            help="Series of pykp_backend_active_flows (service x backend) at most; the rest "
            'is summed per service as backend="other". 0 turns the series off.',
            min=0,
        ),
    ] = 1000,
    conntrack_capacity: Annotated[
        int, typer.Option(help="Flows pykp's own connection table holds.", min=1)
    ] = 262144,
    conntrack_max_per_core: Annotated[
        int,
        typer.Option(
            help="Kernel conntrack entries per CPU: nf_conntrack_max is raised to this times "
            "the node's CPUs (at least --conntrack-min), as kube-proxy does; 0 leaves it.",
            min=0,
        ),
    ] = 32768,
    conntrack_min: Annotated[
        int,
        typer.Option(help="The least nf_conntrack_max --conntrack-max-per-core sets.", min=0),
    ] = 131072,
    conntrack_tcp_timeout_established: Annotated[
        str,
        typer.Option(help="nf_conntrack_tcp_timeout_established, set at start (0 leaves it)."),
    ] = "24h0m0s",
    conntrack_tcp_timeout_close_wait: Annotated[
        str,
        typer.Option(help="nf_conntrack_tcp_timeout_close_wait, set at start (0 leaves it)."),
    ] = "1h0m0s",
    conntrack_tcp_be_liberal: Annotated[
        bool,
        typer.Option(
            "--conntrack-tcp-be-liberal/--no-conntrack-tcp-be-liberal",
            help="Set nf_conntrack_tcp_be_liberal to 1 at start (out-of-window TCP packets "
            "are not marked INVALID); the default leaves it.",
        ),
    ] = False,
    conntrack_udp_timeout: Annotated[
        str,
        typer.Option(help="nf_conntrack_udp_timeout, set at start (0, the default, leaves it)."),
    ] = "0s",
    conntrack_udp_timeout_stream: Annotated[
        str,
        typer.Option(
            help="nf_conntrack_udp_timeout_stream, set at start (0, the default, leaves it)."
        ),
    ] = "0s",
    maglev_table_size: Annotated[
        int,
        typer.Option(
            help="Maglev lookup table size M (a prime, well above 100 x a service's backends):"
            " M bytes per Maglev service, built at its first new connection on this node.",
            min=3,
        ),
    ] = 65537,
    maglev_seed: Annotated[
        int, typer.Option(help="Maglev seed: nodes with the same seed agree.", min=0)
    ] = 0,
    state_dir: Annotated[
        Path, typer.Option(help="Where the status snapshot (status.json) is written.")
    ] = Path("/run/pykp"),
    allow_node_address_service_ips: Annotated[
        bool,
        typer.Option(
            "--allow-node-address-service-ips",
            help="Serve services whose ClusterIP, externalIP or LB IP is one of the node's "
            "own addresses (refused by default: they capture the node's traffic to that "
            "port, CVE-2020-8554).",
        ),
    ] = False,
    cleanup_on_exit: Annotated[
        bool,
        typer.Option(
            "--cleanup-on-exit/--no-cleanup-on-exit",
            help="Remove the rules when stopping. The default leaves them, like kube-proxy: "
            "established flows keep their NAT across a restart (removing pykp's nat chains "
            "ends them) and the kernel path serves new connections until the next agent. "
            "`pykp cleanup` removes them.",
        ),
    ] = False,
    verbose: Annotated[
        int,
        typer.Option(
            "--verbose", "-v", count=True, help="-v: pykp's debug logs; -vv: libraries' too."
        ),
    ] = 0,
    config_file: Annotated[
        Path | None,
        typer.Option(
            "--config",
            help="A kube-proxy KubeProxyConfiguration file: the fields pykp implements are "
            "used (flags given here win); the others are listed as ignored.",
            exists=True,
            dir_okay=False,
        ),
    ] = None,
) -> None:
    """Run the node proxy: program the services (a file or the Kubernetes API) until
    SIGTERM/SIGINT.

    The rules stay after it stops (like kube-proxy) unless --cleanup-on-exit. Needs root
    (CAP_NET_ADMIN), nft, iptables and conntrack.
    """
    from pykp.agent.agent import AgentConfig, ConfigError
    from pykp.netfilter.conntrack_sysctls import ConntrackSettings

    if config_file is not None:
        from_file = _kubeproxy_settings(ctx, config_file)
        hostname_override = from_file.get("hostname_override", hostname_override)
        cluster_cidr = from_file.get("cluster_cidr", cluster_cidr)
        healthz_bind_address = from_file.get("healthz_bind_address", healthz_bind_address)
        metrics_bind_address = from_file.get("metrics_bind_address", metrics_bind_address)
        nodeport_addresses = from_file.get("nodeport_addresses", nodeport_addresses)
        kubeconfig = from_file.get("kubeconfig", kubeconfig)
        sync_period = from_file.get("sync_period", sync_period)
        min_sync_period = from_file.get("min_sync_period", min_sync_period)
        conntrack_max_per_core = int(
            from_file.get("conntrack_max_per_core", conntrack_max_per_core)
        )
        conntrack_min = int(from_file.get("conntrack_min", conntrack_min))
        conntrack_tcp_timeout_established = from_file.get(
            "conntrack_tcp_timeout_established", conntrack_tcp_timeout_established
        )
        conntrack_tcp_timeout_close_wait = from_file.get(
            "conntrack_tcp_timeout_close_wait", conntrack_tcp_timeout_close_wait
        )
        if "conntrack_tcp_be_liberal" in from_file:
            conntrack_tcp_be_liberal = from_file["conntrack_tcp_be_liberal"] == "true"
        conntrack_udp_timeout = from_file.get("conntrack_udp_timeout", conntrack_udp_timeout)
        conntrack_udp_timeout_stream = from_file.get(
            "conntrack_udp_timeout_stream", conntrack_udp_timeout_stream
        )

    config = AgentConfig(
        services=services,
        kubeconfig=kubeconfig,
        master=master,
        kube_context=context,
        hostname_override=hostname_override,
        cluster_cidrs=parse_cidrs(cluster_cidr),
        healthz_bind_address=healthz_bind_address,
        metrics_bind_address=metrics_bind_address,
        nodeport_addresses=parse_cidrs(nodeport_addresses),
        default_policy=default_policy,
        min_sync_period=parse_duration(min_sync_period),
        sync_period=parse_duration(sync_period),
        queue_num=queue_num,
        queues=queues,
        mark_mask=parse_mask(mark_mask),
        fail_open=fail_open,
        queue_max_len=queue_max_len,
        kernel_random=kernel_random,
        kernel_round_robin=kernel_round_robin,
        watch_rules=watch_rules,
        follow_conntrack=follow_conntrack,
        flow_metrics_limit=flow_metrics_limit,
        conntrack_capacity=conntrack_capacity,
        conntrack=ConntrackSettings(
            max_per_core=conntrack_max_per_core,
            min=conntrack_min,
            tcp_established_timeout=parse_duration(conntrack_tcp_timeout_established),
            tcp_close_wait_timeout=parse_duration(conntrack_tcp_timeout_close_wait),
            tcp_be_liberal=conntrack_tcp_be_liberal,
            udp_timeout=parse_duration(conntrack_udp_timeout),
            udp_stream_timeout=parse_duration(conntrack_udp_timeout_stream),
        ),
        maglev_table_size=maglev_table_size,
        maglev_seed=maglev_seed,
        state_dir=state_dir,
        cleanup_on_exit=cleanup_on_exit,
        allow_node_address_service_ips=allow_node_address_service_ips,
    )
    try:
        config.validate()
    except ConfigError as error:
        raise typer.BadParameter(error.message, param_hint=f"'{error.flag}'") from None
    _configure_logging(verbose)
    if cleanup:
        _do_cleanup()
        return
    from pykp.agent.heap import one_malloc_arena
    from pykp.sources.kube.connection import KubeConfigError

    one_malloc_arena()  # before the agent's threads: each would take an arena of its own
    try:
        agent = make_agent(config)
    except ModuleNotFoundError as error:
        if error.name != _EXTENSION:
            raise
        typer.echo(_NOT_BUILT, err=True)
        raise typer.Exit(1) from None
    except KubeConfigError as error:
        typer.echo(f"pykp run: {error}", err=True)
        raise typer.Exit(1) from None
    from pykp.agent.node_lock import NodeLock, NodeLockHeld

    lock = NodeLock()
    try:
        # Before anything touches the kernel: a second agent leaves the first one's state alone.
        lock.acquire()
    except NodeLockHeld as error:
        typer.echo(f"pykp run: {error}", err=True)
        raise typer.Exit(1) from None
    stop = threading.Event()
    with lock, _stop_on_signals(stop):
        try:
            agent.serve(stop)
        except Exception as error:  # reported, not dumped
            logging.getLogger("pykp").debug("start failed", exc_info=True)
            typer.echo(f"pykp run: cannot start: {error}", err=True)
            raise typer.Exit(1) from None


# --- cleanup ------------------------------------------------------------------------------


def _do_cleanup() -> None:
    from pykp.netfilter.rules import RulesError

    try:
        removed = _cleanup_rules()
    except RulesError as error:
        typer.echo(f"pykp cleanup: {error}", err=True)
        raise typer.Exit(1) from None
    for item in removed:
        typer.echo(f"removed {item}")
    if not removed:
        typer.echo("nothing to remove")


@app.command()
def demo(
    connections: Annotated[
        int,
        typer.Option(min=1, max=10_000, help="New connections to each demo service."),
    ] = 60,
    cluster: Annotated[
        bool,
        typer.Option(
            "--cluster",
            help="A 3-node cluster instead: one pykp agent per node, fed by a stand-in "
            "Kubernetes API server; backends on other nodes than the first.",
        ),
    ] = False,
) -> None:
    """The node proxy end to end on a namespace lab: one service per policy, real connections.

    Builds a lab (node, 3 backend pods, a client pod), runs `pykp run` on it, connects to
    every service and prints which backend answered; removes everything afterwards. Needs
    root and the Rust extension.
    """
    from pykp.cli.preflight import LAB_TOOLS
    from pykp.labs.cluster_demo import render_cluster_demo, run_cluster_demo
    from pykp.labs.demo import render_demo, run_demo
    from pykp.labs.lab_agent import AgentStartError

    require("demo", LAB_TOOLS)
    console = _console()
    try:
        if cluster:
            render_cluster_demo(run_cluster_demo(connections), console)
            return
        result = run_demo(connections, console)
    except ModuleNotFoundError as error:
        if error.name != _EXTENSION:
            raise
        typer.echo(_NOT_BUILT, err=True)
        raise typer.Exit(1) from None
    except PermissionError:
        typer.echo("pykp demo needs root (network namespaces, netfilter)", err=True)
        raise typer.Exit(1) from None
    except AgentStartError as error:
        typer.echo(f"pykp demo: {error}", err=True)
        raise typer.Exit(1) from None
    render_demo(result, console)


@app.command(name="cleanup")
def cleanup_command() -> None:
    """Remove every rule pykp installed (after a crash, or before kube-proxy takes over).

    Rules of other programs stay. Connections pykp set up end too: the kernel drops their
    NAT with pykp's nat chains.
    """
    _do_cleanup()


# --- status -------------------------------------------------------------------------------


@app.command()
def status(
    address: Annotated[
        str, typer.Option(help="The agent's --metrics-bind-address (serves /status).")
    ] = "127.0.0.1:10249",
    file: Annotated[
        Path | None,
        typer.Option(
            "--file",
            help="Read a status snapshot file instead (<state dir>/status.json).",
            dir_okay=False,
        ),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the raw JSON snapshot.")] = False,
    flows: Annotated[int, typer.Option(help="Flows to list.", min=0)] = 20,
) -> None:
    """Show a running agent's services, backends, counters and live flows."""
    from pykp.observe.status import StatusError, fetch_status, read_status_file, render_status

    try:
        snapshot = read_status_file(file) if file is not None else fetch_status(address)
    except StatusError as error:
        typer.echo(f"pykp status: {error}", err=True)
        raise typer.Exit(1) from None
    if as_json:
        typer.echo(json.dumps(snapshot, indent=1, sort_keys=True))
        return
    render_status(snapshot, _console(), flows=flows)


# --- flows --------------------------------------------------------------------------------


@app.command()
def flows(
    service: Annotated[
        str | None,
        typer.Option(help="Only this service: namespace/name, or namespace/name:port-name."),
    ] = None,
    backend: Annotated[
        str | None, typer.Option(help="Only flows to this backend: IP or IP:port.")
    ] = None,
    address: Annotated[
        str, typer.Option(help="The agent's --metrics-bind-address (serves /flows).")
    ] = "127.0.0.1:10249",
    limit: Annotated[int, typer.Option(help="Flows to list (all are counted).", min=0)] = 50,
    as_json: Annotated[bool, typer.Option("--json", help="Print the raw JSON answer.")] = False,
) -> None:
    """Show a running agent's live service flows, from the kernel's conntrack table: per
    backend counts, then each flow with its backend, state and age."""
    from urllib.parse import urlencode

    from pykp.observe.flows import render_flows
    from pykp.observe.status import StatusError, fetch_json

    query = {"limit": str(limit)}
    if service:
        query["service"] = service
    if backend:
        query["backend"] = backend
    try:
        report = fetch_json(address, "/flows?" + urlencode(query))
    except StatusError as error:
        typer.echo(f"pykp flows: {error}", err=True)
        raise typer.Exit(1) from None
    if as_json:
        typer.echo(json.dumps(report, indent=1, sort_keys=True))
        return
    render_flows(report, _console())


# --- explain ------------------------------------------------------------------------------


@app.command()
def explain(
    service: Annotated[
        str,
        typer.Argument(
            help="The service: namespace/name (every port), namespace/name:port, or "
            "IP:port[/protocol] (the service at that frontend).",
            metavar="SERVICE",
        ),
    ],
    client: Annotated[
        str | None,
        typer.Option(
            help="The client: IP or IP:port (Maglev's 5-tuple needs the port). Default: a "
            "new client, with no affinity or flow yet.",
            metavar="IP[:PORT]",
        ),
    ] = None,
    services: Annotated[
        Path | None,
        typer.Option(
            "--services",
            "-f",
            help="Explain offline, from this services file in a fresh engine, instead of "
            "asking the running agent.",
            exists=True,
            dir_okay=False,
        ),
    ] = None,
    address: Annotated[
        str, typer.Option(help="The agent's --metrics-bind-address (serves /explain).")
    ] = "127.0.0.1:10249",
    node: Annotated[
        str | None,
        typer.Option(
            help="Offline: the node's name: its endpoints (by nodeName) are local, for "
            "Local traffic policies and node hints."
        ),
    ] = None,
    node_address: Annotated[
        list[str] | None,
        typer.Option(
            help="Offline: a node address, where nodePorts listen (repeatable).", metavar="IP"
        ),
    ] = None,
    cluster_cidr: Annotated[
        str,
        typer.Option(
            help="Offline: as `pykp run --cluster-cidr`: a client inside one (or at a node "
            "address) takes an externalTrafficPolicy Local service's short-circuit.",
            metavar="CIDR[,CIDR]",
        ),
    ] = "",
    maglev_table_size: Annotated[
        int, typer.Option(help="Offline: as `pykp run --maglev-table-size`.")
    ] = 65537,
    maglev_seed: Annotated[int, typer.Option(help="Offline: as `pykp run --maglev-seed`.")] = 0,
    kernel_random: Annotated[
        bool,
        typer.Option(
            "--kernel-random/--no-kernel-random",
            help="Offline: as `pykp run --no-kernel-random` (pykp's reader draws).",
        ),
    ] = True,
    kernel_round_robin: Annotated[
        bool,
        typer.Option(
            "--kernel-round-robin/--no-kernel-round-robin",
            help="Offline: as `pykp run --no-kernel-round-robin` (pykp's reader rotates, "
            "and its next backend is named).",
        ),
    ] = True,
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as JSON.")] = False,
) -> None:
    """Show which backend a new connection to a service gets on this node, and why: every
    endpoint's eligibility, the policy's live state (round-robin position, or the kernel's
    rotation where the kernel rotates; Maglev slot, least-conn counts, affinity). Asks the
    running agent, or --services FILE offline. Changes nothing: the answer is what the
    next connection gets."""
    from pykp.observe.explain import (
        ExplainError,
        NodeView,
        explain_services_file,
        fetch_explain,
        render_explain,
    )

    try:
        if services is None:
            report = fetch_explain(address, service, client)
        else:
            catalog = _load_services(services)
            view = NodeView(
                node, tuple(node_address or ()), cluster_cidrs=tuple(parse_cidrs(cluster_cidr))
            )
            report = explain_services_file(
                catalog,
                service,
                client,
                node=view,
                maglev_table_size=maglev_table_size,
                maglev_seed=maglev_seed,
                kernel_random=kernel_random,
                kernel_round_robin=kernel_round_robin,
            )
    except ExplainError as error:
        typer.echo(f"pykp explain: {error}", err=True)
        raise typer.Exit(1) from None
    except ModuleNotFoundError as error:
        if error.name != _EXTENSION:
            raise
        typer.echo(_NOT_BUILT, err=True)
        raise typer.Exit(1) from None
    if as_json:
        typer.echo(json.dumps(report, indent=1, sort_keys=True))
        return
    render_explain(report, _console())


# --- bench --------------------------------------------------------------------------------


def _bench_lb_tier(
    rounds: int | None,
    contenders: str | None,
    duration: float | None,
    concurrency: int | None,
    threads: int | None,
    json_file: Path | None,
) -> None:
    """`pykp bench --lb-tier`."""
    import tempfile

    from pykp.bench.lb_tier import LB_CONTENDERS, LbBenchSettings, format_summary, run_lb_bench

    settings = LbBenchSettings()
    if contenders is not None:
        names = [c.strip() for c in contenders.split(",") if c.strip()]
        unknown = [n for n in names if n not in LB_CONTENDERS]
        if unknown or not names:
            raise typer.BadParameter(
                f"load-balancer tier contenders are {', '.join(LB_CONTENDERS)}",
                param_hint="'--contenders'",
            )
        settings.contenders = names
    for name, value in (
        ("rounds", rounds),
        ("duration", duration),
        ("concurrency", concurrency),
        ("threads", threads),
    ):
        if value is not None:
            setattr(settings, name, value)
    typer.echo(f"pykp bench --lb-tier: {vars(settings)}")
    with tempfile.TemporaryDirectory(prefix="pykp-bench-lb-") as workdir:
        result = run_lb_bench(settings, workdir=Path(workdir), log=typer.echo)
    typer.echo(format_summary(result["summary"]))
    if json_file is not None:
        json_file.write_text(json.dumps(result, indent=1, sort_keys=True) + "\n")
        typer.echo(f"raw samples and summary written to {json_file}")


def _int_list(text: str, option: str) -> list[int]:
    try:
        values = [int(item.replace("_", "")) for item in text.split(",") if item.strip()]
    except ValueError:
        raise typer.BadParameter(f"{text!r} is not a comma-separated list of numbers") from None
    if not values or any(v < 1 for v in values):
        raise typer.BadParameter(f"{option} needs numbers >= 1")
    return values


@app.command()
def bench(
    quick: Annotated[
        bool,
        typer.Option(
            "--quick",
            help="Short preset (under 2 minutes): 1 service, 2 rounds, short runs, every contender.",
        ),
    ] = False,
    services: Annotated[
        str | None,
        typer.Option(
            "--services", help="Numbers of services to measure at, comma-separated (1,1000,10000)."
        ),
    ] = None,
    rounds: Annotated[
        int | None, typer.Option(help="Rounds (every contender once per round).", min=1)
    ] = None,
    contenders: Annotated[
        str | None,
        typer.Option(
            help="Comma-separated: direct, loopback, iptables, iptables-legacy, nftables, "
            "pykp/random, pykp/random-nfqueue, pykp/round-robin, pykp/maglev, pykp/least-conn "
            "(fed a services file; pykp/<policy>:<switch>... adds `pykp run --<switch>`, e.g. "
            "pykp/round-robin:no-kernel-round-robin, round-robin through pykp's reader "
            "instead of the kernel), pykp/kube-random (or pykp/kube-<policy>: fed through the "
            "Kubernetes source by a stand-in API server; measures agent start to all services "
            "programmed, its RSS, EndpointSlice change and new Service to first connection, "
            "against iptables' and nftables' file-based figures) "
            "(default: all but iptables-legacy, pykp/least-conn and other pykp/kube-<policy>)."
        ),
    ] = None,
    duration: Annotated[
        float | None, typer.Option(help="Seconds of each new-connections run.", min=0.2, max=120)
    ] = None,
    concurrency: Annotated[
        int | None, typer.Option(help="Connections in flight (closed loop).", min=1, max=4096)
    ] = None,
    threads: Annotated[
        int | None, typer.Option(help="Load generator threads.", min=1, max=64)
    ] = None,
    rate: Annotated[
        float | None,
        typer.Option(help="Connections/s of the fixed-rate run (latency, CPU).", min=1, max=100000),
    ] = None,
    faults: Annotated[
        str | None,
        typer.Option(
            help="Fault runs at the first scale, comma-separated: kill (agent SIGKILLed, "
            "restarted 2 s later), stop (SIGSTOP 5 s), flush (`nft flush ruleset` in the node; "
            "pykp contenders only), or none (default: kill,stop; --quick: none)."
        ),
    ] = None,
    kube_changes: Annotated[
        int | None,
        typer.Option(
            help="EndpointSlice changes per round of a pykp/kube-* contender, for its p50 and "
            "p99 (each more than --min-sync-period, 1 s, after the previous one was answered; "
            "default 20, --quick: 4).",
            min=1,
            max=1000,
        ),
    ] = None,
    json_file: Annotated[
        Path | None, typer.Option("--json", help="Write the raw samples and summary here.")
    ] = None,
    plot_file: Annotated[
        Path | None, typer.Option("--plot", help="Write a PNG chart here (needs matplotlib).")
    ] = None,
    markdown_file: Annotated[
        Path | None, typer.Option("--markdown", help="Write the tables as markdown here.")
    ] = None,
    lb_tier: Annotated[
        bool,
        typer.Option(
            "--lb-tier",
            help="Benchmark the load-balancer tier instead (client, multipath router, two "
            "load-balancer nodes, backends): kernel L2 DSR and kernel full NAT against no "
            "load balancer (--contenders direct,kernel-dsr,kernel-nat; --rounds, "
            "--duration, --concurrency, --threads, --json apply).",
        ),
    ] = False,
) -> None:
    """Benchmark pykp against kube-proxy's iptables and nftables rules and no proxy at all.

    Builds one lab node per contender (network namespaces only; needs root, iptables,
    nftables, conntrack and iperf3; the load generator comes with pykp), then measures every contender round after round: new connections per second,
    connect latency, CPU per connection, throughput, programming and endpoint-change times.
    pykp/kube-random runs the agent against a stand-in Kubernetes API server instead: agent
    start to all services programmed, its RSS, EndpointSlice change to first connection
    (p50, p99) and new Service to first connection, with ratios to iptables' and nftables'
    file-based programming and propagation times from the same run.
    """
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from pykp.bench import report
    from pykp.bench.runner import BenchSettings, run_bench
    from pykp.cli.preflight import LAB_TOOLS

    require("bench", (*LAB_TOOLS, "iperf3"))
    if lb_tier:
        _bench_lb_tier(rounds, contenders, duration, concurrency, threads, json_file)
        return

    settings = BenchSettings()
    if quick:
        settings = BenchSettings(
            scales=[1],
            rounds=2,
            duration=1.0,
            rate=1000.0,
            rate_duration=1.0,
            throughput_seconds=1.0,
            streams=[1, 2],
            probe_timeout=60.0,
            faults=[],
            kube_changes=4,
            preset="quick",
        )
    else:
        settings.preset = "full"
    if services is not None:
        from pykp.bench.contenders import MAX_SERVICES

        settings.scales = _int_list(services, "--services")
        if max(settings.scales) > MAX_SERVICES:
            raise typer.BadParameter(f"at most {MAX_SERVICES} services", param_hint="'--services'")
    if faults is not None:
        settings.faults = [
            f.strip() for f in faults.split(",") if f.strip() and f.strip() != "none"
        ]
        unknown = set(settings.faults) - {"kill", "stop", "flush"}
        if unknown:
            raise typer.BadParameter(
                f"{', '.join(sorted(unknown))}: not kill, stop, flush or none",
                param_hint="'--faults'",
            )
    if rounds is not None:
        settings.rounds = rounds
    if contenders is not None:
        settings.contenders = [c.strip() for c in contenders.split(",") if c.strip()]
        from pykp.bench.contenders import make_contender

        for name in settings.contenders:
            try:
                make_contender(name, "")
            except ValueError as error:
                raise typer.BadParameter(str(error), param_hint="'--contenders'") from None
    for name, value in (
        ("duration", duration),
        ("concurrency", concurrency),
        ("threads", threads),
        ("rate", rate),
        ("kube_changes", kube_changes),
    ):
        if value is not None:
            setattr(settings, name, value)
    if settings.preset != "quick" and any(
        v is not None
        for v in (rounds, contenders, duration, concurrency, threads, rate, faults, kube_changes)
    ):
        settings.preset = "custom"

    console = _console()
    console.print(f"[bold]pykp bench[/bold] ({settings.preset}): settings")
    for key, value in vars(settings).items():
        console.print(f"  {key}: {value}")
    progress = Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
        transient=True,
    )
    task = progress.add_task("starting", total=None)

    def on_progress(message: str, info: dict | None) -> None:  # type: ignore[type-arg]
        progress.update(task, description=message)
        if info is None:
            return
        progress.advance(task)
        sample = info["sample"]
        if "conns_per_s" in sample:
            text = (
                f"{sample['conns_per_s']:>9,.0f} conn/s  {sample['ok']}/{sample['attempted']} served"
                f"  connect p99 {sample['connect_us']['p99'] / 1000:.3f} ms"
            )
        elif "p50" in sample:  # repeated changes (kube_change)
            text = (
                f"p50 {sample['p50'] or float('nan'):.4f} s  p99 {sample['p99'] or float('nan'):.4f} s"
                f"  {sample['changes'] - sample['missed']}/{sample['changes']} seen"
            )
        elif "bits_per_second" in sample:
            text = f"{sample['bits_per_second'] / 1e9:>9.2f} Gbit/s"
        elif "seconds" in sample and sample["seconds"] is not None:
            text = f"{sample['seconds']:>9.3f} s"
            if sample.get("rss_kib"):
                text += f"  RSS {sample['rss_kib'] / 1024:.0f} MiB"
        else:
            text = "not seen before the timeout"
        progress.console.print(f"  {message:<58} {text}")

    try:
        with progress:
            doc = run_bench(
                settings,
                on_progress,
                json_path=json_file,
                set_total=lambda total: progress.update(task, total=total),
            )
    except (PermissionError, FileNotFoundError) as error:
        typer.echo(f"pykp bench: {error}", err=True)
        raise typer.Exit(1) from None
    except KeyboardInterrupt:
        typer.echo("pykp bench: interrupted (the labs were removed)", err=True)
        raise typer.Exit(130) from None
    summary = report.summarize(doc)
    doc["summary"] = summary
    report.render(doc, summary, console)
    console.print("machine: " + ", ".join(f"{k} {v}" for k, v in doc["machine"].items()))
    if json_file is not None:
        json_file.write_text(json.dumps(doc, indent=1, default=str))
        console.print(f"raw samples and summary written to {json_file}")
    if markdown_file is not None:
        markdown_file.write_text(report.markdown(doc, summary))
        console.print(f"markdown tables written to {markdown_file}")
    if plot_file is not None:
        skipped = report.plot(doc, summary, plot_file)
        console.print(f"plot skipped: {skipped}" if skipped else f"plot written to {plot_file}")
    if report.served_failures(doc):
        raise typer.Exit(1)


# --- lb -----------------------------------------------------------------------------------


@app.command("lb")
def lb(
    services: Annotated[
        Path,
        typer.Argument(
            help="The services file (YAML): its frontends are the VIPs.",
            exists=True,
            dir_okay=False,
        ),
    ],
    interface: Annotated[str, typer.Option(help="The interface VIP traffic arrives on.")],
    address: Annotated[
        str, typer.Option(help="This node's address on it: the tunnels' outer source.")
    ],
    neighbour: Annotated[
        list[str] | None,
        typer.Option(help="IP=MAC of a backend on this segment (repeatable)."),
    ] = None,
    gateway_mac: Annotated[
        str | None, typer.Option(help="The router's MAC, for backends not in --neighbour.")
    ] = None,
    workers: Annotated[
        int, typer.Option(help="Worker threads (one ring each).", min=1, max=256)
    ] = 1,
    maglev_seed: Annotated[
        int,
        typer.Option(
            help="The same on every load-balancer node: the same backend per flow.", min=0
        ),
    ] = 0,
    stats_every: Annotated[
        str, typer.Option(help="How often to print the counters (e.g. 10s).")
    ] = "10s",
    forwarding: Annotated[
        str,
        typer.Option(
            help="ipip (IP-in-IP, backends anywhere) or l2-dsr (backends on this segment, "
            "each in --neighbour: only the MACs change)."
        ),
    ] = "ipip",
    default_policy: Annotated[
        str,
        typer.Option(
            help="Policy of services when neither they nor the file's defaults name one: "
            f"{', '.join(POLICIES)}. Only maglev gives a flow the same backend on every "
            "load-balancer node.",
            callback=_check_policy,
        ),
    ] = LB_DEFAULT_POLICY,
    verbose: Annotated[int, typer.Option("--verbose", "-v", count=True)] = 0,
) -> None:
    """Load-balance the services' VIPs arriving on INTERFACE (AF_PACKET, IP-in-IP direct
    server return; backends need a tunnel device and the VIP on loopback). Each service
    keeps the policy the file gives it (maglev when none): only maglev makes every
    load-balancer node agree on a flow's backend; with the others a flow keeps its backend
    only while it stays on its node. The node must not forward, and IPv6 VIPs need a
    blackhole route here (`ip -6 route add blackhole VIP/128`), so that the kernel drops
    its own copies silently."""
    from pykp.cli.lb import parse_neighbour, run_load_balancer

    _configure_logging(verbose)
    try:
        neighbours = [parse_neighbour(n) for n in neighbour or []]
    except ValueError as error:
        raise typer.BadParameter(str(error), param_hint="'--neighbour'") from None
    every = parse_duration(stats_every)
    catalog = _load_services(services, default_policy)
    require("lb", tools=())
    stop = threading.Event()
    log = logging.getLogger("pykp.lb")
    try:
        with _stop_on_signals(stop):
            stats = run_load_balancer(
                catalog,
                interface=interface,
                address=address,
                neighbours=neighbours,
                gateway_mac=gateway_mac,
                workers=workers,
                maglev_seed=maglev_seed,
                stop=stop,
                forwarding=forwarding,
                report=log.info,
                stats_every=max(every, 0.1),
            )
    except (OSError, ValueError) as error:
        typer.echo(f"pykp lb: {error}", err=True)
        raise typer.Exit(1) from None
    from pykp.cli.lb import nonzero

    typer.echo(nonzero(stats))


if __name__ == "__main__":  # `python -m pykp.cli.app`, for when the script is not on PATH
    app()
