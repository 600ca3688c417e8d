//! Evaluation in eval mode (BatchNorm running statistics), in large batches, without building
//! a gradient graph.

use crate::input::u8_to_tensor;
use candle_core::{Device, Result, Tensor, D};
use deeprepair_nn::Classifier;

#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct Evaluation {
    pub n: usize,
    pub accuracy: f64,
    pub mean_loss: f64,
    pub per_class_accuracy: Vec<f64>,
    /// `confusion[true][predicted]`.
    pub confusion: Vec<Vec<u64>>,
    /// Predicted class per image, in input order (failure selection reads it).
    pub predictions: Vec<u8>,
}

/// Per-image logits → (predicted class, cross-entropy loss) for a chunk.
fn score_chunk(model: &dyn Classifier, x: &Tensor, labels: &[u8]) -> Result<Vec<(u8, f32)>> {
    let logits = model.forward_t(x, false)?.detach();
    let log_probs = candle_nn::ops::log_softmax(&logits, D::Minus1)?;
    let preds: Vec<u32> = logits.argmax(D::Minus1)?.to_vec1()?;
    let lp: Vec<Vec<f32>> = log_probs.to_vec2()?;
    let classes = lp.first().map_or(0, Vec::len);
    if let Some(&y) = labels.iter().find(|&&y| y as usize >= classes) {
        return Err(candle_core::Error::Msg(format!(
            "label {y} is out of range for a model with {classes} outputs: the data set has \
             more classes than the model"
        )));
    }
    Ok(preds
        .iter()
        .zip(lp.iter().zip(labels))
        .map(|(&p, (row, &y))| (p as u8, -row[y as usize]))
        .collect())
}

/// Per-image predictions and losses of `n` u8 HWC images.
pub fn predict(
    model: &dyn Classifier,
    images: &[u8],
    labels: &[u8],
    (n, h, w): (usize, usize, usize),
    batch: usize,
    device: &Device,
) -> Result<Vec<(u8, f32)>> {
    let per = h * w * 3;
    let mut out = Vec::with_capacity(n);
    for start in (0..n).step_by(batch.max(1)) {
        let end = (start + batch.max(1)).min(n);
        let x = u8_to_tensor(&images[start * per..end * per], end - start, h, w, device)?;
        out.extend(score_chunk(model, &x, &labels[start..end])?);
    }
    Ok(out)
}

/// Accuracy, per-class accuracy, confusion matrix, mean loss and predictions.
#[allow(clippy::too_many_arguments)]
pub fn evaluate(
    model: &dyn Classifier,
    images: &[u8],
    labels: &[u8],
    (n, h, w): (usize, usize, usize),
    num_classes: usize,
    batch: usize,
    device: &Device,
) -> Result<Evaluation> {
    let scored = predict(model, images, labels, (n, h, w), batch, device)?;
    let mut confusion = vec![vec![0u64; num_classes]; num_classes];
    let mut loss = 0f64;
    for (&(p, l), &y) in scored.iter().zip(labels) {
        confusion[y as usize][(p as usize).min(num_classes - 1)] += 1;
        loss += l as f64;
    }
    let correct: u64 = (0..num_classes).map(|c| confusion[c][c]).sum();
    let per_class_accuracy = confusion
        .iter()
        .enumerate()
        .map(|(c, row)| {
            let total: u64 = row.iter().sum();
            if total == 0 {
                f64::NAN
            } else {
                row[c] as f64 / total as f64
            }
        })
        .collect();
    Ok(Evaluation {
        n,
        accuracy: if n == 0 {
            0.0
        } else {
            correct as f64 / n as f64
        },
        mean_loss: if n == 0 { 0.0 } else { loss / n as f64 },
        per_class_accuracy,
        confusion,
        predictions: scored.iter().map(|s| s.0).collect(),
    })
}
