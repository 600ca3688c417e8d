//! SGD with momentum, Nesterov and weight decay, exactly PyTorch's `torch.optim.SGD` update
//! (candle-nn ships plain SGD and AdamW only):
//! `g = ∇ + wd·p;  b = μ·b + g (b = g on the first step);  g = g + μ·b (Nesterov) or b;  p -= lr·g`.
//! Variables without a gradient (BatchNorm running statistics, frozen layers) are skipped, as
//! PyTorch skips parameters whose `.grad` is None.

use candle_core::backprop::GradStore;
use candle_core::{Result, Tensor, Var};
use candle_nn::VarMap;
use std::collections::HashMap;

#[derive(Clone, Copy, Debug, serde::Serialize, serde::Deserialize)]
pub struct SgdConfig {
    pub lr: f64,
    pub momentum: f64,
    pub weight_decay: f64,
    pub nesterov: bool,
}

impl Default for SgdConfig {
    /// The papers' setting (AugMix `cifar.py`, DeepRepair, FSGMix).
    fn default() -> Self {
        SgdConfig {
            lr: 0.1,
            momentum: 0.9,
            weight_decay: 5e-4,
            nesterov: true,
        }
    }
}

pub struct Sgd {
    /// Sorted by name, so state files and updates are in a stable order.
    vars: Vec<(String, Var)>,
    buffers: HashMap<String, Tensor>,
    pub config: SgdConfig,
}

impl Sgd {
    pub fn new(varmap: &VarMap, config: SgdConfig) -> Self {
        let mut vars: Vec<(String, Var)> = varmap
            .data()
            .lock()
            .expect("varmap lock")
            .iter()
            // BatchNorm running statistics are buffers, never trained, even where a model
            // (candle-transformers' frozen-BN ResNets) lets gradients reach them.
            .filter(|(k, _)| !deeprepair_nn::weights::is_running_stat(k))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        vars.sort_by(|a, b| a.0.cmp(&b.0));
        Sgd {
            vars,
            buffers: HashMap::new(),
            config,
        }
    }

    pub fn set_lr(&mut self, lr: f64) {
        self.config.lr = lr;
    }

    pub fn step(&mut self, grads: &GradStore) -> Result<()> {
        let SgdConfig {
            lr,
            momentum,
            weight_decay,
            nesterov,
        } = self.config;
        for (name, var) in &self.vars {
            let Some(grad) = grads.get(var.as_tensor()) else {
                continue;
            };
            // Detached: the update and the momentum buffer must not record ops (a buffer that
            // did would keep every earlier step's buffer, and what they were computed from,
            // alive for the whole run).
            let grad = grad.detach();
            let mut g = if weight_decay != 0.0 {
                (&grad + (var.as_tensor().detach() * weight_decay)?)?
            } else {
                grad
            };
            if momentum != 0.0 {
                let buf = match self.buffers.get(name) {
                    Some(b) => ((b * momentum)? + &g)?,
                    None => g.clone(),
                };
                g = if nesterov {
                    (g + (&buf * momentum)?)?
                } else {
                    buf.clone()
                };
                self.buffers.insert(name.clone(), buf);
            }
            var.set(&(var.as_tensor() - (g * lr)?)?)?;
        }
        Ok(())
    }

    /// The momentum buffers by variable name (for checkpoints).
    pub fn buffers(&self) -> &HashMap<String, Tensor> {
        &self.buffers
    }

    pub fn load_buffers(&mut self, buffers: HashMap<String, Tensor>) {
        self.buffers = buffers;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device};

    /// A variable `name` of `len` elements, all `value`, registered in `varmap`.
    fn constant(varmap: &VarMap, name: &str, len: usize, value: f64, dtype: DType) -> Tensor {
        let init = candle_nn::Init::Const(value);
        varmap.get((len,), name, init, dtype, &Device::Cpu).unwrap()
    }

    /// The momentum buffers record no ops: if they did, each step's buffer would reference the
    /// previous one and its gradient, and a run's memory would grow with its steps (it did:
    /// ~2.5 MB per tiny-cnn step, 616 MB after 200).
    #[test]
    fn momentum_buffers_do_not_keep_earlier_steps_alive() {
        let varmap = VarMap::new();
        let p = constant(&varmap, "p", 3, 1.0, DType::F32);
        let mut opt = Sgd::new(&varmap, SgdConfig::default());
        for _ in 0..3 {
            let loss = (p.sqr().unwrap().sum_all().unwrap() * 0.5).unwrap();
            let grads = loss.backward().unwrap();
            assert!(grads.get(&p).is_some());
            opt.step(&grads).unwrap();
        }
        let buffer = &opt.buffers()["p"];
        assert!(
            !buffer.track_op(),
            "the momentum buffer records an op graph"
        );
    }

    /// Two steps on f(p) = ½·Σp², by hand: ∇ = p.
    #[test]
    fn two_nesterov_steps_match_hand_computation() {
        let varmap = VarMap::new();
        let p = constant(&varmap, "p", 2, 1.0, DType::F64);
        let cfg = SgdConfig {
            lr: 0.1,
            momentum: 0.9,
            weight_decay: 0.01,
            nesterov: true,
        };
        let mut opt = Sgd::new(&varmap, cfg);
        let mut p_hand = 1.0f64;
        let mut buf: Option<f64> = None;
        for _ in 0..2 {
            let loss = (p.sqr().unwrap().sum_all().unwrap() * 0.5).unwrap();
            opt.step(&loss.backward().unwrap()).unwrap();
            let g = p_hand + 0.01 * p_hand;
            let b = buf.map_or(g, |b| 0.9 * b + g);
            buf = Some(b);
            p_hand -= 0.1 * (g + 0.9 * b);
        }
        let got: Vec<f64> = p.to_vec1().unwrap();
        // step 1: g=1.01, b=1.01, p=1-0.1*(1.01+0.909)=0.8081
        assert!(
            (got[0] - p_hand).abs() < 1e-12 && (got[1] - p_hand).abs() < 1e-12,
            "{got:?} vs {p_hand}"
        );
        assert!((p_hand - 0.8081 * 1.0).abs() > 0.0);
    }

    #[test]
    fn variables_without_gradient_are_untouched() {
        let varmap = VarMap::new();
        let p = constant(&varmap, "p", 1, 2.0, DType::F32);
        let q = constant(&varmap, "running_mean", 1, 3.0, DType::F32);
        let mut opt = Sgd::new(&varmap, SgdConfig::default());
        let loss = p.sum_all().unwrap();
        opt.step(&loss.backward().unwrap()).unwrap();
        assert_eq!(q.to_vec1::<f32>().unwrap(), vec![3.0]);
        assert!(p.to_vec1::<f32>().unwrap()[0] < 2.0);
    }
}
