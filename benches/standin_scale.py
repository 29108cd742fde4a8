"""The stand-in API server at scale: N Services and N EndpointSlices (3 endpoints each).

Run from the repository root with the venv of `bash scripts/install.sh --test`:

    .venv/bin/python benches/standin_scale.py 10000 30000 100000
    .venv/bin/python benches/standin_scale.py --per-object 100000   # create() one by one

The server runs in a child process so that its CPU time is its own. Measured, per count:
the time the server takes to accept the objects (`create_many`, or `create` per object with
--per-object), the time pykp's client (`ApiListWatch` over its connection: pages of 500,
raw JSON) takes to list each resource and to receive every Service from a watch from "0",
the time a `KubeSource` takes from `start()` to its first `current()` (most of it pykp's
translation), and the server's CPU seconds for the creation and for all of the serving.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import tempfile
import time
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any


def _cpu_seconds() -> float:
    times = os.times()
    return times.user + times.system


def _services_and_slices(count: int) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    from pykp.labs.kube_apiserver import endpoint_slice, service

    services, slices = [], []
    for index in range(count):
        name = f"svc-{index}"
        cluster_ip = f"10.{96 + index // 65536}.{index // 256 % 256}.{index % 256}"
        services.append(service(name, cluster_ip, namespace=f"ns-{index % 100}"))
        pods = [f"10.244.{(index * 3 + k) // 256 % 256}.{(index * 3 + k) % 256}" for k in range(3)]
        slices.append(endpoint_slice(f"{name}-1", name, pods, namespace=f"ns-{index % 100}"))
    return services, slices


def _serve(count: int, per_object: bool, directory: str, pipe: Connection) -> None:
    """The child: create the objects, then answer CPU-time questions until told to stop."""
    from pykp.labs.kube_apiserver import KubeApiServer

    services, slices = _services_and_slices(count)
    server = KubeApiServer().start()
    started, cpu = time.perf_counter(), _cpu_seconds()
    for plural, objects in (("services", services), ("endpointslices", slices)):
        if per_object or not hasattr(server, "create_many"):
            for obj in objects:
                server.create(plural, obj)
        else:
            server.create_many(plural, objects)
    created = time.perf_counter() - started
    kubeconfig = server.write_kubeconfig(Path(directory) / "kubeconfig")
    pipe.send((str(kubeconfig), created, _cpu_seconds() - cpu))
    while pipe.recv() != "stop":
        pipe.send(_cpu_seconds())
    server.stop()


def measure(count: int, *, per_object: bool = False) -> dict[str, float]:
    """One measurement at `count` services (and as many slices); seconds, by what."""
    from pykp.sources.kube.client import ApiListWatch, raw_list_function
    from pykp.sources.kube.connection import connect
    from pykp.sources.kube.source import KubeSource

    results: dict[str, float] = {"count": count}
    with tempfile.TemporaryDirectory() as directory:
        ours, theirs = multiprocessing.Pipe()
        child = multiprocessing.get_context("fork").Process(
            target=_serve, args=(count, per_object, directory, theirs)
        )
        child.start()
        try:
            kubeconfig, results["create_s"], results["create_cpu_s"] = ours.recv()
            ours.send("cpu")
            server_cpu = ours.recv()

            connection = connect(kubeconfig)
            services = raw_list_function(connection, "/api/v1/services")
            for name, function in (
                ("services", services),
                (
                    "endpointslices",
                    raw_list_function(connection, "/apis/discovery.k8s.io/v1/endpointslices"),
                ),
            ):
                started = time.perf_counter()
                listed = sum(len(page) for page, _ in ApiListWatch(name, function).pages())
                results[f"list_{name}_s"] = time.perf_counter() - started
                assert listed == count, (name, listed)
            # A watch from "0" starts with an ADDED event for every object.
            started = time.perf_counter()
            stream = ApiListWatch("services", services).watch("0")
            added = 0
            for _event in stream:
                added += 1
                if added == count:
                    break
            stream.close()
            results["watch_from_0_services_s"] = time.perf_counter() - started
            connection.close()

            started = time.perf_counter()
            source = KubeSource(kubeconfig=kubeconfig)
            source.start(lambda: None)
            if not source.wait_synced(timeout=3600):
                raise RuntimeError("the source did not sync")
            current = source.current()
            results["source_sync_s"] = time.perf_counter() - started
            source.stop()
            assert current is not None and len(current.services) == count

            ours.send("cpu")
            results["serve_cpu_s"] = ours.recv() - server_cpu
            ours.send("stop")
        finally:
            child.join(timeout=30)
            if child.is_alive():
                child.terminate()
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("counts", nargs="+", type=int)
    parser.add_argument("--per-object", action="store_true", help="create() each object")
    arguments = parser.parse_args()
    for count in arguments.counts:
        results = measure(count, per_object=arguments.per_object)
        print(json.dumps({k: round(v, 2) for k, v in results.items()}), flush=True)


if __name__ == "__main__":
    main()
