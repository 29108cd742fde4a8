"""pykp: a Kubernetes node service proxy with a Rust fast path and a Python control plane.

Importing the package stays cheap: the Rust extension (`pykp._fastpath`) is imported only
by the code that needs it, so `pykp --help` and `pykp validate` work without it; the
version is looked up when asked for (`importlib.metadata` scans the installed
distributions: ~35 ms of every start).
"""

from __future__ import annotations

__all__ = ["__version__"]


def __getattr__(name: str) -> str:
    if name != "__version__":
        raise AttributeError(f"module 'pykp' has no attribute {name!r}")
    from importlib.metadata import PackageNotFoundError, version

    try:
        found = version("pykp")
    except PackageNotFoundError:  # running from a source tree that was never installed
        found = "0.0.0+unknown"
    globals()["__version__"] = found
    return found
