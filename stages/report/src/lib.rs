//! The papers' tables and figures from evaluation records.
//!
//! - [`repair_table`]: DeepRepair Table 2 (and FSGMix Table I): per architecture, rows = repair
//!   methods, columns = corruptions, cell = accuracy on the unseen failures `De_k` of the model
//!   repaired for corruption `k`;
//! - [`paired::paired_table`]: each method − AugMix paired by seed, with 95 % intervals;
//! - [`sampling_table`]: DeepRepair Table 3, uniform ("no-cluster") vs cluster-guided sampling;
//! - [`clean_vs_corrupted_table`], [`plot_clean_vs_corrupted`]: Fig. 2/3, clean accuracy and `Dv_k`
//!   accuracy before and after repair;
//! - [`plot_cross_corruption`]: Fig. 4, the model repaired for one corruption evaluated on all;
//! - [`plot_curve`]: training curves; [`contact_sheet`]: grids of images;
//! - [`write_report`]: all of the above into a folder, with a `report.md` linking them.
//!
//! Accuracies are stored as fractions in [0, 1]; Markdown/LaTeX tables and figures show percent
//! (two decimals, like the paper), CSV files keep fractions. Several seeds of one cell are
//! averaged (records of one seed first averaged among themselves); with more than one seed the
//! sample standard deviation is shown as `mean ± std`.
//!
//! Text in figures is rendered by `ab_glyph` (pure Rust) with DejaVu Sans embedded by the `dejavu`
//! crate, so no system font or library is needed.

mod names;
pub mod paired;
mod plots;
mod sheet;
mod stats;
mod tables;
mod write;

use serde::{Deserialize, Serialize};

pub use names::{corruption_abbrev, method_label, CORRUPTIONS, METHOD_ORDER};
pub use plots::{
    plot_clean_vs_corrupted, plot_clean_vs_corrupted_for, plot_cross_corruption, plot_curve,
};
pub use sheet::{contact_sheet, SheetLayout};
pub use tables::{clean_vs_corrupted_table, latex_escape, repair_table, sampling_table};
pub use write::write_report;

/// One evaluation result: a model (base or repaired) on one evaluation set.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Record {
    /// "tiny-cnn", "wrn-40-2"...
    pub arch: String,
    /// "base" for the unrepaired model, else "finetune", "augmix", "deeprepair", "fsgmix", ...
    pub method: String,
    /// e.g. "uniform"/"cluster" for deeprepair, "gmm"/"mvn"/"fixed" for fsgmix.
    #[serde(default)]
    pub variant: Option<String>,
    /// Corruption the model was repaired for (None for base).
    #[serde(default)]
    pub repaired_for: Option<String>,
    /// `"clean"`, `"<corruption>"` (all severities, `Dv_k`), or `"failures:<corruption>"` (`De_k`, the
    /// unseen failures).
    pub eval_set: String,
    pub seed: u64,
    /// In [0, 1].
    pub accuracy: f64,
    /// Images evaluated.
    pub n: usize,
}

/// One table in three formats.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Tables {
    pub markdown: String,
    pub csv: String,
    pub latex: String,
}

/// Why a report, figure or table could not be produced.
#[derive(Debug, thiserror::Error)]
pub enum ReportError {
    /// Nothing to draw: the records hold no data for this figure.
    #[error("no data: {0}")]
    NoData(String),
    /// Arguments that cannot describe a figure (wrong buffer sizes, zero columns, ...).
    #[error("invalid input: {0}")]
    InvalidInput(String),
    /// The drawing library failed.
    #[error("drawing failed: {0}")]
    Draw(String),
    #[error("PNG encoding failed: {0}")]
    Png(#[from] png::EncodingError),
    #[error("{path}: {source}")]
    Io {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("JSON: {0}")]
    Json(#[from] serde_json::Error),
}

/// Evaluation-set name of the unseen failures of corruption `c` (`De_k`).
pub fn failures_set(corruption: &str) -> String {
    format!("failures:{corruption}")
}
