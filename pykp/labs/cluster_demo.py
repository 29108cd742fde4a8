"""A multi-node cluster in namespaces with `pykp run` on every node, for `pykp demo --cluster`.

`start_cluster_demo` builds a `ClusterLab`, starts an HTTP server in every pod, has an API
server listen on the cluster network (the caller's factory makes it: the stand-in server
lives with the tests), registers the Node objects, writes a kubeconfig and runs one agent
per node against it. The returned `ClusterDemo` holds the handles and tears everything
down on `close()`; a failure half-way tears down what was built.
"""

from __future__ import annotations

import contextlib
import shutil
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, Protocol

from rich import box
from rich.console import Console
from rich.table import Table

from pykp.labs.lab import ClusterLab
from pykp.labs.lab_agent import LabAgent, http_get, wait_for

if TYPE_CHECKING:
    from typing import Self

__all__ = ["ApiServer", "ClusterDemo", "start_cluster_demo"]


class ApiServer(Protocol):
    """What the demo needs of an API server (the tests' stand-in server has it)."""

    @property
    def url(self) -> str: ...
    def write_kubeconfig(self, path: Path) -> Path: ...
    def apply(self, plural: str, obj: dict[str, Any]) -> Any: ...
    def stop(self) -> None: ...


@dataclass(eq=False)
class ClusterDemo:
    """The running demo: the lab, the API server and one agent per node."""

    lab: ClusterLab
    apiserver: ApiServer
    kubeconfig: Path
    workdir: Path
    agent_args: Sequence[str] = ()
    agents: dict[str, LabAgent] = field(default_factory=dict)  # by node name
    _own_workdir: bool = False

    def start_agent(self, node: str) -> LabAgent:
        """Launch `pykp run` on `node` against the API server (does not wait)."""
        agent = LabAgent(
            self.lab,
            None,
            *self.agent_args,
            kubeconfig=self.kubeconfig,
            host=node,
            workdir=self.workdir / node,
        )
        agent.launch()
        self.agents[node] = agent
        return agent

    def stop_agent(self, node: str) -> int | None:
        agent = self.agents.pop(node, None)
        return None if agent is None else agent.stop()

    def ready(self, node: str) -> bool:
        """The node's agent answers /healthz and has synced once."""
        return self.agents[node].synced()

    def wait_ready(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        for agent in self.agents.values():
            agent.wait_started(timeout=max(1.0, deadline - time.monotonic()))

    def close(self) -> None:
        """Stop the agents, the API server and the lab. Safe to call repeatedly."""
        for node in list(self.agents):
            with contextlib.suppress(Exception):
                self.stop_agent(node)
        with contextlib.suppress(Exception):
            self.apiserver.stop()
        self.lab.close()
        if self._own_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def start_cluster_demo(
    apiserver_factory: Callable[[ClusterLab], ApiServer],
    *,
    nodes: int = 3,
    pods_per_node: int = 2,
    http_port: int = 8080,
    workdir: Path | None = None,
    agent_args: Sequence[str] = (),
    timeout: float = 30.0,
) -> ClusterDemo:
    """Build the cluster, start its API server (from `apiserver_factory(lab)`: started and
    listening on the cluster network, e.g. at ``lab.api_ip4`` inside ``lab.ns("net")``) and
    one agent per node; return when every agent has synced.

    The API server gets the Node objects; Services and EndpointSlices are the caller's.
    """
    lab = ClusterLab(nodes=nodes, pods_per_node=pods_per_node)
    apiserver: ApiServer | None = None
    own = workdir is None
    directory = Path(tempfile.mkdtemp(prefix="pykp-cluster-")) if workdir is None else workdir
    try:
        lab.start_http_servers(port=http_port)
        apiserver = apiserver_factory(lab)
        for node in lab.node_objects():
            apiserver.apply("nodes", node)
        directory.mkdir(parents=True, exist_ok=True)
        kubeconfig = apiserver.write_kubeconfig(directory / "kubeconfig")
        demo = ClusterDemo(lab, apiserver, kubeconfig, directory, agent_args, _own_workdir=own)
        for host in lab.node_hosts:
            demo.start_agent(host.name)
        demo.wait_ready(timeout)
    except BaseException:
        if apiserver is not None:
            with contextlib.suppress(Exception):
                apiserver.stop()
        lab.close()  # kills the agents too: they run in its namespaces
        if own:
            shutil.rmtree(directory, ignore_errors=True)
        raise
    return demo


@dataclass(frozen=True)
class ClusterDemoResult:
    """Per client pod (one per node) and service: which backend pods answered."""

    connections: int
    by_client: dict[str, dict[str, Counter[str]]]  # client pod -> service -> backend pod
    backends: dict[str, str]  # backend pod -> its node


def run_cluster_demo(connections: int = 30, nodes: int = 3) -> ClusterDemoResult:
    """A cluster of `nodes` nodes fed by the stand-in API server; one Service per policy
    whose backends are the pods of every node but the first; a client pod on each node."""
    from pykp.labs.demo import DEMO_POLICIES
    from pykp.labs.kube_apiserver import ClusterApiServer, endpoint_slice, service

    def apiserver(lab: ClusterLab) -> ClusterApiServer:
        server = ClusterApiServer(lab.ns("net"), lab.api_ip4)
        server.start()
        return server

    with start_cluster_demo(apiserver, nodes=nodes, pods_per_node=2) as demo:
        lab = demo.lab
        clients = [lab.pods_of(n)[0].name for n in lab.node_hosts]
        backends = {p.name: lab.node_of(p).name for n in lab.node_hosts[1:] for p in lab.pods_of(n)}
        addresses = [lab.host(p).ipv4 for p in backends]
        for name, vip, policy in DEMO_POLICIES:
            demo.apiserver.apply("endpointslices", endpoint_slice(f"{name}-1", name, addresses))
            demo.apiserver.apply(
                "services", service(name, vip, annotations={"pykp.io/lb-policy": policy})
            )
        last = DEMO_POLICIES[-1][1]
        for client in clients:
            if not wait_for(lambda c=client: _answers(lab, c, last), timeout=15):  # type: ignore[misc]
                raise RuntimeError(f"{client} cannot reach the services")
        by_client = {
            client: {
                name: Counter(http_get(lab, client, vip) for _ in range(connections))
                for name, vip, _ in DEMO_POLICIES
            }
            for client in clients
        }
    return ClusterDemoResult(connections, by_client, backends)


def _answers(lab: ClusterLab, pod: str, vip: str) -> bool:
    try:
        return bool(http_get(lab, pod, vip, timeout=0.5))
    except OSError:
        return False


def render_cluster_demo(result: ClusterDemoResult, console: Console) -> None:
    table = Table(title="pykp demo --cluster: which backend pod answered", box=box.SIMPLE_HEAVY)
    for column in ("client pod", "service", "backends (pod@node: connections)"):
        table.add_column(column)
    for client, services in result.by_client.items():
        for i, (service_name, counts) in enumerate(services.items()):
            spread = ", ".join(
                f"{pod}@{result.backends.get(pod, '?')}: {n}" for pod, n in sorted(counts.items())
            )
            table.add_row(client if i == 0 else "", service_name, spread)
    console.print(table)
    console.print(
        "Every node runs its own pykp agent against one API server; the backends live on "
        "other nodes than the first, whose client still reaches them."
    )
