//! The checkpoint written after every epoch (weights, optimizer buffers, the best weights so
//! far, progress, the batch source's state), from which a killed run resumes.

use super::*;
use crate::optim::Sgd;
use anyhow::Context;
use candle_core::{Device, Tensor};
use candle_nn::VarMap;
use std::collections::HashMap;

pub(super) fn snapshot(varmap: &VarMap) -> HashMap<String, Tensor> {
    varmap
        .data()
        .lock()
        .expect("varmap lock")
        .iter()
        .map(|(k, v)| (k.clone(), v.as_tensor().copy().expect("copy")))
        .collect()
}

pub(super) fn restore(varmap: &VarMap, tensors: &HashMap<String, Tensor>) -> anyhow::Result<()> {
    let data = varmap.data().lock().expect("varmap lock");
    for (name, var) in data.iter() {
        let t = tensors
            .get(name)
            .with_context(|| format!("checkpoint lacks variable {name}"))?;
        var.set(&t.to_device(var.device())?)?;
    }
    Ok(())
}

/// The checkpoint's tensor holding the batch source's state, as bytes.
pub(super) const SOURCE_STATE: &str = "source/state";

pub(super) fn encode_checkpoint(
    varmap: &VarMap,
    opt: &Sgd,
    best: Option<&HashMap<String, Tensor>>,
    progress: &Progress,
    source_state: Option<Vec<u8>>,
) -> anyhow::Result<Vec<u8>> {
    let mut tensors: Vec<(String, Tensor)> = Vec::new();
    for (k, v) in snapshot(varmap) {
        tensors.push((format!("model/{k}"), v.to_device(&Device::Cpu)?));
    }
    for (k, v) in opt.buffers() {
        tensors.push((format!("sgd/{k}"), v.to_device(&Device::Cpu)?));
    }
    if let Some(best) = best {
        for (k, v) in best {
            tensors.push((format!("best/{k}"), v.to_device(&Device::Cpu)?));
        }
    }
    if let Some(state) = source_state {
        let len = state.len();
        tensors.push((
            SOURCE_STATE.to_string(),
            Tensor::from_vec(state, len, &Device::Cpu)?,
        ));
    }
    tensors.sort_by(|a, b| a.0.cmp(&b.0));
    let meta = HashMap::from([("progress".to_string(), serde_json::to_string(progress)?)]);
    Ok(safetensors::serialize(tensors, Some(meta))?)
}

pub(super) type Decoded = (
    HashMap<String, Tensor>,
    HashMap<String, Tensor>,
    Option<HashMap<String, Tensor>>,
    Progress,
);

pub(super) fn decode_checkpoint(bytes: &[u8], device: &Device) -> anyhow::Result<Decoded> {
    let (_, meta) = safetensors::SafeTensors::read_metadata(bytes)?;
    let progress: Progress = serde_json::from_str(
        meta.metadata()
            .as_ref()
            .and_then(|m| m.get("progress"))
            .context("checkpoint without progress metadata")?,
    )?;
    let all = candle_core::safetensors::load_buffer(bytes, device)?;
    let (mut model, mut sgd, mut best) = (HashMap::new(), HashMap::new(), HashMap::new());
    for (k, v) in all {
        if let Some(name) = k.strip_prefix("model/") {
            model.insert(name.to_string(), v);
        } else if let Some(name) = k.strip_prefix("sgd/") {
            sgd.insert(name.to_string(), v);
        } else if let Some(name) = k.strip_prefix("best/") {
            best.insert(name.to_string(), v);
        }
    }
    Ok((model, sgd, (!best.is_empty()).then_some(best), progress))
}

/// Puts the batch source's state from checkpoint `resume` back, if it holds one (checkpoints
/// written before sources had state hold none: the source then starts afresh). Called once,
/// before any rank starts: every rank shares the source.
pub(super) fn restore_source_state(
    source: &dyn BatchSource,
    resume: Option<&[u8]>,
) -> anyhow::Result<()> {
    let Some(bytes) = resume else {
        return Ok(());
    };
    let tensors =
        safetensors::SafeTensors::deserialize(bytes).context("reading the training checkpoint")?;
    if let Ok(state) = tensors.tensor(SOURCE_STATE) {
        source
            .restore_state(state.data())
            .context("restoring the batch source's state from the checkpoint")?;
    }
    Ok(())
}
