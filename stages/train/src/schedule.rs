//! AugMix's learning-rate schedule (`cifar.py`): `LambdaLR` with
//! `cosine_annealing(step, total_steps, 1, 1e-6 / lr)`, stepped every batch.

/// Learning rate at `step` (0-based) of `total_steps`, annealed from `base_lr` to `min_lr`.
pub fn cosine_lr(step: usize, total_steps: usize, base_lr: f64, min_lr: f64) -> f64 {
    if total_steps == 0 {
        return base_lr;
    }
    let t = (step as f64 / total_steps as f64).min(1.0);
    min_lr + (base_lr - min_lr) * 0.5 * (1.0 + (t * std::f64::consts::PI).cos())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn starts_at_base_halves_midway_ends_at_min() {
        assert!((cosine_lr(0, 100, 0.1, 1e-6) - 0.1).abs() < 1e-12);
        assert!((cosine_lr(50, 100, 0.1, 0.0) - 0.05).abs() < 1e-12);
        assert!((cosine_lr(100, 100, 0.1, 1e-6) - 1e-6).abs() < 1e-12);
        assert!(cosine_lr(30, 100, 0.1, 0.0) > cosine_lr(31, 100, 0.1, 0.0));
    }
}
