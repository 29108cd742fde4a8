"""The multi-node simulation as a picture: each backend's cumulative share against the
number of connections, one panel per compared policy (random, round-robin, Maglev) and one
row per service, with the band of the fair share +- the tolerance."""

from __future__ import annotations

from pathlib import Path

from pykp.labs.simulate_nodes import COMPARED_POLICIES, DEFAULT_TOLERANCE, NodesSimulation

MATPLOTLIB_MISSING = (
    "matplotlib is not installed (pip install 'pykp[bench]' or pip install matplotlib)"
)


def plot_shares(result: NodesSimulation, path: Path) -> str | None:
    """Write a PNG; returns None, or why it was skipped (matplotlib missing)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return MATPLOTLIB_MISSING
    rows = max(1, len(result.runs))
    columns = len(COMPARED_POLICIES)
    figure, axes = plt.subplots(
        rows,
        columns,
        figsize=(4.2 * columns, 3.0 * rows),
        squeeze=False,
        sharey=True,
        layout="constrained",  # leaves room for the suptitle, unlike tight_layout
    )
    for row, run in enumerate(result.runs):
        for column, policy in enumerate(COMPARED_POLICIES):
            compared = result.compared[policy][row]
            ax = axes[row][column]
            connections = range(1, len(compared.steps) + 1)
            for index, (backend, shares) in enumerate(compared.share_series().items()):
                ax.plot(
                    connections,
                    [100 * share for share in shares],
                    label=backend,
                    color=f"C{index % 10}",
                    linewidth=1,
                )
                fair = compared.fair_shares.get(backend)
                if fair is not None:
                    low, high = (100 * fair * (1 + sign * DEFAULT_TOLERANCE) for sign in (-1, 1))
                    ax.axhspan(low, high, color=f"C{index % 10}", alpha=0.12)
            converged = compared.converged_at()
            if converged is not None:
                ax.axvline(converged, color="grey", linestyle="--", linewidth=0.8)
            ax.set_xscale("log")
            ax.set_ylim(0, 100)
            ax.set_title(
                f"{run.service}\n{policy}: within ±{100 * DEFAULT_TOLERANCE:g} % "
                + (f"from {converged}" if converged is not None else "not reached"),
                fontsize=8,
            )
            ax.set_xlabel("connections", fontsize=8)
            if column == 0:
                ax.set_ylabel("cumulative share %", fontsize=8)
            ax.tick_params(labelsize=7)
            ax.legend(fontsize=6, loc="best")
    figure.suptitle(
        f"{len(result.nodes)} nodes, one engine each (schedule {result.schedule}, "
        f"seed {result.seed})",
        fontsize=9,
    )
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return None
