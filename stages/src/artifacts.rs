//! How datasets and models travel as artifacts: a dataset is `deeprepair_data::Dataset`'s
//! compact encoding; a model is a safetensors file with the PyTorch `state_dict` names (so an
//! exported model loads in PyTorch) whose metadata carries [`ModelInfo`].

use anyhow::{bail, Context};
use candle_core::{Device, Tensor};
use candle_nn::VarMap;
use deeprepair_data::Dataset;
use deeprepair_nn::{Arch, Classifier};
use deeprepair_pipeline::{Artifact, ArtifactHeader, ArtifactKind};
use serde::{Deserialize, Serialize};
use serde_json::json;
use std::collections::HashMap;

/// What a dataset artifact is, for evaluation records and `inspect`.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct DatasetInfo {
    /// "clean", a corruption name (Dv_k, all severities), "failures:<corruption>" (De_k) or
    /// "collected:<corruption>" (Dc_k); None for training data.
    pub eval_set: Option<String>,
    pub corruption: Option<String>,
    pub severities: Vec<u8>,
}

pub fn dataset_artifact(ds: &Dataset, info: &DatasetInfo) -> Artifact {
    let meta = json!({
        "n": ds.len(),
        "height": ds.height,
        "width": ds.width,
        "classes": ds.class_names,
        "class_counts": ds.class_counts(),
        "info": info,
    });
    Artifact {
        header: ArtifactHeader::new(
            ArtifactKind::Dataset,
            "application/x-deeprepair-dataset",
            "drds",
        )
        .with_meta(meta),
        bytes: ds.to_bytes(),
    }
}

pub fn read_dataset(artifact: &Artifact) -> anyhow::Result<(Dataset, DatasetInfo)> {
    if artifact.header.kind != ArtifactKind::Dataset {
        bail!(
            "expected a dataset artifact, got a {}",
            artifact.header.kind.as_str()
        );
    }
    let ds = Dataset::from_bytes(&artifact.bytes)?;
    let info = serde_json::from_value(artifact.header.meta["info"].clone()).unwrap_or_default();
    Ok((ds, info))
}

/// A data set paired with a model must have the model's classes, in its order: otherwise a
/// label would name another class than the model's output of the same index, and accuracies
/// would be wrong without a word. `what` names the input for the message.
pub fn ensure_same_classes(model: &ModelInfo, ds: &Dataset, what: &str) -> anyhow::Result<()> {
    if model.class_names != ds.class_names {
        bail!(
            "{what} has the classes [{}] but the model ({}, {}) was trained on [{}]; pair a \
             model with data of its own classes in its order (the dataset stage's class_names)",
            ds.class_names.join(", "),
            model.arch,
            model.method,
            model.class_names.join(", ")
        );
    }
    Ok(())
}

/// What a model artifact is: enough to rebuild it and to label its evaluations.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ModelInfo {
    pub arch: String,
    pub num_classes: usize,
    pub class_names: Vec<String>,
    /// "base" for a pretrained or imported model, else the repair method.
    pub method: String,
    pub variant: Option<String>,
    pub repaired_for: Option<String>,
    pub seed: u64,
    pub parameters: usize,
}

impl ModelInfo {
    pub fn arch(&self) -> anyhow::Result<Arch> {
        Arch::from_name(&self.arch).with_context(|| format!("unknown architecture '{}'", self.arch))
    }
}

/// Sorted (name, tensor) pairs of a VarMap, on the CPU.
fn named_tensors(varmap: &VarMap) -> anyhow::Result<Vec<(String, Tensor)>> {
    let data = varmap.data().lock().expect("varmap lock");
    let mut out: Vec<(String, Tensor)> = data
        .iter()
        .map(|(k, v)| Ok((k.clone(), v.as_tensor().to_device(&Device::Cpu)?)))
        .collect::<anyhow::Result<_>>()?;
    out.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(out)
}

pub fn model_artifact(varmap: &VarMap, info: &ModelInfo) -> anyhow::Result<Artifact> {
    let meta = HashMap::from([("deeprepair".to_string(), serde_json::to_string(info)?)]);
    let bytes = safetensors::serialize(named_tensors(varmap)?, Some(meta))?;
    Ok(Artifact {
        header: ArtifactHeader::new(
            ArtifactKind::Model,
            "application/x-safetensors",
            "safetensors",
        )
        .with_meta(serde_json::to_value(info)?),
        bytes,
    })
}

/// A model's info, variables and network, from an artifact (ours) or safetensors bytes with
/// the architecture's PyTorch names (a user's). Missing, unexpected or mis-shaped tensors are
/// all listed in the error.
pub fn load_model(
    bytes: &[u8],
    info: &ModelInfo,
    device: &Device,
) -> anyhow::Result<(VarMap, Box<dyn Classifier>)> {
    let arch = info.arch()?;
    let source = std::path::Path::new("the model");
    deeprepair_nn::load_weights_from_buffer(arch, info.num_classes, bytes, source, device).map_err(
        |e| match e {
            deeprepair_nn::LoadError::Mismatch { problems, .. } => {
                let list: Vec<String> = problems.iter().map(|p| format!("  {p}")).collect();
                anyhow::anyhow!(
                    "weights do not fit {} ({} classes):\n{}",
                    arch.name(),
                    info.num_classes,
                    list.join("\n")
                )
            }
            other => other.into(),
        },
    )
}

pub fn read_model_info(artifact: &Artifact) -> anyhow::Result<ModelInfo> {
    if artifact.header.kind != ArtifactKind::Model {
        bail!(
            "expected a model artifact, got a {}",
            artifact.header.kind.as_str()
        );
    }
    serde_json::from_value(artifact.header.meta.clone())
        .context("model artifact without model info")
}
