"""`pykp bench`: pykp against kube-proxy's iptables and nftables modes and no proxy at all,
on identical lab nodes, in one run, interleaved round by round.

One module per job: `contenders` (what is compared, and the interface a new datapath
implements), `rulegen` (kube-proxy's rule sets), `loadgen` (the Rust load generator and
iperf3), `workloads` (the measurements), `runner` (rounds and raw samples), `report`
(medians, spreads, ratios, targets; tables, JSON, plot).
"""

from pykp.bench.runner import DEFAULT_CONTENDERS, BenchSettings, run_bench

__all__ = ["DEFAULT_CONTENDERS", "BenchSettings", "run_bench"]
