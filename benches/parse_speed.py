"""Parse speed of the two sources: Kubernetes objects and the services file.

Run from the repository root with the venv of `bash scripts/install.sh --test` (add
`PYTHONPATH=.` to measure the source tree instead of the installed package):

    .venv/bin/python benches/parse_speed.py kube 100000
    .venv/bin/python benches/parse_speed.py file 10000

`kube N`: N Services and N EndpointSlices (3 endpoints each) made like the stand-in's
(`benches/standin_scale.py`), then `parse_service` and `parse_endpoint_slice` over all of
them: seconds and objects per second for each kind.

`file N`: a services file of N services (a name, a clusterIP, 1-2 ports, 3 endpoints),
loaded once cold, then again after each of a few one-entry edits (a changed endpoint
address, an inserted entry, a deleted entry): seconds per load, and how many services came
back as the very objects of the load before; then `FileSource.check` (the load and what the
source does with its result) for the first edits.
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
import tempfile
import time


def _kube(count: int) -> None:
    from pykp.labs.kube_apiserver import endpoint_slice, service
    from pykp.sources.kube.translate import parse_endpoint_slice, parse_service

    services, slices = [], []
    for index in range(count):
        name = f"svc-{index}"
        cluster_ip = f"10.{96 + index // 65536}.{index // 256 % 256}.{index % 256}"
        services.append(service(name, cluster_ip, namespace=f"ns-{index % 100}"))
        pods = [f"10.244.{(index * 3 + k) // 256 % 256}.{(index * 3 + k) % 256}" for k in range(3)]
        slices.append(endpoint_slice(f"{name}-1", name, pods, namespace=f"ns-{index % 100}"))
    # The objects stay alive, as in a source: with the cyclic GC on, its passes over them
    # are part of the cost; also measured without it (as the agent runs its syncs).
    for collecting in (True, False):
        gc.collect()
        if not collecting:
            gc.disable()
        for kind, parse, objects in (
            ("Service", parse_service, services),
            ("EndpointSlice", parse_endpoint_slice, slices),
        ):
            started = time.perf_counter()
            results = [parse(obj) for obj in objects]
            elapsed = time.perf_counter() - started
            bad = sum(1 for parsed, problems in results if parsed is None or problems)
            print(
                f"{kind} (gc {'on' if collecting else 'off'}): {count} in {elapsed:.2f} s"
                f" = {count / elapsed:,.0f}/s ({bad} skipped or with problems)"
            )
            del results
        gc.enable()


def services_text(count: int, edited: int | None = None) -> str:
    """A services file of `count` services; `edited` changes one endpoint of that entry."""
    lines = ["defaults:", "  policy: random", "services:"]
    for index in range(count):
        a, b = index // 256 % 256, index % 256
        lines += [
            f"  - name: svc-{index}",
            f"    namespace: ns-{index % 100}",
            f"    clusterIP: 10.{96 + index // 65536}.{a}.{b}",
            "    ports:",
        ]
        if index % 2:
            lines += [
                "      - {name: http, port: 80, targetPort: 8080, protocol: TCP}",
                "      - {name: https, port: 443, targetPort: 8443, protocol: TCP}",
            ]
        else:
            lines += ["      - {port: 80, targetPort: 8080}"]
        lines.append("    endpoints:")
        for k in range(3):
            n = index * 3 + k
            last = 250 if index == edited and k == 0 else n % 256
            lines.append(
                f"      - {{ip: 10.{128 + n // 65536}.{n // 256 % 256}.{last}, ready: true}}"
            )
    return "\n".join(lines) + "\n"


def _file(count: int) -> None:
    from pykp.sources.services_file import ServicesFileCache, load_services_file

    cache = ServicesFileCache()  # as FileSource keeps one

    gc.disable()  # as FileSource loads
    with tempfile.TemporaryDirectory() as directory:
        path = os.path.join(directory, "services.yaml")
        text = services_text(count)
        versions = [
            ("cold", text),
            ("unchanged", text),
            ("one endpoint edited", services_text(count, edited=count // 2)),
        ]
        blocks = text.split("\n  - ")
        middle = len(blocks) // 2
        new = (
            blocks[middle]
            .replace("svc-", "new-svc-", 1)
            .replace("clusterIP: 10.", "clusterIP: 11.", 1)
        )
        inserted = blocks[:middle] + [new] + blocks[middle:]
        versions.append(("one entry inserted", "\n  - ".join(inserted)))
        versions.append(
            ("one entry deleted", "\n  - ".join(blocks[:middle] + blocks[middle + 1 :]))
        )
        before = None
        for label, version in versions:
            with open(path, "w", encoding="utf-8") as file:
                file.write(version)
            started = time.perf_counter()
            catalog, problems = load_services_file(path, cache)
            elapsed = time.perf_counter() - started
            same = 0
            if before is not None:
                old = {id(spec) for spec in before.services}
                same = sum(1 for spec in catalog.services if id(spec) in old)
            print(
                f"{label}: {len(catalog.services)} services, {len(problems)} problems,"
                f" {elapsed * 1000:.0f} ms ({same} the same objects as the load before)"
            )
            before = catalog
        # Through the source as the agent runs it: the load, then what FileSource does
        # with the catalog (unchanged services kept, changed keys found).
        from pykp.sources.file import FileSource

        source = FileSource(path, watch=False)
        for label, version in versions[:3]:
            with open(path, "w", encoding="utf-8") as file:
                file.write(version)
            started = time.perf_counter()
            source.check()
            elapsed = time.perf_counter() - started
            print(f"FileSource.check, {label}: {elapsed * 1000:.0f} ms")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("what", choices=("kube", "file"))
    parser.add_argument("count", type=int)
    arguments = parser.parse_args()
    print(f"python {sys.version.split()[0]}, pykp from {_where()}")
    (_kube if arguments.what == "kube" else _file)(arguments.count)


def _where() -> str:
    import pykp

    return os.path.dirname(pykp.__file__)


if __name__ == "__main__":
    main()
