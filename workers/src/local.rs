//! Worker processes on this machine: one per GPU (`deeprepair run --gpus 0,1`, each started
//! with `CUDA_VISIBLE_DEVICES` set to its GPU) and/or N CPU workers (`--workers N`). A
//! monitor thread notices a worker process that exits, revokes its leases at once (the
//! executor retries the stage, which resumes from its last checkpoint on whichever worker
//! claims it) and starts a replacement, up to [`MAX_RESTARTS`] per worker.

use crate::coordinator::{Coordinator, Route};
use crate::protocol::TOKEN_ENV;
use deeprepair_pipeline::kind::{ProgressSink, StageError, Task};
use deeprepair_pipeline::{Assignment, Dispatcher, RemoteOutcome};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

pub const MAX_RESTARTS: u32 = 3;

/// How to start one worker process.
#[derive(Clone, Debug)]
pub struct WorkerSpec {
    pub name: String,
    pub gpu: Option<u32>,
}

struct Slot {
    spec: WorkerSpec,
    child: Option<Child>,
    restarts: u32,
}

pub struct LocalPool {
    coordinator: Arc<Coordinator>,
    program: PathBuf,
    log_dir: PathBuf,
    slots: Arc<Mutex<Vec<Slot>>>,
    stopping: Arc<AtomicBool>,
    monitor: Option<std::thread::JoinHandle<()>>,
}

impl LocalPool {
    /// Starts `program worker …` once per spec; their output goes to `log_dir/<name>.log`.
    pub fn start(
        coordinator: Arc<Coordinator>,
        program: PathBuf,
        specs: Vec<WorkerSpec>,
        log_dir: PathBuf,
    ) -> anyhow::Result<LocalPool> {
        std::fs::create_dir_all(&log_dir).map_err(|e| {
            anyhow::anyhow!("cannot create worker log folder {}: {e}", log_dir.display())
        })?;
        let mut slots = vec![];
        for spec in specs {
            let child = spawn(&coordinator, &program, &spec, &log_dir)?;
            slots.push(Slot {
                spec,
                child: Some(child),
                restarts: 0,
            });
        }
        let slots = Arc::new(Mutex::new(slots));
        {
            // A rank stuck after its gang failed holds its GPU: kill the process; the monitor
            // below restarts it.
            let slots = slots.clone();
            coordinator.on_stuck_rank(Box::new(move |worker| {
                let mut slots = slots.lock().unwrap_or_else(|p| p.into_inner());
                for slot in slots.iter_mut().filter(|s| s.spec.name == worker.name) {
                    if let Some(child) = slot.child.as_mut() {
                        tracing::warn!("killing worker {}: its rank did not stop", worker.name);
                        let _ = child.kill();
                    }
                }
            }));
        }
        let stopping = Arc::new(AtomicBool::new(false));
        let monitor = {
            let (coordinator, program, log_dir, slots, stopping) = (
                coordinator.clone(),
                program.clone(),
                log_dir.clone(),
                slots.clone(),
                stopping.clone(),
            );
            std::thread::spawn(move || {
                while !stopping.load(Ordering::Relaxed) {
                    std::thread::sleep(Duration::from_millis(200));
                    let mut slots = slots.lock().unwrap_or_else(|p| p.into_inner());
                    for slot in slots.iter_mut() {
                        let Some(child) = slot.child.as_mut() else {
                            continue;
                        };
                        let Ok(Some(status)) = child.try_wait() else {
                            continue;
                        };
                        slot.child = None;
                        if stopping.load(Ordering::Relaxed) {
                            break;
                        }
                        let why = format!("process exited ({status})");
                        tracing::warn!("worker {} {why}", slot.spec.name);
                        coordinator.worker_lost(&slot.spec.name, &why);
                        if slot.restarts < MAX_RESTARTS {
                            slot.restarts += 1;
                            match spawn(&coordinator, &program, &slot.spec, &log_dir) {
                                Ok(child) => slot.child = Some(child),
                                Err(e) => tracing::error!("restarting {}: {e:#}", slot.spec.name),
                            }
                        }
                    }
                }
            })
        };
        Ok(LocalPool {
            coordinator,
            program,
            log_dir,
            slots,
            stopping,
            monitor: Some(monitor),
        })
    }

    /// Process ids of the live workers, by name (for tests and `status`).
    pub fn pids(&self) -> Vec<(String, u32)> {
        let slots = self.slots.lock().unwrap_or_else(|p| p.into_inner());
        slots
            .iter()
            .filter_map(|s| s.child.as_ref().map(|c| (s.spec.name.clone(), c.id())))
            .collect()
    }

    pub fn log_dir(&self) -> &std::path::Path {
        &self.log_dir
    }

    pub fn program(&self) -> &std::path::Path {
        &self.program
    }

    /// Whether a live worker process could take a job on this route.
    fn live_for(&self, route: &Route) -> bool {
        self.live_count(route) > 0
    }

    /// Workers that can take `route`'s jobs and are alive or will be restarted.
    fn live_count(&self, route: &Route) -> usize {
        let slots = self.slots.lock().unwrap_or_else(|p| p.into_inner());
        slots
            .iter()
            .filter(|s| {
                (s.child.is_some() || s.restarts < MAX_RESTARTS)
                    && match route {
                        Route::Gpu(g) => s.spec.gpu == Some(*g),
                        _ => s.spec.gpu.is_none(),
                    }
            })
            .count()
    }

    fn cpu_workers(&self) -> usize {
        let slots = self.slots.lock().unwrap_or_else(|p| p.into_inner());
        slots.iter().filter(|s| s.spec.gpu.is_none()).count()
    }

    fn has_gpu_worker(&self, gpu: u32) -> bool {
        let slots = self.slots.lock().unwrap_or_else(|p| p.into_inner());
        slots.iter().any(|s| s.spec.gpu == Some(gpu))
    }

    fn has_cpu_worker(&self) -> bool {
        let slots = self.slots.lock().unwrap_or_else(|p| p.into_inner());
        slots.iter().any(|s| s.spec.gpu.is_none())
    }
}

impl Drop for LocalPool {
    fn drop(&mut self) {
        self.stopping.store(true, Ordering::Relaxed);
        if let Some(m) = self.monitor.take() {
            let _ = m.join();
        }
        let mut slots = self.slots.lock().unwrap_or_else(|p| p.into_inner());
        for slot in slots.iter_mut() {
            if let Some(mut child) = slot.child.take() {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
    }
}

fn spawn(
    coordinator: &Coordinator,
    program: &std::path::Path,
    spec: &WorkerSpec,
    log_dir: &std::path::Path,
) -> anyhow::Result<Child> {
    let log_path = log_dir.join(format!("{}.log", spec.name));
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log_path)
        .map_err(|e| anyhow::anyhow!("cannot open {}: {e}", log_path.display()))?;
    let mut cmd = Command::new(program);
    cmd.arg("worker")
        .arg("--coordinator")
        .arg(coordinator.url())
        .arg("--name")
        .arg(&spec.name)
        .env(TOKEN_ENV, coordinator.token())
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log);
    if let Some(ca) = coordinator.tls_ca() {
        cmd.env(crate::protocol::TLS_CA_ENV, ca);
    }
    if let Some(g) = spec.gpu {
        cmd.arg("--gpu").arg(g.to_string());
        // The worker's process sees only its GPU, as ordinal 0.
        cmd.env("CUDA_VISIBLE_DEVICES", g.to_string());
    }
    die_with_parent(&mut cmd);
    cmd.spawn().map_err(|e| {
        anyhow::anyhow!(
            "cannot start worker {} ({}): {e}",
            spec.name,
            program.display()
        )
    })
}

/// The worker gets SIGKILL when the thread that started it ends: the `run` process's main
/// thread (or the pool's monitor thread, which lives as long as the pool), so a `run` killed
/// by any signal, SIGKILL included, leaves no worker holding a GPU. (A worker never writes the
/// store, so killing it loses nothing committed.)
#[cfg(target_os = "linux")]
fn die_with_parent(cmd: &mut Command) {
    use std::os::unix::process::CommandExt;
    let parent = std::process::id();
    // SAFETY: prctl and getppid are async-signal-safe; the closure allocates nothing.
    unsafe {
        cmd.pre_exec(move || {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            // The parent may have died before prctl: then nobody would send the signal.
            if libc::getppid() as u32 != parent {
                libc::_exit(1);
            }
            Ok(())
        });
    }
}

#[cfg(not(target_os = "linux"))]
fn die_with_parent(_cmd: &mut Command) {}

/// Hands stages to the local worker processes: a stage given one GPU goes to that GPU's
/// worker; a CPU stage goes to any CPU worker. A stage whose ranks may run as separate
/// processes ([`deeprepair_pipeline::Resources::ranks`]) runs as a gang: rank r on the worker
/// of its r-th GPU, or, without GPUs, on any CPU worker when there are enough of them. Other
/// data-parallel stages (several GPUs) and, when there are no CPU workers, CPU stages run in
/// the coordinator's process.
pub struct LocalDispatcher {
    pub pool: LocalPool,
}

impl LocalDispatcher {
    /// Where each rank of a gang runs (route, and its GPUs as that worker sees them), when
    /// the stage runs as a gang here.
    fn gang_routes(&self, assignment: &Assignment) -> Option<Vec<(Route, Vec<u32>)>> {
        let ranks = assignment.resources.ranks as usize;
        if ranks < 2 {
            return None;
        }
        match assignment.gpus.as_slice() {
            [] => (self.pool.cpu_workers() >= ranks).then(|| vec![(Route::Any, vec![]); ranks]),
            gpus if gpus.len() == ranks && gpus.iter().all(|&g| self.pool.has_gpu_worker(g)) => {
                Some(gpus.iter().map(|&g| (Route::Gpu(g), vec![0])).collect())
            }
            _ => None,
        }
    }
}

impl Dispatcher for LocalDispatcher {
    fn accepts(&self, assignment: &Assignment) -> bool {
        if self.gang_routes(assignment).is_some() {
            return true;
        }
        match assignment.gpus.as_slice() {
            [] => self.pool.has_cpu_worker(),
            [g] => self.pool.has_gpu_worker(*g),
            _ => false,
        }
    }

    fn execute(
        &self,
        task: &Task,
        assignment: &Assignment,
        progress: &dyn ProgressSink,
        cancel: &AtomicBool,
    ) -> Result<RemoteOutcome, StageError> {
        if let Some(ranks) = self.gang_routes(assignment) {
            let world = ranks.len();
            let routes: Vec<Route> = ranks.iter().map(|(r, _)| r.clone()).collect();
            let threads = (assignment.cpus / world).max(1);
            let tickets = self.pool.coordinator.submit_gang(task, ranks, threads);
            if let Some(t) = assignment.cluster.time_s {
                self.pool
                    .coordinator
                    .limit_time(&tickets, Duration::from_secs(t));
            }
            return self
                .pool
                .coordinator
                .wait_gang(tickets, progress, cancel, |rank, leased| {
                    // Every rank must find a worker at once, or the claimed ones wait forever.
                    let route = &routes[rank];
                    let needed = routes.iter().filter(|r| *r == route).count();
                    (!leased && self.pool.live_count(route) < needed).then(|| {
                        StageError::Fatal(anyhow::anyhow!(
                            "rank {rank} of {world} has no live worker for {route:?}: they \
                             exited {MAX_RESTARTS} times; see {}",
                            self.pool.log_dir.display()
                        ))
                    })
                });
        }
        let (route, gpus) = match assignment.gpus.as_slice() {
            [g] => (Route::Gpu(*g), vec![0]),
            _ => (Route::Any, vec![]),
        };
        let ticket = self
            .pool
            .coordinator
            .submit(task, route.clone(), assignment.cpus, gpus);
        if let Some(t) = assignment.cluster.time_s {
            self.pool
                .coordinator
                .limit_time(std::slice::from_ref(&ticket), Duration::from_secs(t));
        }
        self.pool
            .coordinator
            .wait(ticket, progress, cancel, |leased| {
                (!leased && !self.pool.live_for(&route)).then(|| {
                    StageError::Fatal(anyhow::anyhow!(
                        "no live worker for {route:?}: they exited {MAX_RESTARTS} times; see {}",
                        self.pool.log_dir.display()
                    ))
                })
            })
    }
}
