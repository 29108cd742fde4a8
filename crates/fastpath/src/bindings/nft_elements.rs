//! `encode_elements`: nf_tables set elements from their text, for `bulk_load.py`.

use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyString};

use super::value_error;
use crate::nft_elements::{Chunks, ElementKind};

/// The elements of `texts` (an iterable of str), of `kind`, in netlink form: chunks of
/// concatenated `NFTA_LIST_ELEM` attributes of at most `max_chunk` bytes each. ValueError
/// for a text that is not of `kind` (naming it), before anything is returned.
#[pyfunction]
#[pyo3(signature = (kind, texts, max_chunk = 60_000))]
pub fn encode_elements<'py>(
    py: Python<'py>,
    kind: &str,
    texts: &Bound<'py, PyAny>,
    max_chunk: usize,
) -> PyResult<Vec<Bound<'py, PyBytes>>> {
    let kind: ElementKind = kind.parse().map_err(value_error)?;
    let mut chunks = Chunks::new(kind, max_chunk);
    for text in texts.try_iter()? {
        let text = text?;
        let text = text.cast::<PyString>()?;
        chunks.push(text.to_str()?).map_err(value_error)?;
    }
    Ok(chunks.finish().iter().map(|chunk| PyBytes::new(py, chunk)).collect())
}
