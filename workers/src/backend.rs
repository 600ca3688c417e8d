//! Where a run's stages go besides its own process, and the policy each backend brings: which
//! address the coordinator listens on, what workers are told to reach it at, and the
//! dispatcher the executor hands stages to. A third backend (Kubernetes jobs, say) is a
//! variant here and a dispatcher in a file of its own.

use crate::coordinator::{Coordinator, ServerOptions};
use crate::local::{LocalDispatcher, LocalPool, WorkerSpec};
use crate::slurm::{SlurmDispatcher, SlurmOptions};
use deeprepair_pipeline::{Dispatcher, Store};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

/// The processes that run stages for a run.
pub enum Backend {
    /// Worker processes on this machine: one per listed GPU, plus `cpu_workers` on the CPU.
    Local {
        gpus: Vec<u32>,
        cpu_workers: usize,
        /// Each worker's log file goes here.
        log_dir: PathBuf,
    },
    /// One Slurm job per stage.
    Slurm(SlurmOptions),
}

impl Backend {
    /// Local workers reach a loopback coordinator; Slurm jobs run on other nodes, so the
    /// coordinator listens on every interface.
    fn default_listen(&self) -> SocketAddr {
        match self {
            Backend::Local { .. } => SocketAddr::from(([127, 0, 0, 1], 0)),
            Backend::Slurm(_) => SocketAddr::from(([0, 0, 0, 0], 0)),
        }
    }

    /// What workers are told the coordinator is at when the user did not say: for Slurm on
    /// every interface, this machine's host name.
    fn default_advertise(&self, listen: SocketAddr) -> Option<String> {
        match self {
            Backend::Slurm(_) if listen.ip().is_unspecified() => Some(
                std::fs::read_to_string("/proc/sys/kernel/hostname")
                    .map(|h| h.trim().to_string())
                    .unwrap_or_else(|_| "localhost".into()),
            ),
            _ => None,
        }
    }

    fn dispatcher(self, coordinator: Arc<Coordinator>) -> anyhow::Result<Arc<dyn Dispatcher>> {
        Ok(match self {
            Backend::Slurm(mut slurm) => {
                std::fs::create_dir_all(&slurm.log_dir)?;
                slurm.log_dir = slurm.log_dir.canonicalize()?;
                Arc::new(SlurmDispatcher::new(coordinator, slurm))
            }
            Backend::Local {
                gpus,
                cpu_workers,
                log_dir,
            } => {
                let mut specs: Vec<WorkerSpec> = gpus
                    .iter()
                    .map(|&g| WorkerSpec {
                        name: format!("gpu{g}"),
                        gpu: Some(g),
                    })
                    .collect();
                specs.extend((0..cpu_workers).map(|i| WorkerSpec {
                    name: format!("cpu{i}"),
                    gpu: None,
                }));
                let program = std::env::current_exe()?;
                let pool = LocalPool::start(coordinator, program, specs, log_dir)?;
                Arc::new(LocalDispatcher { pool })
            }
        })
    }
}

/// A backend with the coordinator in front of it.
pub struct Remote {
    pub backend: Backend,
    /// Where the coordinator listens (default: the backend's).
    pub listen: Option<SocketAddr>,
    /// What workers are told the coordinator is at (default: the backend's).
    pub advertise: Option<String>,
    pub server: ServerOptions,
    /// A leased stage whose progress does not move for this long is hung (`None`: never).
    pub stall_timeout: Option<Duration>,
}

impl Remote {
    /// Starts the coordinator and the backend's workers; returns the dispatcher to give the
    /// executor (dropping it stops the workers and the server).
    pub fn start(self, store: Arc<Store>) -> anyhow::Result<Arc<dyn Dispatcher>> {
        let listen = self.listen.unwrap_or_else(|| self.backend.default_listen());
        let advertise = self
            .advertise
            .or_else(|| self.backend.default_advertise(listen));
        let coordinator =
            Coordinator::start_with(store, listen, advertise.as_deref(), self.server)?;
        coordinator.set_stall_timeout(self.stall_timeout);
        tracing::info!("coordinator listening at {}", coordinator.url());
        self.backend.dispatcher(coordinator)
    }
}
