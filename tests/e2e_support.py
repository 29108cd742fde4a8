"""Builders of the Kubernetes objects the end-to-end tests publish on the stand-in API server."""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

from pykp.labs.kube_apiserver import ClusterApiServer
from pykp.labs.lab import ClusterLab
from pykp.labs.lab_agent import LabAgent, in_parallel, start_nodes


def kube_service(
    name: str,
    cluster_ips: Sequence[str],
    *,
    port: int = 80,
    target_port: int = 8080,
    annotations: dict[str, str] | None = None,
    namespace: str = "default",
    **spec: Any,
) -> dict[str, Any]:
    """A ClusterIP Service (single or dual stack) as the API server stores it."""
    families = ["IPv6" if ":" in ip else "IPv4" for ip in cluster_ips]
    metadata: dict[str, Any] = {"name": name, "namespace": namespace, "labels": {"app": name}}
    if annotations:
        metadata["annotations"] = annotations
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": metadata,
        "spec": {
            "type": "ClusterIP",
            "selector": {"app": name},
            "clusterIP": cluster_ips[0],
            "clusterIPs": list(cluster_ips),
            "ipFamilies": families,
            "ipFamilyPolicy": "RequireDualStack" if len(cluster_ips) > 1 else "SingleStack",
            "ports": [{"name": "http", "port": port, "targetPort": target_port, "protocol": "TCP"}],
            "sessionAffinity": "None",
            "internalTrafficPolicy": "Cluster",
            **spec,
        },
    }


def kube_slice(
    lab: ClusterLab,
    service: str,
    pods: Iterable[str],
    *,
    family: int = 4,
    port: int = 8080,
    namespace: str = "default",
    name: str | None = None,
) -> dict[str, Any]:
    """The EndpointSlice the controller would write for `service`'s ready `pods`:
    one address family, each endpoint with its nodeName, zone and targetRef."""
    zones = {
        node["metadata"]["name"]: node["metadata"]["labels"].get("topology.kubernetes.io/zone")
        for node in lab.node_objects()
    }
    endpoints = []
    for ref in pods:
        pod = lab.host(ref)
        node = lab.node_of(pod).name
        endpoint: dict[str, Any] = {
            "addresses": [pod.ipv4 if family == 4 else pod.ipv6],
            "conditions": {"ready": True, "serving": True, "terminating": False},
            "nodeName": node,
            "targetRef": {"kind": "Pod", "namespace": namespace, "name": pod.name},
        }
        if zones.get(node):
            endpoint["zone"] = zones[node]
        endpoints.append(endpoint)
    return {
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {
            "name": name or f"{service}-ipv{family}",
            "namespace": namespace,
            "labels": {
                "kubernetes.io/service-name": service,
                "endpointslice.kubernetes.io/managed-by": "endpointslice-controller.k8s.io",
            },
        },
        "addressType": f"IPv{family}",
        "ports": [{"name": "http", "port": port, "protocol": "TCP"}],
        "endpoints": endpoints,
    }


@contextlib.contextmanager
def cluster_apiserver(cluster: ClusterLab) -> Iterator[ClusterApiServer]:
    """The stand-in API server in the cluster's `net` namespace, holding its Node objects."""
    server = ClusterApiServer(cluster.ns("net"), cluster.api_ip4)
    server.start()
    try:
        for node in cluster.node_objects():
            server.create("nodes", node)
        yield server
    finally:
        server.stop()


@contextlib.contextmanager
def cluster_agents(
    cluster: ClusterLab, apiserver: ClusterApiServer, base: Path
) -> Iterator[list[LabAgent]]:
    """One `pykp run` per node of `cluster`, fed by `apiserver`, started together."""
    kubeconfig = apiserver.write_kubeconfig(base / "kubeconfig")
    agents = [
        LabAgent(cluster, None, kubeconfig=kubeconfig, host=host.name, workdir=base / host.name)
        for host in cluster.node_hosts
    ]
    try:
        start_nodes(agents)
        yield agents
    finally:
        in_parallel(lambda i: agents[i].stop(), len(agents))
