//! `loadgen_main`: the bench's load generator, carried by the extension.

use pyo3::prelude::*;

/// `pykp-loadgen ARGS...` (`pykp bench`'s load generator) in this process, GIL released:
/// the wheel's `pykp-loadgen` command, so that a user of the wheel needs no cargo build.
#[pyfunction]
pub(super) fn loadgen_main(py: Python<'_>, args: Vec<String>) {
    py.detach(|| loadgen::run(&args));
}
