"""`pykp run --config FILE`: the KubeProxyConfiguration fields pykp implements.

An operator migrating from kube-proxy keeps its configuration file. The fields with a pykp
equivalent become settings of `pykp run` (flags given on the command line still win); every
other field that is set is named back as ignored, so nothing is silently dropped.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

KIND = "KubeProxyConfiguration"
API_GROUP = "kubeproxy.config.k8s.io/"


class KubeProxyConfigError(ValueError):
    """The file is not a KubeProxyConfiguration pykp can read."""


def _text(value: Any) -> str:
    if not isinstance(value, str):
        raise KubeProxyConfigError(f"expected a string, got {value!r}")
    return value


def _cidr_list(value: Any) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        # kube-proxy's "primary" keyword (node's primary IPs) has no pykp equivalent.
        if "primary" in value:
            raise KubeProxyConfigError("nodePortAddresses: 'primary' is not supported; list CIDRs")
        return ",".join(value)
    raise KubeProxyConfigError(f"expected CIDRs, got {value!r}")


def _integer(value: Any) -> str:
    if not isinstance(value, int) or isinstance(value, bool):
        raise KubeProxyConfigError(f"expected an integer, got {value!r}")
    return str(value)


def _boolean(value: Any) -> str:
    if not isinstance(value, bool):
        raise KubeProxyConfigError(f"expected true or false, got {value!r}")
    return "true" if value else "false"


def _duration(value: Any) -> str:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    return _text(value)


# Field path in the file -> (`pykp run` parameter, conversion to the flag's text form).
FIELDS: Mapping[str, tuple[str, Callable[[Any], str]]] = {
    "hostnameOverride": ("hostname_override", _text),
    "clusterCIDR": ("cluster_cidr", _text),
    "healthzBindAddress": ("healthz_bind_address", _text),
    "metricsBindAddress": ("metrics_bind_address", _text),
    "nodePortAddresses": ("nodeport_addresses", _cidr_list),
    "clientConnection.kubeconfig": ("kubeconfig", _text),
    "syncPeriod": ("sync_period", _duration),
    "minSyncPeriod": ("min_sync_period", _duration),
    # Older files carry the sync periods under the mode's section.
    "iptables.syncPeriod": ("sync_period", _duration),
    "iptables.minSyncPeriod": ("min_sync_period", _duration),
    "nftables.syncPeriod": ("sync_period", _duration),
    "nftables.minSyncPeriod": ("min_sync_period", _duration),
    # Set once at start, as kube-proxy does (pykp.netfilter.conntrack_sysctls).
    "conntrack.maxPerCore": ("conntrack_max_per_core", _integer),
    "conntrack.min": ("conntrack_min", _integer),
    "conntrack.tcpEstablishedTimeout": ("conntrack_tcp_timeout_established", _duration),
    "conntrack.tcpCloseWaitTimeout": ("conntrack_tcp_timeout_close_wait", _duration),
    "conntrack.tcpBeLiberal": ("conntrack_tcp_be_liberal", _boolean),
    "conntrack.udpTimeout": ("conntrack_udp_timeout", _duration),
    "conntrack.udpStreamTimeout": ("conntrack_udp_timeout_stream", _duration),
}

# Fields that are part of the object's identity, not settings.
_IDENTITY = {"apiVersion", "kind"}


@dataclass(frozen=True)
class KubeProxyConfig:
    """What the file sets: `pykp run` parameters (as flag text) and the ignored fields."""

    settings: dict[str, str] = field(default_factory=dict)
    ignored: tuple[str, ...] = ()


def _leaves(obj: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Field paths of every set value ("iptables.syncPeriod"); empty values count as unset."""
    out: dict[str, Any] = {}
    for key, value in obj.items():
        path = f"{prefix}{key}"
        if isinstance(value, Mapping) and path not in FIELDS:
            out.update(_leaves(value, path + "."))
        elif value not in (None, "", [], {}):
            out[path] = value
    return out


def parse_kubeproxy_config(text: str, source: str = "<string>") -> KubeProxyConfig:
    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError as error:
        raise KubeProxyConfigError(f"{source}: not YAML: {error}") from None
    if not isinstance(doc, Mapping) or doc.get("kind") != KIND:
        raise KubeProxyConfigError(f"{source}: not a {KIND} (kind: {KIND} expected)")
    api_version = str(doc.get("apiVersion", ""))
    if not api_version.startswith(API_GROUP):
        raise KubeProxyConfigError(f"{source}: apiVersion {api_version!r} is not {API_GROUP}*")
    settings: dict[str, str] = {}
    ignored: list[str] = []
    for path, value in sorted(_leaves(doc).items()):
        if path in _IDENTITY:
            continue
        if path not in FIELDS:
            ignored.append(path)
            continue
        parameter, convert = FIELDS[path]
        try:
            settings[parameter] = convert(value)
        except KubeProxyConfigError as error:
            raise KubeProxyConfigError(f"{source}: {path}: {error}") from None
    return KubeProxyConfig(settings, tuple(ignored))


def load_kubeproxy_config(path: Path) -> KubeProxyConfig:
    try:
        text = path.read_text()
    except OSError as error:
        raise KubeProxyConfigError(f"{path}: {error.strerror}") from None
    return parse_kubeproxy_config(text, str(path))
