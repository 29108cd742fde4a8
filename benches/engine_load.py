"""Loading N services into the engine: seconds and memory, per policy (no kernel, no root).

Run from the repository root with pykp installed:

    python benches/engine_load.py 10000 maglev
    python benches/engine_load.py 100000 random

N services of one ClusterIP port and 3 backends each (drawn from 60,000 addresses, as
`benches/control_plane_scale.py` does) go into a fresh `Engine` in one `apply`: the time it
took and the process's RSS growth. Then, with `--decide K`, one new connection to each of
the first K services (Maglev builds a service's table there) and the RSS growth again; with
`--changes K`, K one-service changes (one backend replaced), each staged and committed
alone: the median and 99th percentile of one, the Python call included.
"""

from __future__ import annotations

import argparse
import statistics
import time

from pykp._fastpath import Backend, Engine, Frontend, ServiceUpdate


def _rss_mib() -> float:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * 4096 / 2**20


def _ip(base: int, index: int) -> str:
    return f"10.{base + index // 65536}.{index // 256 % 256}.{index % 256}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("count", type=int)
    parser.add_argument("policy", choices=["random", "round-robin", "maglev", "least-conn"])
    parser.add_argument("--table-size", type=int, default=65537, help="Maglev's M")
    parser.add_argument("--decide", type=int, default=0, help="services given a connection")
    parser.add_argument("--changes", type=int, default=0, help="one-service changes timed")
    args = parser.parse_args()
    engine = Engine(default_policy=args.policy, maglev_table_size=args.table_size)
    updates = [
        ServiceUpdate(
            f"ns/svc-{i}:http",
            [Frontend(_ip(96, i), 80)],
            [Backend(_ip(244, (i * 3 + k) % 60000), 8080) for k in range(3)],
        )
        for i in range(args.count)
    ]
    before = _rss_mib()
    began = time.perf_counter()
    engine.apply(updates, [])
    took = time.perf_counter() - began
    print(
        f"{args.policy}, {args.count} services: apply {took:.2f} s, "
        f"RSS +{_rss_mib() - before:.0f} MiB"
    )
    if args.changes:
        seconds = []
        for j in range(args.changes):
            i = (j * 7919) % args.count
            pool = [_ip(244, (i * 3 + k) % 60000) for k in range(2)] + [_ip(252, j)]
            update = ServiceUpdate(
                f"ns/svc-{i}:http", [Frontend(_ip(96, i), 80)], [Backend(ip, 8080) for ip in pool]
            )
            began = time.perf_counter()
            engine.commit(engine.stage([update], []))
            seconds.append(time.perf_counter() - began)
        seconds.sort()
        print(
            f"  one service changed: p50 {statistics.median(seconds) * 1e6:.0f} us, "
            f"p99 {seconds[int(len(seconds) * 0.99)] * 1e6:.0f} us ({args.changes} changes)"
        )
    if args.decide:
        before = _rss_mib()
        began = time.perf_counter()
        for i in range(min(args.decide, args.count)):
            engine.decide("10.0.0.1", 40000 + i % 20000, _ip(96, i), 80, "TCP")
        took = time.perf_counter() - began
        print(
            f"  a new connection to each of {min(args.decide, args.count)} services: "
            f"{took:.2f} s, RSS +{_rss_mib() - before:.0f} MiB"
        )


if __name__ == "__main__":
    main()
