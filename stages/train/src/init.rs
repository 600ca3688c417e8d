//! Seeded weight initialization. candle's CPU device cannot be seeded, so a `VarMap` built the
//! usual way starts from different weights every run; stage outputs must be a function of
//! their key. This backend draws each variable from the same distribution candle's `Init`
//! describes, with an RNG seeded by `(seed, variable name)` — independent of creation order.

use crate::trainer::mix_seed;
use candle_core::{DType, Device, Result, Shape, Tensor, Var};
use candle_nn::init::NormalOrUniform;
use candle_nn::var_builder::SimpleBackend;
use candle_nn::{Init, VarBuilder, VarMap};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, Normal, Uniform};

struct SeededVarMap {
    varmap: VarMap,
    seed: u64,
}

fn name_seed(seed: u64, name: &str) -> u64 {
    let h = fnv1a(name.as_bytes());
    mix_seed(&[seed, h])
}

/// FNV-1a: a stable hash of the variable name (no dependency needed for 64 bits).
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &b| {
        (h ^ b as u64).wrapping_mul(0x0100_0000_01b3)
    })
}

fn draw(shape: &Shape, init: Init, seed: u64) -> Result<Vec<f64>> {
    let n = shape.elem_count();
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let uniform = |lo: f64, up: f64, rng: &mut ChaCha8Rng| -> Result<Vec<f64>> {
        let d = Uniform::new(lo, up).map_err(|e| candle_core::Error::Msg(e.to_string()))?;
        Ok((0..n).map(|_| d.sample(rng)).collect())
    };
    let normal = |mean: f64, std: f64, rng: &mut ChaCha8Rng| -> Result<Vec<f64>> {
        let d = Normal::new(mean, std).map_err(|e| candle_core::Error::Msg(e.to_string()))?;
        Ok((0..n).map(|_| d.sample(rng)).collect())
    };
    match init {
        Init::Const(v) => Ok(vec![v; n]),
        Init::Uniform { lo, up } => uniform(lo, up, &mut rng),
        Init::Randn { mean, stdev } => normal(mean, stdev, &mut rng),
        Init::Kaiming {
            dist,
            fan,
            non_linearity,
        } => {
            let std = non_linearity.gain() / (fan.for_shape(shape) as f64).sqrt();
            match dist {
                NormalOrUniform::Uniform => {
                    let bound = 3f64.sqrt() * std;
                    uniform(-bound, bound, &mut rng)
                }
                NormalOrUniform::Normal => normal(0.0, std, &mut rng),
            }
        }
    }
}

impl SimpleBackend for SeededVarMap {
    fn get(&self, s: Shape, name: &str, init: Init, dtype: DType, dev: &Device) -> Result<Tensor> {
        let mut data = self.varmap.data().lock().expect("varmap lock");
        if let Some(var) = data.get(name) {
            if var.shape() != &s {
                candle_core::bail!(
                    "variable {name}: shape {:?} requested, {:?} exists",
                    s,
                    var.shape()
                );
            }
            return Ok(var.as_tensor().clone());
        }
        let values = draw(&s, init, name_seed(self.seed, name))?;
        let t = Tensor::from_vec(values, s, &Device::Cpu)?
            .to_dtype(dtype)?
            .to_device(dev)?;
        let var = Var::from_tensor(&t)?;
        data.insert(name.to_string(), var.clone());
        Ok(var.as_tensor().clone())
    }

    fn get_unchecked(&self, name: &str, _dtype: DType, _dev: &Device) -> Result<Tensor> {
        candle_core::bail!("variable {name} needs a shape to be created")
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.varmap
            .data()
            .lock()
            .expect("varmap lock")
            .contains_key(name)
    }
}

/// A `VarBuilder` creating variables in `varmap` with weights drawn from `seed`.
pub fn seeded_var_builder(
    varmap: &VarMap,
    seed: u64,
    dtype: DType,
    device: &Device,
) -> VarBuilder<'static> {
    VarBuilder::from_backend(
        Box::new(SeededVarMap {
            varmap: varmap.clone(),
            seed,
        }),
        dtype,
        device.clone(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_seed_same_weights_other_seed_other_weights_and_kaiming_scale() {
        let make = |seed| {
            let vm = VarMap::new();
            let vb = seeded_var_builder(&vm, seed, DType::F32, &Device::Cpu);
            let t = vb
                .get_with_hints(
                    (64, 32, 3, 3),
                    "conv.weight",
                    candle_nn::init::DEFAULT_KAIMING_NORMAL,
                )
                .unwrap();
            t.flatten_all().unwrap().to_vec1::<f32>().unwrap()
        };
        let (a, b, c) = (make(1), make(1), make(2));
        assert_eq!(a, b);
        assert_ne!(a, c);
        let var = a.iter().map(|v| (*v as f64).powi(2)).sum::<f64>() / a.len() as f64;
        let expect = 2.0 / (32.0 * 9.0); // ReLU gain² / fan_in
        assert!((var / expect - 1.0).abs() < 0.05, "{var} vs {expect}");
    }
}
