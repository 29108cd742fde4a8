"""`pykp run --config`: a kube-proxy configuration file, as an operator migrating brings it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from pykp.agent.agent import AgentConfig
from pykp.agent.kubeproxy_config import KubeProxyConfigError, parse_kubeproxy_config
from pykp.cli import app as cli
from pykp.netfilter.conntrack_sysctls import ConntrackSettings

KUBE_PROXY_CONFIG = """
apiVersion: kubeproxy.config.k8s.io/v1alpha1
kind: KubeProxyConfiguration
bindAddress: 0.0.0.0
clientConnection:
  kubeconfig: /var/lib/kube-proxy/kubeconfig.conf
  qps: 5
clusterCIDR: 10.244.0.0/16,fd00:10:244::/48
healthzBindAddress: 0.0.0.0:10256
metricsBindAddress: 127.0.0.1:10249
hostnameOverride: node-a
mode: iptables
nodePortAddresses: [192.168.77.0/24]
iptables:
  masqueradeAll: false
  minSyncPeriod: 2s
  syncPeriod: 45s
conntrack:
  maxPerCore: 0
  min: null
  tcpCloseWaitTimeout: 1h0m0s
  tcpEstablishedTimeout: 2h30m0s
  tcpBeLiberal: true
  udpTimeout: 0s
  udpStreamTimeout: 2m0s
"""


def test_the_fields_pykp_implements_become_settings_and_the_rest_are_named() -> None:
    parsed = parse_kubeproxy_config(KUBE_PROXY_CONFIG)
    assert parsed.settings == {
        "kubeconfig": "/var/lib/kube-proxy/kubeconfig.conf",
        "cluster_cidr": "10.244.0.0/16,fd00:10:244::/48",
        "healthz_bind_address": "0.0.0.0:10256",
        "metrics_bind_address": "127.0.0.1:10249",
        "hostname_override": "node-a",
        "nodeport_addresses": "192.168.77.0/24",
        "min_sync_period": "2s",
        "sync_period": "45s",
        "conntrack_max_per_core": "0",
        "conntrack_tcp_timeout_close_wait": "1h0m0s",
        "conntrack_tcp_timeout_established": "2h30m0s",
        "conntrack_tcp_be_liberal": "true",
        "conntrack_udp_timeout": "0s",
        "conntrack_udp_timeout_stream": "2m0s",
    }
    assert parsed.ignored == (
        "bindAddress",
        "clientConnection.qps",
        "iptables.masqueradeAll",
        "mode",
    )


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("kind: Deployment\napiVersion: apps/v1\n", "not a KubeProxyConfiguration"),
        ("kind: KubeProxyConfiguration\napiVersion: v1\n", "is not kubeproxy.config.k8s.io"),
        ("[unclosed", "not YAML"),
        (
            "kind: KubeProxyConfiguration\napiVersion: kubeproxy.config.k8s.io/v1alpha1\n"
            "nodePortAddresses: [primary]\n",
            "primary",
        ),
        (
            "kind: KubeProxyConfiguration\napiVersion: kubeproxy.config.k8s.io/v1alpha1\n"
            "hostnameOverride: [a]\n",
            "hostnameOverride",
        ),
        (
            "kind: KubeProxyConfiguration\napiVersion: kubeproxy.config.k8s.io/v1alpha1\n"
            "conntrack: {maxPerCore: lots}\n",
            "conntrack.maxPerCore: expected an integer",
        ),
        (
            "kind: KubeProxyConfiguration\napiVersion: kubeproxy.config.k8s.io/v1alpha1\n"
            "conntrack: {tcpBeLiberal: yes please}\n",
            "conntrack.tcpBeLiberal: expected true or false",
        ),
    ],
)
def test_a_file_pykp_cannot_read_is_refused_with_the_reason(text: str, message: str) -> None:
    with pytest.raises(KubeProxyConfigError, match=message):
        parse_kubeproxy_config(text)


def test_flags_on_the_command_line_win_over_the_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "kube-proxy.yaml"
    path.write_text(KUBE_PROXY_CONFIG)
    seen: list[AgentConfig] = []

    class Stub:
        def serve(self, stop: Any) -> None:
            return None

    def make(config: AgentConfig) -> Any:
        seen.append(config)
        return Stub()

    monkeypatch.setattr(cli, "make_agent", make)
    result = CliRunner().invoke(
        cli.app, ["run", "--config", str(path), "--hostname-override", "node-b"]
    )
    assert result.exit_code == 0, result.output
    [config] = seen
    assert config.hostname_override == "node-b", "the flag wins"
    assert config.kubeconfig == "/var/lib/kube-proxy/kubeconfig.conf"
    assert config.cluster_cidrs == ("10.244.0.0/16", "fd00:10:244::/48")
    assert config.nodeport_addresses == ("192.168.77.0/24",)
    assert (config.min_sync_period, config.sync_period) == (2.0, 45.0)
    # conntrack.min is null: kube-proxy's default.
    assert config.conntrack == ConntrackSettings(
        max_per_core=0,
        min=131072,
        tcp_established_timeout=9000.0,
        tcp_close_wait_timeout=3600.0,
        tcp_be_liberal=True,
        udp_timeout=0.0,
        udp_stream_timeout=120.0,
    )
    assert "ignores these KubeProxyConfiguration fields: bindAddress" in result.output


def test_conntrack_flags_on_the_command_line_win_over_the_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "kube-proxy.yaml"
    path.write_text(KUBE_PROXY_CONFIG)
    seen: list[AgentConfig] = []

    class Stub:
        def serve(self, stop: Any) -> None:
            return None

    def make(config: AgentConfig) -> Any:
        seen.append(config)
        return Stub()

    monkeypatch.setattr(cli, "make_agent", make)
    result = CliRunner().invoke(
        cli.app,
        [
            "run", "--config", str(path),
            "--conntrack-max-per-core", "16384",
            "--conntrack-tcp-timeout-established", "24h0m0s",
            "--conntrack-udp-timeout-stream", "0",
        ],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    [config] = seen
    assert config.conntrack.max_per_core == 16384
    assert config.conntrack.tcp_established_timeout == 86400.0
    assert config.conntrack.udp_stream_timeout == 0.0
    assert config.conntrack.tcp_be_liberal, "from the file"


def test_an_unreadable_config_is_a_usage_error(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("kind: Pod\n")
    result = CliRunner().invoke(cli.app, ["run", "--config", str(path)])
    assert result.exit_code == 2
    assert "KubeProxyConfiguration" in result.output
