//! The ML stage kinds, registered into the pipeline's [`Registry`]. The libraries they call
//! live beside this crate: `stages/data` (datasets, corruptions) and `stages/nn` (models,
//! training).

use deeprepair_pipeline::{Artifact, Registry};
use std::path::{Path, PathBuf};

/// Registers every ML stage kind.
pub fn register(_registry: &mut Registry) {}

/// Extra human-friendly files `export` writes for artifacts this crate understands (e.g. a
/// PNG of a training curve); returns the paths written.
pub fn export_extra(
    _artifact: &Artifact,
    _dir: &Path,
    _stem: &str,
) -> anyhow::Result<Vec<PathBuf>> {
    Ok(vec![])
}
