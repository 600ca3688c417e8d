//! The losses: cross-entropy on hard labels, cross-entropy on soft labels (Mixup/CutMix), and
//! AugMix's Jensen–Shannon consistency exactly as its `cifar.py`:
//! `p_mix = clamp((p_c + p_1 + p_2) / 3, 1e-7, 1).log()`,
//! `λ · (KL(p_c‖p_mix) + KL(p_1‖p_mix) + KL(p_2‖p_mix)) / 3` with `F.kl_div(…, 'batchmean')`.

use candle_core::{Result, Tensor, D};
use candle_nn::ops::{log_softmax, softmax};

/// Mean cross-entropy of `[n, classes]` logits against u32 labels `[n]`.
pub fn cross_entropy(logits: &Tensor, labels: &Tensor) -> Result<Tensor> {
    candle_nn::loss::cross_entropy(logits, labels)
}

/// Mean over the batch of `-Σ_c t_c · log softmax(z)_c`, targets `[n, classes]` rows summing to 1.
pub fn soft_cross_entropy(logits: &Tensor, targets: &Tensor) -> Result<Tensor> {
    let n = logits.dim(0)? as f64;
    (log_softmax(logits, D::Minus1)? * targets)?
        .sum_all()?
        .neg()?
        / n
}

/// `λ · JS(p_clean, p_aug1, p_aug2)` as AugMix computes it (λ = 12 in the papers).
pub fn jensen_shannon(clean: &Tensor, aug1: &Tensor, aug2: &Tensor, lambda: f64) -> Result<Tensor> {
    let n = clean.dim(0)? as f64;
    let p_c = softmax(clean, D::Minus1)?;
    let p_1 = softmax(aug1, D::Minus1)?;
    let p_2 = softmax(aug2, D::Minus1)?;
    let log_mix = ((&p_c + &p_1)? + &p_2)?
        .affine(1.0 / 3.0, 0.0)?
        .clamp(1e-7, 1.0)?
        .log()?;
    // F.kl_div(input=log_mix, target=p, 'batchmean') = Σ p·(log p − log_mix) / n, with 0·log 0 = 0.
    let kl = |p: &Tensor| -> Result<Tensor> {
        let log_p = p.clamp(1e-30, 1.0)?.log()?;
        ((log_p - &log_mix)? * p)?.sum_all()? / n
    };
    ((kl(&p_c)? + kl(&p_1)?)? + kl(&p_2)?)? * (lambda / 3.0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn t(v: &[f32], rows: usize) -> Tensor {
        Tensor::from_slice(v, (rows, v.len() / rows), &Device::Cpu).unwrap()
    }

    #[test]
    fn jsd_matches_hand_values() {
        // Logits whose softmaxes are p_c=[0.5,0.5], p_1=[0.8,0.2], p_2=[0.2,0.8] (one sample).
        let l = |p: f32| [p.ln(), (1.0 - p).ln()];
        let (c, a, b) = (t(&l(0.5), 1), t(&l(0.8), 1), t(&l(0.2), 1));
        let got = jensen_shannon(&c, &a, &b, 12.0)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        // mixture = [0.5, 0.5]; KL(p_c‖m) = 0; KL(p_1‖m) = KL(p_2‖m) = 0.8 ln 1.6 + 0.2 ln 0.4.
        let kl = 0.8f64 * (1.6f64).ln() + 0.2 * (0.4f64).ln();
        let expect = 12.0 * (2.0 * kl) / 3.0;
        assert!((got as f64 - expect).abs() < 1e-5, "{got} vs {expect}");
        // Identical predictions: zero.
        let z = jensen_shannon(&a, &a, &a, 12.0)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(z.abs() < 1e-5, "{z}");
    }

    #[test]
    fn soft_cross_entropy_equals_hard_on_one_hot_and_mixes_linearly() {
        let logits = t(&[1.0, 2.0, 0.5, 0.1, 0.2, 3.0], 2);
        let labels = Tensor::new(&[1u32, 2], &Device::Cpu).unwrap();
        let one_hot = t(&[0.0, 1.0, 0.0, 0.0, 0.0, 1.0], 2);
        let hard = cross_entropy(&logits, &labels)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        let soft = soft_cross_entropy(&logits, &one_hot)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!((hard - soft).abs() < 1e-6);
        let half = t(&[0.5, 0.5, 0.0, 0.0, 0.5, 0.5], 2);
        let mixed = soft_cross_entropy(&logits, &half)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        let other = t(&[1.0, 0.0, 0.0, 0.0, 1.0, 0.0], 2);
        let o = soft_cross_entropy(&logits, &other)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!((mixed - 0.5 * (soft + o)).abs() < 1e-6);
    }
}
