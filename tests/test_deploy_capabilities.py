"""The agent serves Services with the capabilities the DaemonSet grants, and no others.

deploy/daemonset.yaml runs pykp unprivileged: root in the container, every capability
dropped but `securityContext.capabilities.add`, no privilege escalation. Here `pykp run`
runs the same way on a lab node (util-linux's setpriv limits the bounding, inheritable
and ambient sets to that list, from the rendered manifest; uid 0 then gets exactly it as
its permitted and effective sets, and so do the iptables, nft and conntrack it runs),
with the DaemonSet's own flags, and a client pod connects to a ClusterIP.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from test_kube_deploy import manifests, pykp_container

from pykp.labs.lab import Lab, netns_pids
from pykp.labs.lab_agent import AgentStartError, LabAgent, http_get

pytestmark = pytest.mark.privileged

if os.geteuid() != 0 and not os.environ.get("CI"):
    pytest.skip("needs root (network namespaces, netfilter)", allow_module_level=True)

SERVICES = """
services:
  - name: web
    clusterIP: 10.96.0.10
    policy: round-robin
    ports: [{port: 80, targetPort: 8080}]
    endpoints:
      - {ip: 10.244.0.10, nodeName: node}
      - {ip: 10.244.0.11, nodeName: node}
"""

# linux/capability.h: the bit of each capability in /proc/PID/status masks.
CAPABILITY_BITS = {
    "CHOWN": 0, "DAC_OVERRIDE": 1, "DAC_READ_SEARCH": 2, "FOWNER": 3, "FSETID": 4,
    "KILL": 5, "SETGID": 6, "SETUID": 7, "SETPCAP": 8, "LINUX_IMMUTABLE": 9,
    "NET_BIND_SERVICE": 10, "NET_BROADCAST": 11, "NET_ADMIN": 12, "NET_RAW": 13,
    "IPC_LOCK": 14, "IPC_OWNER": 15, "SYS_MODULE": 16, "SYS_RAWIO": 17, "SYS_CHROOT": 18,
    "SYS_PTRACE": 19, "SYS_PACCT": 20, "SYS_ADMIN": 21, "SYS_BOOT": 22, "SYS_NICE": 23,
    "SYS_RESOURCE": 24, "SYS_TIME": 25, "SYS_TTY_CONFIG": 26, "MKNOD": 27, "LEASE": 28,
    "AUDIT_WRITE": 29, "AUDIT_CONTROL": 30, "SETFCAP": 31, "MAC_OVERRIDE": 32,
    "MAC_ADMIN": 33, "SYSLOG": 34, "WAKE_ALARM": 35, "BLOCK_SUSPEND": 36, "AUDIT_READ": 37,
    "PERFMON": 38, "BPF": 39, "CHECKPOINT_RESTORE": 40,
}  # fmt: skip


def security_context() -> dict[str, Any]:
    context: dict[str, Any] = pykp_container()["securityContext"]
    assert context.get("privileged") is False, "a privileged container has every capability"
    assert context["capabilities"]["drop"] == ["ALL"], "else the runtime's defaults add to it"
    return context


def granted() -> list[str]:
    """The DaemonSet's capabilities, as Kubernetes spells them (NET_ADMIN, not CAP_...)."""
    return list(security_context()["capabilities"]["add"])


def daemonset_flags() -> list[str]:
    """The DaemonSet's args after `run`, with $(NODE_NAME) as the lab's node."""
    args = pykp_container()["args"]
    assert args[0] == "run"
    return [arg.replace("$(NODE_NAME)", "node") for arg in args[1:]]


class CappedAgent(LabAgent):
    """`pykp run` on the lab node as the container runs it: under setpriv, with only
    `capabilities` (and no_new_privs when the DaemonSet forbids privilege escalation)."""

    def __init__(self, *args: Any, capabilities: list[str], **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.capabilities = capabilities

    def argv(self) -> list[str]:
        setpriv = shutil.which("setpriv")
        assert setpriv is not None, "setpriv (util-linux) is not installed"
        caps = ",".join(["-all", *(f"+{cap.lower()}" for cap in self.capabilities)])
        limits = [f"--bounding-set={caps}", f"--inh-caps={caps}", f"--ambient-caps={caps}"]
        if security_context().get("allowPrivilegeEscalation") is False:
            limits.append("--no-new-privs")
        return [setpriv, *limits, "--", *super().argv()]


def mask(capabilities: list[str]) -> int:
    return sum(1 << CAPABILITY_BITS[cap] for cap in capabilities)


def agent_status(lab: Lab) -> dict[str, str]:
    """/proc/PID/status of the `pykp run` process in the lab node's namespace."""
    for pid in netns_pids(lab.ns("node")):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            status = Path(f"/proc/{pid}/status").read_text()
        except OSError:
            continue
        if b"run" in cmdline and any(b"pykp.cli.app" in part for part in cmdline):
            return dict(line.split(":\t", 1) for line in status.splitlines() if ":\t" in line)
    raise AssertionError("no pykp run process in the node's namespace")


@pytest.fixture(scope="module")
def lab() -> Iterator[Lab]:
    with Lab(backends=2, clients=1) as lab:
        lab.start_http_servers(port=8080)
        yield lab


@pytest.fixture
def services(write_services: Callable[[str], Path]) -> Path:
    return write_services(SERVICES)


def test_the_capability_list_names_linux_capabilities() -> None:
    assert granted(), "the DaemonSet adds capabilities"
    assert set(granted()) <= set(CAPABILITY_BITS), f"unknown: {granted()}"
    assert "SYS_ADMIN" not in granted()  # that would make the pod as good as privileged
    assert manifests()  # the rendered kustomization, not daemonset.yaml alone


def test_the_agent_serves_a_cluster_ip_with_the_daemonsets_capabilities_only(
    lab: Lab, services: Path, tmp_path: Path
) -> None:
    capabilities = granted()
    agent = CappedAgent(
        lab,
        services,
        *daemonset_flags(),
        workdir=tmp_path / "agent",
        capabilities=capabilities,
    )
    agent.start()  # raises, with the agent's log, when it cannot program the node
    try:
        status = agent_status(lab)
        wanted = mask(capabilities)
        for capability_set in ("CapEff", "CapPrm", "CapBnd"):
            assert int(status[capability_set], 16) == wanted, (capability_set, status)
        assert int(status["CapInh"], 16) & ~wanted == 0
        assert int(status["CapAmb"], 16) & ~wanted == 0
        if security_context().get("allowPrivilegeEscalation") is False:
            assert status["NoNewPrivs"].strip() == "1"

        answers = {http_get(lab, "client-0", "10.96.0.10") for _ in range(6)}

        assert answers == {"backend-0", "backend-1"}
    finally:
        code = agent.stop()
    # SIGTERM, as the kubelet stops the pod: a clean exit, and the rules stay unless the
    # DaemonSet asks for --cleanup-on-exit (what its terminationGracePeriod comment says).
    assert code == 0, agent.log.read_text()
    tables = lab.exec("node", ["nft", "list", "tables"], check=True).stdout
    assert ("table inet pykp" in tables) != ("--cleanup-on-exit" in daemonset_flags()), tables


def test_without_net_admin_the_agent_cannot_program_the_node(
    lab: Lab, services: Path, tmp_path: Path
) -> None:
    """The limits bite: the same run short of NET_ADMIN fails (so the check above can)."""
    agent = CappedAgent(
        lab,
        services,
        *daemonset_flags(),
        workdir=tmp_path / "agent",
        capabilities=[cap for cap in granted() if cap != "NET_ADMIN"],
    )
    with pytest.raises(AgentStartError) as failure:
        agent.start()
    message = str(failure.value)  # pykp's own check, or the kernel's EPERM
    assert "CAP_NET_ADMIN" in message or "not permitted" in message.lower(), message
