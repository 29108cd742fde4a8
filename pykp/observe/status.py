"""The agent's status snapshot: built on each sync, served at `/status`, shown by `pykp status`.

The snapshot is plain JSON (camelCase keys, like the rest of Kubernetes' tooling) so that
`curl 127.0.0.1:10249/status | jq` works as well as `pykp status`. The agent also writes
it to `<state dir>/status.json` after each successful sync, for when the metrics server
is off or unreachable (`pykp status --file`).
"""

from __future__ import annotations

import json
import os
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pykp.agent.plan import EngineBackend, EngineService
from pykp.agent.sync_runner import RunnerStats
from pykp.model import Problem
from pykp.observe.health import parse_bind_address
from pykp.sources.base import SourceStatus

# rich is imported where something is printed: `pykp run` prints nothing with it, and
# importing it cost 25 ms of the agent's start.
if TYPE_CHECKING:
    from rich.console import Console
    from rich.text import Text

    from pykp._fastpath import Connection

__all__ = [
    "STATUS_FILE",
    "StatusError",
    "build_status",
    "fetch_status",
    "flow_status",
    "read_status_file",
    "render_status",
    "service_status",
    "write_status_file",
]

STATUS_FILE = "status.json"
SCHEMA_VERSION = 1


class StatusError(Exception):
    """The status could not be fetched or read."""


# --- building ---------------------------------------------------------------------------


def _address(ip: str, port: int) -> str:
    return f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}"


def _backend_status(backend: EngineBackend) -> dict[str, Any]:
    return {
        "ip": backend.ip,
        "port": backend.port,
        "weight": backend.weight,
        "ready": backend.ready,
        "serving": backend.serving,
        "terminating": backend.terminating,
        "local": backend.local,
    }


def service_status(service: EngineService) -> dict[str, Any]:
    return {
        "name": service.name,
        "policy": service.policy,
        "hashKey": service.hash_key,
        "affinityTimeout": service.affinity_timeout,
        "frontends": [
            f"{_address(ip, port)}/{protocol}" for ip, port, protocol in service.frontends
        ],
        "backends": [_backend_status(backend) for backend in service.backends],
    }


def flow_status(connection: Connection) -> dict[str, Any]:
    return {
        "protocol": connection.protocol,
        "client": _address(*connection.client),
        "frontend": _address(*connection.frontend),
        "backend": _address(*connection.backend),
        "service": connection.service,
        "state": connection.state,
        "expiresIn": round(connection.expires_in, 3),
    }


def build_status(
    *,
    node_name: str,
    node_addresses: Sequence[str],
    services: Iterable[EngineService],
    refused: Mapping[str, str],
    problems: Iterable[Problem],
    source: SourceStatus | None,
    counters: Mapping[str, int],
    datapath: Mapping[str, int] | None,
    runner: RunnerStats | None,
    healthy: bool,
    last_sync: float | None,
    flows: Iterable[Connection] = (),
    unhealthy_reason: str | None = None,
    now: float | None = None,
    services_total: int | None = None,
) -> dict[str, Any]:
    """The snapshot; times are wall-clock seconds since the epoch. `services` may be the
    first of more (`services_total` of them): the snapshot lists those, by name."""
    listed = sorted(services, key=_name)
    return {
        "schema": SCHEMA_VERSION,
        "time": time.time() if now is None else now,
        "node": {"name": node_name, "addresses": list(node_addresses)},
        "healthy": healthy,
        "unhealthyReason": unhealthy_reason,
        "lastSync": last_sync,
        "source": None
        if source is None
        else {
            "name": source.name,
            "initialized": source.initialized,
            "changedAt": source.changed_at,
            "loads": source.loads,
            "loadErrors": source.load_errors,
            "invalidObjects": source.invalid_objects,
            "lastError": source.last_error,
        },
        "sync": None
        if runner is None
        else {
            "runs": runner.runs,
            "failures": runner.failures,
            "consecutiveFailures": runner.consecutive_failures,
            "lastError": runner.last_error,
        },
        "problems": [str(problem) for problem in problems],
        "refused": dict(refused),
        "services": [service_status(service) for service in listed],
        "servicesTotal": len(listed) if services_total is None else services_total,
        "counters": dict(sorted(counters.items())),
        "datapath": None if datapath is None else dict(sorted(datapath.items())),
        "flows": [flow_status(flow) for flow in flows],
    }


def write_status_file(directory: Path, snapshot: Mapping[str, Any]) -> Path:
    """Write atomically (temp file + rename): a reader never sees half a snapshot."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / STATUS_FILE
    fd, temp = tempfile.mkstemp(dir=directory, prefix=".status.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as file:
            json.dump(snapshot, file, indent=1, sort_keys=True)
            file.write("\n")
        os.replace(temp, path)
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise
    return path


# --- reading ----------------------------------------------------------------------------


def _check(snapshot: object, where: str) -> dict[str, Any]:
    if not isinstance(snapshot, dict) or "services" not in snapshot:
        raise StatusError(f"{where}: not a pykp status snapshot")
    return snapshot


def fetch_status(address: str, timeout: float = 5.0) -> dict[str, Any]:
    """GET /status from the agent's metrics server (`IP:port`, as --metrics-bind-address)."""
    return _check(fetch_json(address, "/status", timeout), "/status")


def fetch_json(address: str, path: str, timeout: float = 5.0) -> dict[str, Any]:
    """GET `path` (query included) from the agent's metrics server: a JSON object."""
    try:
        host, port = parse_bind_address(address)
    except ValueError as error:
        raise StatusError(str(error)) from None
    # A wildcard bind address is reached through loopback.
    host = {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(host, host)
    url = f"http://{_address(host, port)}{path}"
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:  # http only
            body = json.load(response)
            if not isinstance(body, dict):
                raise StatusError(f"{url}: not a JSON object")
            return body
    except urllib.error.HTTPError as error:
        detail = error.read().decode(errors="replace").strip()[:200] if error.fp else ""
        raise StatusError(f"{url}: HTTP {error.code}" + (f": {detail}" if detail else "")) from None
    except (urllib.error.URLError, OSError) as error:
        reason = getattr(error, "reason", error)
        raise StatusError(f"{url}: {reason} (is `pykp run` running?)") from None
    except json.JSONDecodeError as error:
        raise StatusError(f"{url}: not JSON ({error})") from None


def read_status_file(path: Path) -> dict[str, Any]:
    try:
        return _check(json.loads(path.read_text(encoding="utf-8")), str(path))
    except OSError as error:
        raise StatusError(f"{path}: {error.strerror or error}") from None
    except json.JSONDecodeError as error:
        raise StatusError(f"{path}: not JSON ({error})") from None


# --- rendering --------------------------------------------------------------------------


def _ago(then: float | None, now: float) -> str:
    if then is None:
        return "never"
    seconds = max(0.0, now - then)
    if seconds < 120:
        return f"{seconds:.1f}s ago"
    if seconds < 7200:
        return f"{seconds / 60:.0f}m ago"
    return f"{seconds / 3600:.1f}h ago"


def _backend_text(backend: Mapping[str, Any]) -> Text:
    from rich.text import Text

    conditions = [
        name for name in ("ready", "serving", "terminating", "local") if backend.get(name)
    ]
    style = "green" if backend.get("ready") else "yellow" if backend.get("serving") else "red"
    text = Text(_address(str(backend["ip"]), int(backend["port"])), style=style)
    extra = ",".join(conditions) or "not ready"
    weight = backend.get("weight", 1)
    text.append(f" {extra}" + (f" w={weight}" if weight != 1 else ""), style="dim")
    return text


def render_status(snapshot: Mapping[str, Any], console: Console, *, flows: int = 20) -> None:
    """Print the snapshot as rich tables: summary, services, counters, flows."""
    from rich.table import Table
    from rich.text import Text

    now = float(snapshot.get("time") or time.time())
    node = snapshot.get("node") or {}
    healthy = snapshot.get("healthy")
    health = Text("healthy", style="green")
    if not healthy:
        why = snapshot.get("unhealthyReason")
        health = Text(f"unhealthy ({why})" if why else "unhealthy", style="bold red")
    summary = Text.assemble(
        ("node ", "bold"),
        str(node.get("name", "?")),
        f" ({', '.join(node.get('addresses') or []) or 'no node addresses'}); ",
        f"mode {snapshot['proxyMode']}; " if snapshot.get("proxyMode") else "",
        health,
        f"; last sync {_ago(snapshot.get('lastSync'), now)}",
    )
    console.print(summary)
    undecided = snapshot.get("kernelPathUndecided") or 0
    if undecided:
        console.print(
            Text(
                f"policy degraded for {undecided} connections: no reader decided them (agent "
                "away, stalled or overloaded), the kernel path picked a backend at random",
                style="yellow",
            )
        )
    source = snapshot.get("source")
    if source:
        line = f"source {source['name']}: {source['loads']} loads"
        line += f", {source['loadErrors']} load errors, {source['invalidObjects']} invalid entries"
        console.print(Text(line))
        if source.get("lastError"):
            console.print(Text(f"last load error: {source['lastError']}", style="red"))
    _render_sysctls(snapshot.get("conntrackSysctls") or [], console)
    _render_health_checks(snapshot.get("healthChecks") or [], console)
    if "conntrackFollower" in snapshot:  # older agents' snapshots lack it
        _render_follower(snapshot["conntrackFollower"], console)
    sync = snapshot.get("sync")
    if sync and sync.get("lastError"):
        console.print(Text(f"last sync failed: {sync['lastError']}", style="red"))
    for problem in snapshot.get("problems") or []:
        console.print(Text(f"skipped: {problem}", style="yellow"))
    for name, message in (snapshot.get("refused") or {}).items():
        console.print(Text(f"refused: {name}: {message}", style="yellow"))

    listed = len(snapshot.get("services") or [])
    total = snapshot.get("servicesTotal", listed)
    title = "Services" if total == listed else f"Services (the first {listed} of {total})"
    services = Table(title=title, title_justify="left")
    for column in ("service", "policy", "frontends", "backends"):
        services.add_column(column)
    for service in snapshot.get("services") or []:
        backends = Text("\n").join(_backend_text(backend) for backend in service["backends"])
        policy = str(service["policy"])
        if service.get("affinityTimeout") is not None:
            policy += f"\nClientIP {service['affinityTimeout']:g}s"
        services.add_row(
            Text(str(service["name"])),
            Text(policy),
            Text("\n".join(service["frontends"])),
            backends if service["backends"] else Text("none (rejects)", style="red"),
        )
    console.print(services)

    counters = Table(title="Counters", title_justify="left")
    counters.add_column("counter")
    counters.add_column("value", justify="right")
    for name, value in (snapshot.get("counters") or {}).items():
        if value:  # zeros are the rule; the table shows what happened
            counters.add_row(Text(name), str(value))
    for name, value in (snapshot.get("datapath") or {}).items():
        if value:
            counters.add_row(Text(f"queue {name}"), str(value))
    console.print(counters)

    all_flows = snapshot.get("flows") or []
    table = Table(
        title=f"Flows ({min(flows, len(all_flows))} of {len(all_flows)} shown)",
        title_justify="left",
    )
    for column in ("proto", "client", "frontend", "backend", "service", "state", "expires in"):
        table.add_column(column, justify="right" if column == "expires in" else "left")
    for flow in all_flows[:flows]:
        # Text, not str: rich would read "[fd00::1]:80" as markup.
        table.add_row(
            *(
                Text(str(flow[key]))
                for key in ("protocol", "client", "frontend", "backend", "service", "state")
            ),
            f"{flow['expiresIn']:.1f}s",
        )
    console.print(table)


def _render_sysctls(results: Sequence[Mapping[str, Any]], console: Console) -> None:
    """One line for what the agent set at start (as kube-proxy's --conntrack-* flags ask),
    and one per sysctl it could not set."""
    from rich.text import Text

    done = []
    for result in results:
        name, wanted, found = result["name"], result["wanted"], result["found"]
        if result["outcome"] == "set":
            done.append(f"{name} {wanted} (was {found})")
        elif result["outcome"] == "unchanged":
            done.append(f"{name} {found}")
        else:
            console.print(
                Text(
                    f"conntrack sysctl {name} not set to {wanted} ({result['error']}): "
                    f"left at {found}",
                    style="yellow",
                )
            )
    if done:
        console.print(Text("conntrack sysctls: " + ", ".join(done)))


def _render_health_checks(checks: Sequence[Mapping[str, Any]], console: Console) -> None:
    """One line per service health check node port (externalTrafficPolicy Local)."""
    from rich.text import Text

    for check in checks:
        count = check["localEndpoints"]
        head = f"health check :{check['port']} {check['service']}: {count} local endpoints, "
        if check.get("serving"):
            state, style = ("serving 200" if count else "serving 503"), ""
        else:
            state, style = f"not serving ({check.get('error') or 'not bound'})", "red"
        console.print(Text(head + state, style=style))


def _render_follower(follower: Mapping[str, int] | None, console: Console) -> None:
    """Whether least-conn and the flow counts follow the kernel's conntrack."""
    from rich.text import Text

    if follower is None:
        console.print(
            "conntrack follower: not running (--no-follow-conntrack, or before the first "
            "sync): least-conn counts flows opened in the last 2 minutes"
        )
        return
    lost = follower.get("events_lost", 0)
    console.print(
        Text(
            f"conntrack follower: {follower.get('flows_confirmed', 0)} flows confirmed, "
            f"{follower.get('flows_adopted', 0)} adopted, {follower.get('flows_ended', 0)} ended; "
            f"{lost} event losses (repaired by {follower.get('resyncs', 0)} listings)",
            style="yellow" if lost else "",
        )
    )


def _name(service: EngineService) -> str:
    return service.name
