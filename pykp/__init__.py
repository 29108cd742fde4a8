"""pykp: a Kubernetes node service proxy with a Rust fast path and a Python control plane.

Importing the package stays cheap: the Rust extension (`pykp._fastpath`) is imported only
by the code that needs it, so `pykp --help` and `pykp validate` work without it.
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__: str = version("pykp")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+unknown"

__all__ = ["__version__"]
