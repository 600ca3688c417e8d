//! The training engine every repair method reuses:
//! - [`input`]: u8 HWC images → normalized NCHW tensors; CIFAR's random crop + flip;
//! - [`optim`]: SGD with momentum, Nesterov and weight decay, PyTorch's update rule;
//! - [`schedule`]: AugMix's cosine learning-rate schedule, per step;
//! - [`loss`]: cross-entropy, soft-label cross-entropy, AugMix's Jensen–Shannon consistency;
//! - [`trainer`]: epochs over a [`trainer::BatchSource`] (the method's augmentation), early
//!   stopping, resumable checkpoints;
//! - [`evaluate`]: accuracy, per-class accuracy, confusion matrix, loss, predictions.

pub mod bench;
pub mod evaluate;
pub mod gpu_usage;
pub mod init;
pub mod input;
pub mod loss;
pub mod optim;
pub mod schedule;
pub mod trainer;

pub use evaluate::{evaluate, Evaluation};
pub use init::seeded_var_builder;
pub use trainer::{
    train, BatchSource, EpochStats, TrainBatch, TrainConfig, TrainData, TrainObserver,
};

/// The device stages compute on: the first CUDA device when built with `cuda` and one is
/// present (or the given ordinal), else the CPU.
pub fn device(gpu: Option<usize>) -> candle_core::Result<candle_core::Device> {
    match gpu {
        Some(ordinal) => candle_core::Device::new_cuda(ordinal),
        None => Ok(candle_core::Device::Cpu),
    }
}
