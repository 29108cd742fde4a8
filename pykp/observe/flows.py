"""Live service flows as the kernel's conntrack holds them: the agent's `/flows` answer,
the `pykp flows` table, and the metric families of the conntrack follower.

The agent lists the kernel's table (`pykp._fastpath.kernel_flows`) and keeps the flows
addressed to a service; the follower's counters say how far its event stream can be
trusted (lost events, resynchronisations).
"""

from __future__ import annotations

import ipaddress
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Final

from pykp.observe.metrics import Family

# rich is imported where something is printed: `pykp run` prints nothing with it, and
# importing it cost 25 ms of the agent's start.
if TYPE_CHECKING:
    from rich.console import Console

    from pykp._fastpath import KernelFlow

# Entries `/flows` reads from the kernel before filtering: a bound on one request's cost.
FLOWS_LISTED_MAX: Final = 200_000

_FOLLOWER_COUNTERS: Final = {
    "events_lost": (
        "pykp_conntrack_events_lost_total",
        "Times the kernel dropped conntrack events for a full socket buffer (each repaired "
        "by a full listing)",
    ),
    "resyncs": (
        "pykp_conntrack_resyncs_total",
        "Full listings of the kernel's conntrack table (periodic, and after lost events)",
    ),
    "resync_removed": (
        "pykp_conntrack_resync_removed_total",
        "Flows a listing found gone from the kernel (their end event was lost, or their "
        "first packet never made a conntrack entry)",
    ),
    "parse_errors": (
        "pykp_conntrack_parse_errors_total",
        "Conntrack messages that did not parse (skipped)",
    ),
}


class FlowQueryError(ValueError):
    """A `/flows` query that cannot be answered (a bad backend address, say)."""


def follower_families(stats: Mapping[str, int]) -> list[Family]:
    """`ConntrackFollower.stats()` as families (none when the follower is off)."""
    if not stats:
        return []
    families = [
        Family.labelled(
            "pykp_conntrack_events_total",
            "counter",
            "Conntrack events received, by kind (every flow of the node)",
            "kind",
            {
                "new": stats.get("events_new", 0),
                "update": stats.get("events_update", 0),
                "destroy": stats.get("events_destroy", 0),
            },
        ),
        Family.labelled(
            "pykp_conntrack_service_flows_total",
            "counter",
            "Service flows the follower applied: confirmed (decided by pykp's reader), "
            "adopted (decided by the kernel path, or older than the agent), ended",
            "event",
            {
                "confirmed": stats.get("flows_confirmed", 0),
                "adopted": stats.get("flows_adopted", 0),
                "ended": stats.get("flows_ended", 0),
            },
        ),
    ]
    families += [
        Family.single(name, "counter", help_, stats.get(key, 0))
        for key, (name, help_) in _FOLLOWER_COUNTERS.items()
    ]
    return families


def active_flow_family(counts: Mapping[tuple[str, str, int], int], limit: int) -> Family:
    """`pykp_backend_active_flows{service, backend}` from `Engine.flow_counts()`: the
    largest `limit` series by name order; the rest summed per service as backend="other"."""
    rows = sorted(counts.items())
    shown = rows[:limit]
    rest: Counter[str] = Counter()
    for (service, _ip, _port), n in rows[limit:]:
        rest[service] += n
    values: list[tuple[Sequence[str], float]] = [
        ((service, _endpoint(ip, port)), n) for (service, ip, port), n in shown
    ]
    values += [((service, "other"), n) for service, n in sorted(rest.items())]
    return Family.rows(
        "pykp_backend_active_flows",
        "gauge",
        "Live flows per service and backend, as the kernel's conntrack holds them",
        ("service", "backend"),
        values,
    )


def flows_report(
    flows: Iterable[KernelFlow],
    *,
    service: str | None,
    backend: str | None,
    limit: int,
    follower: Mapping[str, int] | None,
) -> dict[str, Any]:
    """The `/flows` answer: matching flows (at most `limit`), per-backend counts of all the
    matching ones, and the follower's counters."""
    want_ip, want_port = _parse_backend(backend) if backend else (None, None)
    rows: list[dict[str, Any]] = []
    counts: Counter[tuple[str, str]] = Counter()
    total = 0
    for flow in flows:
        if service and not _service_matches(flow.service, service):
            continue
        ip, port = flow.backend
        if want_ip is not None and (
            ipaddress.ip_address(ip) != want_ip or (want_port is not None and port != want_port)
        ):
            continue
        total += 1
        counts[(flow.service, _endpoint(ip, port))] += 1
        if len(rows) < limit:
            rows.append(
                {
                    "protocol": flow.protocol,
                    "client": _endpoint(*flow.client),
                    "frontend": _endpoint(*flow.frontend),
                    "backend": _endpoint(ip, port),
                    "service": flow.service,
                    "state": flow.state,
                    "timeout": flow.timeout,
                    "age": flow.age,
                }
            )
    return {
        "flows": rows,
        "total": total,
        "perBackend": [
            {"service": svc, "backend": b, "flows": n} for (svc, b), n in sorted(counts.items())
        ],
        "follower": dict(follower) if follower is not None else None,
    }


def render_flows(report: Mapping[str, Any], console: Console) -> None:
    """`pykp flows` for people: per-backend counts, then the flows."""
    from rich import box
    from rich.table import Table

    per_backend = Table(title="Live flows per backend (kernel conntrack)", box=box.SIMPLE)
    for column in ("service", "backend", "flows"):
        per_backend.add_column(column, justify="right" if column == "flows" else "left")
    for row in report.get("perBackend", []):
        per_backend.add_row(row["service"], row["backend"], str(row["flows"]))
    console.print(per_backend)
    flows = Table(title=f"Flows ({report.get('total', 0)} in all)", box=box.SIMPLE)
    for column in ("proto", "client", "frontend", "backend", "service", "state", "age", "timeout"):
        flows.add_column(column)
    for row in report.get("flows", []):
        age = row.get("age")
        timeout = row.get("timeout")
        flows.add_row(
            row["protocol"],
            row["client"],
            row["frontend"],
            row["backend"],
            row["service"],
            row["state"],
            "-" if age is None else f"{age:.1f}s",
            "-" if timeout is None else f"{timeout}s",
        )
    console.print(flows)
    follower = report.get("follower")
    if follower is None:
        console.print(
            "conntrack follower: off (--no-follow-conntrack): least-conn counts opened flows"
        )
    else:
        console.print(
            f"conntrack follower: {follower.get('events_new', 0)} new and "
            f"{follower.get('events_destroy', 0)} destroy events, "
            f"{follower.get('events_lost', 0)} losses, {follower.get('resyncs', 0)} listings"
        )


def _service_matches(name: str, wanted: str) -> bool:
    # "default/web" matches every port of it ("default/web:http"); a full name matches itself.
    return name == wanted or name.startswith(wanted + ":")


def _parse_backend(text: str) -> tuple[ipaddress.IPv4Address | ipaddress.IPv6Address, int | None]:
    host, port = text, None
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        port = rest[1:] if rest.startswith(":") else None
    elif text.count(":") == 1:
        host, port = text.split(":")
    try:
        address = ipaddress.ip_address(host)
        number = int(port) if port is not None else None
    except ValueError:
        raise FlowQueryError(f"backend {text!r} is not IP or IP:port") from None
    if number is not None and not 0 < number < 65536:
        raise FlowQueryError(f"backend {text!r}: port out of range")
    return address, number


def _endpoint(ip: str, port: int) -> str:
    return f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}"
