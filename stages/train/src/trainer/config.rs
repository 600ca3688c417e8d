//! How a run is configured and what it reports: [`TrainConfig`], [`Monitor`], per-epoch
//! [`EpochStats`] to a [`TrainObserver`], and the [`TrainOutcome`].

use crate::optim::SgdConfig;

#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct TrainConfig {
    pub epochs: usize,
    pub batch_size: usize,
    pub sgd: SgdConfig,
    /// The cosine schedule's floor (AugMix: 1e-6).
    pub min_lr: f64,
    pub seed: u64,
    /// Stop when the monitored validation score has not improved for this many epochs
    /// (the official DeepRepair code: 5 on the validation loss). Needs validation data. The
    /// cosine schedule still spans `epochs`: a run that stops early ends above `min_lr`, and
    /// [`TrainOutcome::stopped_early_at_lr`] says at which rate.
    pub patience: Option<usize>,
    /// What "best epoch" means, for early stopping and for [`TrainConfig::keep_best`].
    #[serde(default)]
    pub monitor: Monitor,
    /// With validation data, end with the weights of the best epoch by `monitor` (both papers
    /// keep the pretrained base of best validation accuracy); otherwise the last epoch's.
    #[serde(default)]
    pub keep_best: bool,
    /// Weight of the JS consistency term for 3-view sources (AugMix: 12).
    pub jsd_lambda: f64,
    /// Batches built ahead on a producer thread while the current step trains (0: build each
    /// batch in the loop). Does not change results; ignored for sources that consult the model.
    #[serde(default = "default_prefetch")]
    pub prefetch: usize,
    /// Data-parallel runs: training-mode BatchNorm normalizes with the statistics of the whole
    /// global batch, reduced across ranks (PyTorch's `SyncBatchNorm`), instead of each rank's
    /// shard (DDP's default). No effect on one rank.
    #[serde(default)]
    pub sync_batch_norm: bool,
}

/// [`TrainConfig::prefetch`]'s default.
pub const DEFAULT_PREFETCH: usize = 2;

pub(super) fn default_prefetch() -> usize {
    DEFAULT_PREFETCH
}

impl Default for TrainConfig {
    fn default() -> Self {
        TrainConfig {
            epochs: 10,
            batch_size: 128,
            sgd: SgdConfig::default(),
            min_lr: 1e-6,
            seed: 0,
            patience: None,
            monitor: Monitor::ValLoss,
            keep_best: false,
            jsd_lambda: 12.0,
            prefetch: DEFAULT_PREFETCH,
            sync_batch_norm: false,
        }
    }
}

/// The validation score that decides the best epoch.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Monitor {
    /// Lower clean validation loss is better (early stopping in the official DeepRepair code).
    #[default]
    ValLoss,
    /// Higher clean validation accuracy is better (how both papers pick the pretrained base).
    ValAccuracy,
}

impl Monitor {
    pub const NAMES: [&'static str; 2] = ["val_loss", "val_accuracy"];

    pub fn from_name(name: &str) -> Option<Monitor> {
        match name {
            "val_loss" => Some(Monitor::ValLoss),
            "val_accuracy" => Some(Monitor::ValAccuracy),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Monitor::ValLoss => "val_loss",
            Monitor::ValAccuracy => "val_accuracy",
        }
    }

    /// The monitored score of an epoch, oriented so that lower is better.
    pub(super) fn score(self, val_loss: f64, val_accuracy: f64) -> f64 {
        match self {
            Monitor::ValLoss => val_loss,
            Monitor::ValAccuracy => -val_accuracy,
        }
    }
}

#[derive(Clone, Debug, serde::Serialize, serde::Deserialize, PartialEq)]
pub struct EpochStats {
    pub epoch: usize,
    pub train_loss: f64,
    pub train_accuracy: f64,
    pub val_loss: Option<f64>,
    pub val_accuracy: Option<f64>,
    pub lr: f64,
    pub images_per_second: f64,
}

/// Where the loop reports progress and hands over checkpoints; an error stops training
/// (cancellation).
pub trait TrainObserver {
    fn step(&mut self, _done: usize, _total: usize) -> anyhow::Result<()> {
        Ok(())
    }
    /// After each epoch, with the bytes to resume from.
    fn epoch(&mut self, _stats: &EpochStats, _checkpoint: &[u8]) -> anyhow::Result<()> {
        Ok(())
    }
}

impl TrainObserver for () {}

#[derive(Clone, Debug, Default, serde::Serialize, serde::Deserialize)]
pub(super) struct Progress {
    pub(super) next_epoch: usize,
    /// The best epoch's monitored score, lower is better ([`Monitor::score`]).
    #[serde(alias = "best_val_loss")]
    pub(super) best_score: Option<f64>,
    pub(super) best_epoch: Option<usize>,
    pub(super) epochs_since_best: usize,
    pub(super) history: Vec<EpochStats>,
    pub(super) stopped_early: bool,
}

#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct TrainOutcome {
    pub history: Vec<EpochStats>,
    /// The epochs the cosine schedule was planned over.
    #[serde(default)]
    pub planned_epochs: usize,
    pub stopped_early: bool,
    /// When early stopping ended the run: the learning rate of its last step (above the
    /// schedule's floor: the run was not fully annealed).
    #[serde(default)]
    pub stopped_early_at_lr: Option<f64>,
    /// What chose `best_epoch`.
    #[serde(default)]
    pub monitor: Option<Monitor>,
    /// The epoch whose weights the model holds when the best epoch was kept (early stopping or
    /// `keep_best`); `None`: the last epoch's.
    pub best_epoch: Option<usize>,
}

impl TrainOutcome {
    /// One line for the stage log and the record: how the run ended and which weights it kept.
    pub fn summary(&self) -> String {
        let ran = self.history.len();
        let mut s = match (self.stopped_early, self.stopped_early_at_lr) {
            (true, Some(lr)) => format!(
                "stopped early after epoch {ran} of {} at lr {lr:.2e} (the cosine schedule over \
                 {} epochs was not finished)",
                self.planned_epochs, self.planned_epochs
            ),
            _ => format!("ran all {ran} of {} epochs", self.planned_epochs),
        };
        match (self.best_epoch, self.monitor) {
            (Some(b), Some(m)) => {
                s.push_str(&format!("; kept epoch {} (best {})", b + 1, m.name()))
            }
            _ => s.push_str("; kept the last epoch"),
        }
        s
    }
}
