"""The agent's first sync in pieces, in-process: what `control_plane_scale.py` times as a whole
(start -> all programmed), without the API server, the lists and the agent around it.

Run as root from the repository root with the venv of `bash scripts/install.sh --test`:

    .venv/bin/python benches/first_sync.py 10000 30000
    .venv/bin/python benches/first_sync.py --memory 10000     # bytes held per service
    .venv/bin/python benches/first_sync.py 10000 --policy round-robin [--no-kernel-round-robin] \
        --changes 6                                           # then one service changed

Per N, in a network namespace of its own (removed afterwards): N Services and N
EndpointSlices (3 endpoints each, the objects of `control_plane_scale.py`, decoded from
JSON as the API client hands them over) are translated (`parse_service`,
`parse_endpoint_slice`), merged into specs (`service_endpoints`, the source's rebuild),
then one full `ServiceSync.sync` with pykp's real rules: "sync" is all of it, "load" the
part that puts the elements into the kernel (`RuleManager.load_elements`). GC off, as in
the agent. `--memory` traces the Python allocations instead (slower): bytes per service
held by the source's objects and specs, and by the sync's state. `--changes K` then times
K syncs of one changed service (its endpoints 3 -> 1 -> 3 ...: with the kernel's
round-robin its chain is rewritten each time), the engine and the kernel's commits included.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import time
import tracemalloc
from dataclasses import replace
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))

from control_plane_scale import _cluster_ip, _pods  # noqa: E402

NAMESPACE = f"pykp-first-sync-{os.getpid()}"


def _objects(count: int) -> tuple[list[Any], list[Any]]:
    from pykp.labs.kube_apiserver import endpoint_slice, service

    services = [service(f"svc-{i}", _cluster_ip(i), namespace="ns") for i in range(count)]
    slices = [
        endpoint_slice(f"svc-{i}-1", f"svc-{i}", _pods(i), namespace="ns") for i in range(count)
    ]
    for obj in services:
        obj["metadata"]["creationTimestamp"] = "2026-11-30T00:00:00Z"
    return json.loads(json.dumps(services)), json.loads(json.dumps(slices))


def _rss_mib() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) // 1024
    return 0


def inner(
    count: int,
    memory: bool,
    policy: str = "random",
    kernel_round_robin: bool = True,
    changes: int = 0,
) -> dict[str, Any]:
    from pykp._fastpath import Engine
    from pykp.agent.sync import NodeContext, ServiceSync
    from pykp.model import Catalog
    from pykp.netfilter.rules import MarkLayout, RuleManager
    from pykp.sources.kube.translate import (
        parse_endpoint_slice,
        parse_service,
        service_endpoints,
    )

    service_objects, slice_objects = _objects(count)
    gc.disable()
    if memory:
        tracemalloc.start()
    started = time.perf_counter()
    parsed = {}
    for obj in service_objects:
        service, _ = parse_service(obj, policy)
        assert service is not None
        parsed[service.key] = service
    slices_of: dict[str, dict[str, Any]] = {}
    for obj in slice_objects:
        piece, _ = parse_endpoint_slice(obj)
        assert piece is not None
        slices_of.setdefault(piece.service_key, {})[obj["metadata"]["name"]] = piece
    del service_objects, slice_objects
    translated = time.perf_counter()
    held_parsed = tracemalloc.get_traced_memory()[0] if memory else 0
    specs = {
        key: service.spec.with_endpoints(service_endpoints(service.spec, slices_of.get(key, {})))
        for key, service in parsed.items()
    }
    catalog = Catalog(
        services=tuple(specs.values()),
        default_policy="random",
        traffic_policies=True,
        by_key=dict(specs),
    )
    rebuilt = time.perf_counter()
    held_specs = tracemalloc.get_traced_memory()[0] if memory else 0
    layout = MarkLayout()
    rules = RuleManager(layout)
    rules.install()
    loads: list[float] = []
    load = rules.load_elements

    def timed_load(wanted: Any) -> int:
        begun = time.perf_counter()
        sent = load(wanted)
        loads.append(time.perf_counter() - begun)
        return sent

    rules.load_elements = timed_load  # type: ignore[method-assign]
    engine = Engine(default_policy=policy, max_backend_id=layout.max_backend_id)
    sync = ServiceSync(
        engine,
        rules,
        layout,
        kernel_random=True,
        kernel_round_robin=kernel_round_robin,
        allow_node_address_service_ips=False,
    )
    context = NodeContext("node", ("192.0.2.1",), frozenset({"192.0.2.1"}), True, None, "random")
    begun = time.perf_counter()
    result = sync.sync(catalog, None, context)
    synced = time.perf_counter()
    change_ms: list[float] = []
    key = next(iter(specs))
    whole = specs[key]
    for i in range(changes):
        specs[key] = replace(
            whole, endpoints=whole.endpoints[:1] if i % 2 == 0 else whole.endpoints
        )
        changed = replace(catalog, services=tuple(specs.values()), by_key=dict(specs))
        begun_change = time.perf_counter()
        sync.sync(changed, {key}, context)
        change_ms.append(round((time.perf_counter() - begun_change) * 1000, 2))
    try:
        if memory:
            held_sync = tracemalloc.get_traced_memory()[0]
            tracemalloc.stop()
            return {
                "services": count,
                "source_bytes_per_service": round(held_specs / count),
                "of_which_parsed_objects": round(held_parsed / count),
                "sync_bytes_per_service": round((held_sync - held_specs) / count),
            }
        return {
            "services": count,
            "translate_s": round(translated - started, 3),
            "rebuild_s": round(rebuilt - translated, 3),
            "sync_s": round(synced - begun, 3),
            "load_s": round(loads[0], 3) if loads else None,
            "elements": result.elements_added,
            "rss_mib": _rss_mib(),
            **({"change_ms": change_ms} if changes else {}),
        }
    finally:
        rules.cleanup()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("counts", nargs="+", type=int)
    parser.add_argument("--memory", action="store_true", help="bytes held per service")
    parser.add_argument("--policy", default="random", help="the services' policy")
    parser.add_argument(
        "--kernel-round-robin",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="round-robin rotated in the kernel (pykp run's default) or queued to the reader",
    )
    parser.add_argument("--changes", type=int, default=0, help="then time K one-service syncs")
    parser.add_argument("--inner", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.inner:
        result = inner(
            args.counts[0], args.memory, args.policy, args.kernel_round_robin, args.changes
        )
        print(json.dumps(result), flush=True)
        return
    if os.geteuid() != 0:
        sys.exit("needs root (a network namespace)")
    for count in args.counts:
        subprocess.run(["ip", "netns", "add", NAMESPACE], check=True)
        try:
            subprocess.run(["ip", "-n", NAMESPACE, "link", "set", "lo", "up"], check=True)
            command = [sys.executable, __file__, "--inner", str(count)]
            if args.memory:
                command.append("--memory")
            command += ["--policy", args.policy, "--changes", str(args.changes)]
            if not args.kernel_round_robin:
                command.append("--no-kernel-round-robin")
            subprocess.run(["ip", "netns", "exec", NAMESPACE, *command], check=True)
        finally:
            subprocess.run(["ip", "netns", "del", NAMESPACE], check=False)


if __name__ == "__main__":
    main()
