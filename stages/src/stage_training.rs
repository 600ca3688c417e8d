//! Glue between the training engine and a stage: the device, progress, checkpoints into the
//! store (a killed stage resumes from its last epoch), cancellation, and the params every
//! training stage shares.

use deeprepair_collective::data_parallel::{Collective, ThreadCollective};
use deeprepair_collective::socket_collective::SocketCollective;
use deeprepair_pipeline::{ParamSpec, ParamType, StageCtx};
use deeprepair_train::trainer::Monitor;
use deeprepair_train::trainer::{
    train_rank, train_with_collectives, BatchSource, Replica, TrainData, TrainJob, TrainObserver,
    TrainOutcome,
};
use deeprepair_train::{EpochStats, TrainConfig};
use serde_json::{json, Value};

/// The first GPU the executor gave this stage (with the `cuda` feature), else the CPU.
pub fn stage_device(ctx: &StageCtx) -> anyhow::Result<candle_core::Device> {
    match ctx.gpus.first() {
        Some(&g) if candle_core::utils::cuda_is_available() => {
            Ok(deeprepair_train::device(Some(g as usize))?)
        }
        _ => Ok(candle_core::Device::Cpu),
    }
}

/// What a stage that runs a model asks of the machine: a GPU per rank (the executor gives
/// none on a CPU-only run, and the stage then runs on the CPU), and its ranks may run as
/// separate worker processes when the run has enough of them.
pub fn model_resources(params: &Value, mem_mb: u64) -> deeprepair_pipeline::Resources {
    let ranks = params["ranks"].as_u64().unwrap_or(1).clamp(1, 64) as u32;
    deeprepair_pipeline::Resources {
        cpus: 2,
        gpus: ranks,
        mem_mb,
        ranks,
    }
}

/// The params every training kind shares. `monitor` is the kind's default for what the best
/// epoch means: `val_accuracy` for the base (both papers keep the pretrained model of best
/// validation accuracy), `val_loss` for repairs (the official DeepRepair code's early stopping).
pub fn training_params(epochs: i64, lr: f64, batch: i64, monitor: Monitor) -> Vec<ParamSpec> {
    vec![
        ParamSpec::optional("epochs", ParamType::Int, json!(epochs), "training epochs"),
        ParamSpec::optional("batch", ParamType::Int, json!(batch), "batch size"),
        ParamSpec::optional(
            "lr",
            ParamType::Float,
            json!(lr),
            "initial learning rate; cosine annealing per step to 1e-6 over all `epochs` (the \
             schedule's horizon is the planned epochs, also when early stopping ends a run sooner)",
        ),
        ParamSpec::optional(
            "momentum",
            ParamType::Float,
            json!(0.9),
            "SGD momentum (Nesterov)",
        ),
        ParamSpec::optional(
            "weight_decay",
            ParamType::Float,
            json!(5e-4),
            "L2 weight decay",
        ),
        ParamSpec::optional(
            "patience",
            ParamType::Int,
            json!(0),
            "early stopping: epochs without improvement of `monitor` on the `validation` input \
             (0: off). A run that stops early was not fully annealed: the stage log and the \
             metrics record the epoch and the learning rate it stopped at",
        ),
        ParamSpec::optional(
            "monitor",
            ParamType::Choice(&Monitor::NAMES),
            json!(monitor.name()),
            "the validation score that picks the best epoch (for `patience` and `keep_best`)",
        ),
        ParamSpec::optional(
            "keep_best",
            ParamType::Bool,
            json!(true),
            "with a `validation` input, the output model holds the best epoch's weights by \
             `monitor` (else the last epoch's)",
        ),
        ParamSpec::optional(
            "seed",
            ParamType::Int,
            json!(0),
            "seed for initialization, shuffling and augmentation",
        ),
        ParamSpec::optional(
            "ranks",
            ParamType::Int,
            json!(1),
            "data-parallel ranks, each taking batch/ranks images of every batch: one GPU each \
             on a run with GPUs (the stage asks for `ranks` GPUs), else threads sharing the CPU; \
             with worker processes (--gpus, --workers N ≥ ranks, --slurm) one process per rank",
        ),
        ParamSpec::optional(
            "sync_batch_norm",
            ParamType::Bool,
            json!(false),
            "with ranks > 1: BatchNorm normalizes with the whole batch's statistics, reduced \
             across ranks (PyTorch's SyncBatchNorm), instead of each rank's shard (DDP's default)",
        ),
    ]
}

/// Checks the shared training params (`validate` of every training kind).
pub fn validate_training_params(params: &Value) -> Result<(), (String, String)> {
    let ranks = params["ranks"].as_i64().unwrap_or(1);
    if !(1..=64).contains(&ranks) {
        return Err(("ranks".into(), format!("{ranks} ranks; expected 1 to 64")));
    }
    let batch = params["batch"].as_i64().unwrap_or(0);
    if batch < 2 * ranks {
        return Err((
            "batch".into(),
            format!(
                "batch {batch} is too small: each of the {ranks} rank(s) needs at least 2 images \
                 (BatchNorm statistics)"
            ),
        ));
    }
    for name in ["epochs", "patience", "seed"] {
        if params[name].as_i64().is_some_and(|v| v < 0) {
            return Err((name.into(), "must not be negative".into()));
        }
    }
    Ok(())
}

/// One device per data-parallel rank this process runs: with `ranks` GPUs given to the stage
/// (and a CUDA build), GPU `ctx.gpus[r]` for rank `r`; without GPUs, the CPU for every rank
/// (threads). A process that is one rank of a gang runs just its own.
pub fn rank_devices(ctx: &StageCtx, ranks: usize) -> anyhow::Result<Vec<candle_core::Device>> {
    if let Some(gang) = ctx.gang() {
        if gang.world_size() != ranks {
            anyhow::bail!(
                "ranks: {ranks}, but this process is rank {} of a gang of {}",
                gang.rank(),
                gang.world_size()
            );
        }
        return Ok(vec![stage_device(ctx)?]);
    }
    if ranks <= 1 {
        return Ok(vec![stage_device(ctx)?]);
    }
    if ctx.gpus.is_empty() || !candle_core::utils::cuda_is_available() {
        return Ok(vec![candle_core::Device::Cpu; ranks]);
    }
    if ctx.gpus.len() < ranks {
        anyhow::bail!(
            "ranks: {ranks} needs {ranks} GPUs (one per rank) but the stage was given {} \
             (GPUs {:?}); give it `resources: {{gpus: {ranks}}}` or lower ranks",
            ctx.gpus.len(),
            ctx.gpus
        );
    }
    ctx.gpus[..ranks]
        .iter()
        .map(|&g| Ok(deeprepair_train::device(Some(g as usize))?))
        .collect()
}

/// A model per rank (rank 0 first): its variables, network and device.
pub type RankModel = (
    candle_nn::VarMap,
    Box<dyn deeprepair_nn::Classifier>,
    candle_core::Device,
);

/// The trainer's view of one rank's model.
fn replica((varmap, model, device): &RankModel) -> Replica<'_> {
    Replica {
        model: &**model,
        varmap,
        device,
    }
}

/// Trains `ranks[0]` (data-parallel over all of `ranks` when there are several), resuming from
/// the stage's checkpoint and reporting progress through the stage; the log's last line says
/// how the run ended (all epochs, or stopped early at which learning rate) and which epoch's
/// weights it kept.
pub fn run_training(
    ctx: &mut StageCtx,
    ranks: &[RankModel],
    data: &TrainData,
    validation: Option<&TrainData>,
    source: &dyn BatchSource,
    config: &TrainConfig,
) -> anyhow::Result<TrainOutcome> {
    let outcome = train_ranks(ctx, ranks, data, validation, source, config)?;
    ctx.log(outcome.summary());
    Ok(outcome)
}

fn train_ranks(
    ctx: &mut StageCtx,
    ranks: &[RankModel],
    data: &TrainData,
    validation: Option<&TrainData>,
    source: &dyn BatchSource,
    config: &TrainConfig,
) -> anyhow::Result<TrainOutcome> {
    let resume = ctx.load_checkpoint()?;
    if resume.is_some() {
        ctx.log("resuming from the last epoch checkpoint");
    }
    let job = TrainJob {
        data,
        validation,
        source,
        config,
        resume: resume.as_deref(),
    };
    if let Some(gang) = ctx.gang() {
        let [(_, _, device)] = ranks else {
            anyhow::bail!("a gang member runs one rank, not {}", ranks.len());
        };
        let (rank, world) = (gang.rank(), gang.world_size());
        ctx.log(format!(
            "data-parallel: rank {rank} of {world} (one per worker process) on {device:?}, {} \
             images each per batch",
            config.batch_size / world
        ));
        let cancel = ctx.cancel_flag();
        let gradients = gang_collective(gang, "gradients", device, cancel.clone())?;
        let batch_norm = match config.sync_batch_norm {
            true => Some(gang_collective(gang, "batch-norm", device, cancel)?),
            false => None,
        };
        ctx.log(reduction_line(
            device,
            "TCP between worker processes",
            batch_norm.is_some(),
        ));
        let replica = replica(&ranks[0]);
        let mut observer = StageObserver { ctx };
        return train_rank(
            replica,
            gradients,
            batch_norm,
            job,
            (rank == 0).then_some(&mut observer as &mut dyn TrainObserver),
        );
    }
    if ranks.len() > 1 {
        ctx.log(format!(
            "data-parallel: {} ranks on {:?}, {} images each per batch",
            ranks.len(),
            ranks[0].2,
            config.batch_size / ranks.len()
        ));
    }
    let replicas: Vec<Replica> = ranks.iter().map(replica).collect();
    let mut observer = StageObserver { ctx };
    if replicas.len() == 1 {
        deeprepair_train::train(replicas[0], job, &mut observer)
    } else {
        let devices: Vec<candle_core::Device> = ranks.iter().map(|r| r.2.clone()).collect();
        let gradients = rank_group(&devices)?;
        let batch_norm = if config.sync_batch_norm {
            Some(rank_group(&devices)?)
        } else {
            None
        };
        observer.ctx.log(reduction_line(
            &devices[0],
            "threads through host memory",
            batch_norm.is_some(),
        ));
        train_with_collectives(&replicas, gradients, batch_norm, job, &mut observer)
    }
}

/// One collective handle per rank of `devices` (rank order): an NCCL communicator per GPU
/// when the ranks are GPUs and the binary has the `nccl` feature, else a thread group that
/// reduces through host memory.
fn rank_group(devices: &[candle_core::Device]) -> anyhow::Result<Vec<Box<dyn Collective>>> {
    #[cfg(feature = "nccl")]
    if devices.iter().all(|d| d.is_cuda()) {
        return nccl_group(devices);
    }
    Ok(ThreadCollective::boxed_group(devices.len()))
}

/// An NCCL group over `devices`, ranks in this process: rank 0's unique id is handed to every
/// rank directly (a group across processes would pass it through the coordinator, as
/// `DEEPREPAIR_NCCL_ID`). `ncclCommInitRank` blocks until every rank has joined, so the ranks
/// join from threads of their own.
#[cfg(feature = "nccl")]
fn nccl_group(devices: &[candle_core::Device]) -> anyhow::Result<Vec<Box<dyn Collective>>> {
    use deeprepair_collective::nccl::{NcclCollective, NcclId};
    let id = NcclId::new_unique()?;
    let world = devices.len();
    std::thread::scope(|s| {
        let joining: Vec<_> = devices
            .iter()
            .enumerate()
            .map(|(rank, device)| {
                s.spawn(move || NcclCollective::on_device(device, rank, world, id))
            })
            .collect();
        joining
            .into_iter()
            .map(|j| {
                let c = j
                    .join()
                    .map_err(|_| anyhow::anyhow!("a rank panicked joining the NCCL group"))??;
                Ok(Box::new(c) as Box<dyn Collective>)
            })
            .collect()
    })
}

/// The log line naming how a data-parallel stage reduces (tests look for it): NCCL between
/// GPUs in a `nccl` build, else `host_path`.
fn reduction_line(
    device: &candle_core::Device,
    host_path: &str,
    synced_batch_norm: bool,
) -> String {
    let path = if device.is_cuda() && cfg!(feature = "nccl") {
        "NCCL"
    } else {
        host_path
    };
    let batch_norm = if synced_batch_norm {
        ", synchronized BatchNorm"
    } else {
        ""
    };
    format!("data-parallel reduction: {path}{batch_norm}")
}

/// This process's handle on a group of the gang's ranks, formed through the gang's exchange
/// `name`: an NCCL communicator on GPUs in a `nccl` build (rank 0's unique id travels through
/// the exchange), else TCP to rank 0.
fn gang_collective(
    gang: &dyn deeprepair_pipeline::Gang,
    name: &str,
    device: &candle_core::Device,
    cancel: std::sync::Arc<std::sync::atomic::AtomicBool>,
) -> anyhow::Result<Box<dyn Collective>> {
    #[cfg(feature = "nccl")]
    if device.is_cuda() {
        use deeprepair_collective::nccl::{NcclCollective, NcclId};
        let mine = match gang.rank() {
            0 => NcclId::new_unique()?.as_bytes().to_vec(),
            _ => vec![],
        };
        let id = NcclId::from_bytes(&gang.exchange(name, &mine)?[0])?;
        let c = NcclCollective::on_device(device, gang.rank(), gang.world_size(), id)?;
        return Ok(Box::new(c));
    }
    #[cfg(not(feature = "nccl"))]
    let _ = device;
    let c = SocketCollective::join(
        gang.rank(),
        gang.world_size(),
        gang.address(),
        |payload| gang.exchange(name, payload),
        cancel,
    )?;
    Ok(Box::new(c))
}

pub fn train_config(ctx: &StageCtx) -> anyhow::Result<TrainConfig> {
    let patience: usize = ctx.param("patience")?;
    let monitor: String = ctx.param("monitor")?;
    Ok(TrainConfig {
        epochs: ctx.param("epochs")?,
        batch_size: ctx.param("batch")?,
        sgd: deeprepair_train::optim::SgdConfig {
            lr: ctx.param("lr")?,
            momentum: ctx.param("momentum")?,
            weight_decay: ctx.param("weight_decay")?,
            nesterov: true,
        },
        min_lr: 1e-6,
        seed: ctx.param("seed")?,
        patience: (patience > 0).then_some(patience),
        monitor: Monitor::from_name(&monitor)
            .ok_or_else(|| anyhow::anyhow!("unknown monitor {monitor:?}"))?,
        keep_best: ctx.param("keep_best")?,
        jsd_lambda: 12.0,
        prefetch: deeprepair_train::trainer::DEFAULT_PREFETCH,
        sync_batch_norm: ctx.param("sync_batch_norm")?,
    })
}

/// Reports steps as stage progress, stores a checkpoint after every epoch, stops on Ctrl-C.
pub struct StageObserver<'c, 'a> {
    pub ctx: &'c mut StageCtx<'a>,
}

impl TrainObserver for StageObserver<'_, '_> {
    fn step(&mut self, done: usize, total: usize) -> anyhow::Result<()> {
        self.ctx.progress(done as u64, total as u64, "steps");
        if self.ctx.is_cancelled() {
            anyhow::bail!("cancelled");
        }
        Ok(())
    }

    fn epoch(&mut self, s: &EpochStats, checkpoint: &[u8]) -> anyhow::Result<()> {
        self.ctx.save_checkpoint(checkpoint)?;
        let val = match (s.val_loss, s.val_accuracy) {
            (Some(l), Some(a)) => format!(", val loss {l:.4} acc {:.2}%", a * 100.0),
            _ => String::new(),
        };
        self.ctx.log(format!(
            "epoch {}: loss {:.4} acc {:.2}%{val}, lr {:.2e}, {:.0} img/s",
            s.epoch + 1,
            s.train_loss,
            s.train_accuracy * 100.0,
            s.lr,
            s.images_per_second
        ));
        Ok(())
    }
}

/// A stage's model input, rebuilt on the stage's device.
pub struct InputModel {
    pub info: crate::artifacts::ModelInfo,
    pub varmap: candle_nn::VarMap,
    pub model: Box<dyn deeprepair_nn::Classifier>,
    pub device: candle_core::Device,
}

/// Loads the model artifact bound to input `name`.
pub fn input_model(ctx: &StageCtx, name: &str) -> anyhow::Result<InputModel> {
    let artifact = ctx.input(name)?;
    let info = crate::artifacts::read_model_info(&artifact)?;
    let device = stage_device(ctx)?;
    let (varmap, model) = crate::artifacts::load_model(&artifact.bytes, &info, &device)?;
    Ok(InputModel {
        info,
        varmap,
        model,
        device,
    })
}
