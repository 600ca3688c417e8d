//! The ML stage kinds, registered into the pipeline's [`Registry`]: thin glue from stage
//! params and artifacts to the libraries beside this crate (`data`, `corrupt`, `nn`, `train`,
//! `repair`, `report`).
//!
//! The experiment DAG: `dataset` → `pretrain` → (`corrupt` → `select-failures`) → a repair
//! method (`finetune`, `cutout`, `mixup`, `cutmix`, `sensei`, `augmix`, `fsgmix`,
//! `deeprepair`) → `evaluate` → `report`.

pub mod artifacts;
pub mod data_kinds;
pub mod methods;
pub mod model_kinds;
pub mod report_kind;
pub mod stage_training;
pub mod style;
pub mod style_check;

use deeprepair_pipeline::{Artifact, ArtifactKind, Registry};
use std::path::{Path, PathBuf};

/// Registers every ML stage kind.
pub fn register(registry: &mut Registry) {
    registry.register(data_kinds::DatasetKind);
    registry.register(data_kinds::CorruptKind);
    registry.register(data_kinds::DegradeKind);
    registry.register(data_kinds::Cifar10cKind);
    registry.register(model_kinds::PretrainKind);
    registry.register(model_kinds::ImportModelKind);
    registry.register(model_kinds::SelectFailuresKind);
    registry.register(model_kinds::EvaluateKind);
    for m in methods::all() {
        registry.register(methods::RepairKind(m));
    }
    registry.register(report_kind::ReportKind);
    registry.register(style_check::StyleCheckKind);
}

/// Extra human-friendly files `export` writes for artifacts this crate understands: a contact
/// sheet PNG of a dataset's first images, a PNG curve of a training history, the unpacked
/// files of a report. Returns the paths written.
pub fn export_extra(artifact: &Artifact, dir: &Path, stem: &str) -> anyhow::Result<Vec<PathBuf>> {
    let mut written = Vec::new();
    match artifact.header.kind {
        ArtifactKind::Dataset => {
            let (ds, _) = artifacts::read_dataset(artifact)?;
            let n = ds.len().min(64);
            let images: Vec<&[u8]> = (0..n).map(|i| ds.image(i)).collect();
            let png =
                deeprepair_report::contact_sheet(&images, ds.width, ds.height, 8, 2, &[], &[])?;
            let path = dir.join(format!("{stem}.png"));
            std::fs::write(&path, png)?;
            written.push(path);
        }
        ArtifactKind::Metrics if artifact.header.meta["curve"] == true => {
            let png = training_curve_png(artifact)?;
            let path = dir.join(format!("{stem}.png"));
            std::fs::write(&path, png)?;
            written.push(path);
        }
        ArtifactKind::Report if artifact.header.media_type == "application/x-tar" => {
            let out = dir.join(stem);
            std::fs::create_dir_all(&out)?;
            tar::Archive::new(artifact.bytes.as_slice()).unpack(&out)?;
            written.push(out);
        }
        _ => {}
    }
    Ok(written)
}

/// The PNG plot of a training history (a training stage's metrics, header `curve: true`):
/// train loss and train accuracy by epoch.
pub fn training_curve_png(artifact: &Artifact) -> anyhow::Result<Vec<u8>> {
    let v: serde_json::Value = serde_json::from_slice(&artifact.bytes)?;
    let history: Vec<deeprepair_train::EpochStats> = serde_json::from_value(v["history"].clone())?;
    let series = vec![
        (
            "train loss".to_string(),
            history
                .iter()
                .map(|s| ((s.epoch + 1) as f64, s.train_loss))
                .collect(),
        ),
        (
            "train accuracy".to_string(),
            history
                .iter()
                .map(|s| ((s.epoch + 1) as f64, s.train_accuracy))
                .collect(),
        ),
    ];
    Ok(deeprepair_report::plot_curve(
        &series,
        "epoch",
        "loss / accuracy",
    )?)
}
