//! The coordinator side of the worker protocol ([`crate::protocol`]): an HTTP server (axum,
//! on its own small tokio runtime) in front of the run's store, and a queue of jobs the
//! executor hands over. The executor's thread for a stage blocks in [`Coordinator::wait`]
//! until a worker completes the job, fails it, or is lost; the executor then commits the
//! outputs itself, so the store keeps one writer and one commit path.
//!
//! Leases: a claimed job is leased to one worker, which heartbeats every second. A lease
//! without a heartbeat for `lease_timeout`, or whose worker process is known to have exited
//! ([`Coordinator::worker_lost`]), is revoked and the job fails as transient; the executor
//! retries it, and the stage resumes from the checkpoint its last worker committed.
//!
//! Gangs: a stage whose ranks run as separate processes is queued as one job per rank, in
//! one go ([`Coordinator::submit_gang`]). Workers claim jobs in queue order, so gangs are
//! claimed in the order they were queued and two gangs never hold parts of the same workers
//! while waiting for each other. The ranks meet through `exchange` (rank 0 publishes its
//! address or NCCL id). When one rank fails, the gang is abandoned: the other ranks are told
//! to cancel and their exchanges are refused; the executor retries the whole stage.
//!
//! Access: one middleware checks the run's token on every request from its headers, before
//! any body is read; a second checks, on every `/v1/leases/{id}/…` request, the secret that
//! lease was given when it was claimed (both compared in constant time). Bodies are limited
//! per route: control messages to [`CONTROL_LIMIT`], checkpoints and outputs to
//! [`ServerOptions::max_upload`]; outputs are decoded and verified as they stream in, held
//! once. An upload that is malformed, corrupt or too large releases its lease at once.

use crate::protocol::{GangMember, StageProgress, WorkerInfo};
use axum::extract::DefaultBodyLimit;
use axum::middleware::from_fn_with_state;
use axum::routing::{get, post};
use axum::Router;
use deeprepair_pipeline::kind::{ProgressSink, StageError, Task};
use deeprepair_pipeline::{Digest, RemoteOutcome, Store};
use std::collections::{HashMap, HashSet, VecDeque};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

/// Which workers may take a job.
#[derive(Clone, Debug, PartialEq)]
pub enum Route {
    /// Any worker.
    Any,
    /// The worker that owns this GPU.
    Gpu(u32),
    /// Only a worker that asks for this task (a Slurm job started for it).
    Task(Digest),
}

struct Job {
    id: u64,
    task: Task,
    route: Route,
    threads: usize,
    gpus: Vec<u32>,
    gang: Option<GangMember>,
    reply: mpsc::Sender<JobEnd>,
}

struct Lease {
    job: Job,
    /// Proves a request comes from the worker that claimed the lease ([`LEASE_HEADER`]).
    secret: String,
    worker: WorkerInfo,
    last_beat: Instant,
    lines: Vec<String>,
    progress: Option<StageProgress>,
    /// When the stage last reported progress that differs from before (or was leased).
    progressed: Instant,
    leased_at: Instant,
    cancel: bool,
}

/// How a job ended, with the log lines its lease received but `wait` had not yet forwarded
/// (a stage that ends between two looks would otherwise lose its last lines).
enum JobEnd {
    Done(RemoteOutcome, Vec<String>),
    Failed(StageError, Vec<String>),
}

/// A lease's worker as errors name it, with its rank when it is a gang member.
fn worker_label(lease: &Lease, gang: bool, rank: usize) -> String {
    if gang {
        format!("{} (rank {rank})", lease.worker.label())
    } else {
        lease.worker.label()
    }
}

/// A worker's log lines as the stage's: rank 0's as they are, other ranks' prefixed.
fn forward_lines(
    progress: &dyn ProgressSink,
    stage: &str,
    rank: usize,
    lines: impl IntoIterator<Item = String>,
) {
    for line in lines {
        if rank == 0 {
            progress.log(stage, &line);
        } else {
            progress.log(stage, &format!("rank {rank}: {line}"));
        }
    }
}

#[derive(Default)]
struct HubState {
    queue: VecDeque<Job>,
    leases: HashMap<u64, Lease>,
    next_id: u64,
    /// Posts to each gang's named exchanges, by rank.
    exchanges: HashMap<(u64, String), Vec<Option<Vec<u8>>>>,
    /// Gangs one of whose ranks failed: their exchanges are refused.
    abandoned: HashSet<u64>,
    /// Wall-clock limits of jobs (from when they are leased), by job id.
    limits: HashMap<u64, Duration>,
}

struct Hub {
    state: Mutex<HubState>,
    /// Wakes long-polling claims when a job is queued.
    queued: tokio::sync::Notify,
    /// Wakes waiting exchanges when a rank posts.
    exchanged: tokio::sync::Notify,
    store: Arc<Store>,
    token: String,
    lease_timeout: Duration,
    /// A leased stage whose progress has not moved for this long is hung: its lease is
    /// revoked (transient). `None`: no watchdog.
    stall_timeout: Mutex<Option<Duration>>,
    max_upload: u64,
    traffic: TrafficCounters,
    /// To the checkpoint writer thread ([`checkpoint_writer`]).
    checkpoints: Mutex<mpsc::Sender<CheckpointWrite>>,
}

/// The largest control message (claim, heartbeat, failure, exchange) the server reads.
pub const CONTROL_LIMIT: usize = 8 << 20;

/// The default largest upload (a stage's outputs, a checkpoint): 16 GiB.
pub const DEFAULT_MAX_UPLOAD: u64 = 16 << 30;

/// How the server is set up.
#[derive(Clone, Debug)]
pub struct ServerOptions {
    /// No heartbeat for this long revokes a lease.
    pub lease_timeout: Duration,
    /// The largest upload a worker may send (a stage's outputs frame, a checkpoint).
    pub max_upload: u64,
    /// Serve HTTPS with this certificate chain and key (PEM files) instead of plain HTTP.
    pub tls: Option<TlsFiles>,
}

/// A PEM certificate chain and its private key.
#[derive(Clone, Debug)]
pub struct TlsFiles {
    pub cert: std::path::PathBuf,
    pub key: std::path::PathBuf,
}

impl ServerOptions {
    pub fn new(lease_timeout: Duration) -> ServerOptions {
        ServerOptions {
            lease_timeout,
            max_upload: DEFAULT_MAX_UPLOAD,
            tls: None,
        }
    }
}

#[derive(Default)]
struct TrafficCounters {
    artifacts_served: AtomicU64,
    bytes_served: AtomicU64,
    uploads: AtomicU64,
    bytes_received: AtomicU64,
    checkpoint_transactions: AtomicU64,
}

/// What crossed the wire so far (artifact bodies only; control messages are not counted).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Traffic {
    /// Input artifacts sent to workers, and their bytes.
    pub artifacts_served: u64,
    pub bytes_served: u64,
    /// Outputs frames and checkpoints received, and their bytes.
    pub uploads: u64,
    pub bytes_received: u64,
    /// Write transactions the checkpoints took (fewer than checkpoints when batched).
    pub checkpoint_transactions: u64,
}

impl Hub {
    fn lock(&self) -> std::sync::MutexGuard<'_, HubState> {
        // A panicking handler must not wedge the run: the state stays consistent per call.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// A job handed to the coordinator; [`Coordinator::wait`] on it.
pub struct Ticket {
    id: u64,
    stage: String,
    replies: mpsc::Receiver<JobEnd>,
}

/// Told of a worker whose rank did not stop after its gang failed (see [`Coordinator::wait_gang`]).
pub type StuckRankHook = Box<dyn Fn(&WorkerInfo) + Send + Sync>;

pub struct Coordinator {
    hub: Arc<Hub>,
    url: String,
    /// The certificate workers must trust (the one served), when serving HTTPS.
    tls_ca: Option<std::path::PathBuf>,
    stuck_rank: Mutex<Option<StuckRankHook>>,
    shutdown: Mutex<Option<tokio::sync::oneshot::Sender<()>>>,
    server: Mutex<Option<std::thread::JoinHandle<()>>>,
}

impl Coordinator {
    /// Serves the protocol on `bind` (port 0 picks a free port). `advertise` is the host
    /// workers use to reach it (default: the bound address).
    pub fn start(
        store: Arc<Store>,
        bind: SocketAddr,
        advertise: Option<&str>,
        lease_timeout: Duration,
    ) -> anyhow::Result<Arc<Coordinator>> {
        Self::start_with(store, bind, advertise, ServerOptions::new(lease_timeout))
    }

    /// [`Coordinator::start`] with every option.
    pub fn start_with(
        store: Arc<Store>,
        bind: SocketAddr,
        advertise: Option<&str>,
        options: ServerOptions,
    ) -> anyhow::Result<Arc<Coordinator>> {
        // No token, no server: never one made from guessable inputs.
        let token = crate::unguessable_hex()?;
        let listener = std::net::TcpListener::bind(bind)
            .map_err(|e| anyhow::anyhow!("coordinator cannot listen on {bind}: {e}"))?;
        listener.set_nonblocking(true)?;
        let local = listener.local_addr()?;
        let host = advertise
            .map(str::to_string)
            .unwrap_or_else(|| local.ip().to_string());
        let (checkpoints, queue) = mpsc::channel();
        let writer_store = store.clone();
        let scheme = if options.tls.is_some() {
            "https"
        } else {
            "http"
        };
        let url = format!("{scheme}://{host}:{}", local.port());
        let hub = Arc::new(Hub {
            state: Mutex::new(HubState::default()),
            queued: tokio::sync::Notify::new(),
            exchanged: tokio::sync::Notify::new(),
            store,
            token,
            lease_timeout: options.lease_timeout,
            max_upload: options.max_upload,
            traffic: TrafficCounters::default(),
            checkpoints: Mutex::new(checkpoints),
            stall_timeout: Mutex::new(None),
        });
        {
            let hub = Arc::downgrade(&hub);
            std::thread::Builder::new()
                .name("checkpoint-writer".into())
                .spawn(move || checkpoint_writer(hub, writer_store, queue))?;
        }
        let upload_limit = usize::try_from(options.max_upload).unwrap_or(usize::MAX);
        // Routes about one lease: the caller must hold it.
        let leased = Router::new()
            .route("/v1/leases/{id}/heartbeat", post(heartbeat))
            .route("/v1/leases/{id}/complete", post(complete))
            .route("/v1/leases/{id}/fail", post(fail))
            .route("/v1/leases/{id}/exchange", post(exchange))
            .route(
                "/v1/leases/{id}/checkpoint",
                get(load_checkpoint)
                    .put(save_checkpoint)
                    .layer(DefaultBodyLimit::max(upload_limit)),
            )
            .route("/v1/leases/{id}/artifacts/{digest}", get(artifact))
            .route_layer(from_fn_with_state(hub.clone(), require_lease));
        let app = Router::new()
            .route("/v1/claim", post(claim))
            .merge(leased)
            // Outermost: the token, checked from the headers before any body is read.
            .layer(DefaultBodyLimit::max(CONTROL_LIMIT))
            .layer(from_fn_with_state(hub.clone(), require_token))
            .with_state(hub.clone());
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("coordinator-http")
            .enable_all()
            .build()?;
        // Loaded here, so a bad certificate or key stops `run` at once with the reason.
        let tls = match &options.tls {
            Some(files) => Some(
                runtime
                    .block_on(axum_server::tls_rustls::RustlsConfig::from_pem_file(
                        &files.cert,
                        &files.key,
                    ))
                    .map_err(|e| {
                        anyhow::anyhow!(
                            "cannot use TLS certificate {} with key {}: {e}",
                            files.cert.display(),
                            files.key.display()
                        )
                    })?,
            ),
            None => None,
        };
        let tls_ca = options.tls.as_ref().map(|files| files.cert.clone());
        let server = std::thread::Builder::new()
            .name("coordinator".into())
            .spawn(move || {
                runtime.block_on(async move {
                    if let Some(config) = tls {
                        let server = match axum_server::from_tcp_rustls(listener, config) {
                            Ok(server) => server,
                            Err(e) => {
                                tracing::error!("coordinator listener: {e}");
                                return;
                            }
                        };
                        let handle = axum_server::Handle::new();
                        let stopper = handle.clone();
                        tokio::spawn(async move {
                            let _ = rx.await;
                            stopper.graceful_shutdown(Some(Duration::from_secs(5)));
                        });
                        let serve = server.handle(handle).serve(app.into_make_service());
                        if let Err(e) = serve.await {
                            tracing::error!("coordinator server: {e}");
                        }
                        return;
                    }
                    let listener = match tokio::net::TcpListener::from_std(listener) {
                        Ok(l) => l,
                        Err(e) => {
                            tracing::error!("coordinator listener: {e}");
                            return;
                        }
                    };
                    let serve = axum::serve(listener, app).with_graceful_shutdown(async {
                        let _ = rx.await;
                    });
                    if let Err(e) = serve.await {
                        tracing::error!("coordinator server: {e}");
                    }
                });
            })?;
        Ok(Arc::new(Coordinator {
            hub,
            url,
            tls_ca,
            stuck_rank: Mutex::new(None),
            shutdown: Mutex::new(Some(tx)),
            server: Mutex::new(Some(server)),
        }))
    }

    /// What to do with a worker whose rank did not stop within the lease timeout of its
    /// gang's failure (e.g. stuck in an NCCL collective waiting for a dead peer): its lease is
    /// revoked either way; a pool of local workers kills the process so it can be restarted.
    pub fn on_stuck_rank(&self, hook: StuckRankHook) {
        *self.stuck_rank.lock().unwrap_or_else(|p| p.into_inner()) = Some(hook);
    }

    /// Base URL workers connect to.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// The certificate file workers should trust (pass it in [`crate::protocol::TLS_CA_ENV`]),
    /// when the coordinator serves HTTPS.
    pub fn tls_ca(&self) -> Option<&std::path::Path> {
        self.tls_ca.as_deref()
    }

    /// The bearer token workers must present (pass it in [`crate::protocol::TOKEN_ENV`]).
    pub fn token(&self) -> &str {
        &self.hub.token
    }

    /// Artifact bytes moved so far.
    pub fn traffic(&self) -> Traffic {
        let t = &self.hub.traffic;
        Traffic {
            artifacts_served: t.artifacts_served.load(Ordering::Relaxed),
            bytes_served: t.bytes_served.load(Ordering::Relaxed),
            uploads: t.uploads.load(Ordering::Relaxed),
            bytes_received: t.bytes_received.load(Ordering::Relaxed),
            checkpoint_transactions: t.checkpoint_transactions.load(Ordering::Relaxed),
        }
    }

    /// Queues a task for the workers `route` allows.
    pub fn submit(&self, task: &Task, route: Route, threads: usize, gpus: Vec<u32>) -> Ticket {
        self.submit_jobs(task, vec![(route, gpus)], threads, false)
            .pop()
            .expect("one job")
    }

    /// Queues one job per rank of a stage that runs as several processes (`ranks[r]`: where
    /// rank r may run and its GPUs as that worker sees them; one rank is a plain job); wait
    /// with [`Coordinator::wait_gang`].
    pub fn submit_gang(
        &self,
        task: &Task,
        ranks: Vec<(Route, Vec<u32>)>,
        threads: usize,
    ) -> Vec<Ticket> {
        let gang = ranks.len() > 1;
        self.submit_jobs(task, ranks, threads, gang)
    }

    fn submit_jobs(
        &self,
        task: &Task,
        jobs: Vec<(Route, Vec<u32>)>,
        threads: usize,
        gang: bool,
    ) -> Vec<Ticket> {
        let world = jobs.len() as u32;
        let mut state = self.hub.lock();
        let gang_id = state.next_id + 1;
        let mut tickets = vec![];
        // Under one lock: a gang's jobs are contiguous in the queue.
        for (rank, (route, gpus)) in jobs.into_iter().enumerate() {
            let (reply, replies) = mpsc::channel();
            state.next_id += 1;
            let id = state.next_id;
            state.queue.push_back(Job {
                id,
                task: task.clone(),
                route,
                threads,
                gpus,
                gang: gang.then_some(GangMember {
                    gang: gang_id,
                    rank: rank as u32,
                    world,
                }),
                reply,
            });
            tickets.push(Ticket {
                id,
                stage: task.stage.clone(),
                replies,
            });
        }
        drop(state);
        self.hub.queued.notify_waiters();
        tickets
    }

    /// Blocks until the job ends. Forwards worker log lines and progress; revokes a lease whose
    /// worker went silent; `check` is polled about every 200 ms and may end the wait (e.g.
    /// a Slurm job that ended without reporting).
    pub fn wait(
        &self,
        ticket: Ticket,
        progress: &dyn ProgressSink,
        cancel: &AtomicBool,
        mut check: impl FnMut(bool) -> Option<StageError>,
    ) -> Result<RemoteOutcome, StageError> {
        self.wait_gang(vec![ticket], progress, cancel, |_, leased| check(leased))
    }

    /// [`Coordinator::wait`] for the jobs of [`Coordinator::submit_gang`] (`check` gets the
    /// rank too). Rank 0's log lines and progress are the stage's; other ranks' lines are
    /// forwarded prefixed with their rank. The first rank to fail abandons the gang (the
    /// others are cancelled); the error reported is the failing rank's, not the ones it
    /// released, and is transient when any rank was lost. On success: rank 0's outputs.
    pub fn wait_gang(
        &self,
        tickets: Vec<Ticket>,
        progress: &dyn ProgressSink,
        cancel: &AtomicBool,
        mut check: impl FnMut(usize, bool) -> Option<StageError>,
    ) -> Result<RemoteOutcome, StageError> {
        let stage = tickets.first().map(|t| t.stage.clone()).unwrap_or_default();
        let gang = tickets.len() > 1;
        let ids: Vec<u64> = tickets.iter().map(|t| t.id).collect();
        // Each rank's end, with the order in which the failures arrived.
        let mut ends: Vec<Option<Result<RemoteOutcome, StageError>>> =
            (0..tickets.len()).map(|_| None).collect();
        let mut failure_order: Vec<usize> = vec![];
        let mut abandoned = false;
        let mut abandoned_at = Instant::now();
        while ends.iter().any(Option::is_none) {
            let grace = self.hub.lease_timeout;
            if abandoned && abandoned_at.elapsed() > grace {
                // A rank stuck in a collective (e.g. NCCL waiting for a dead peer) must not
                // hold the run: revoke it (its late result is refused) and report its worker.
                for (rank, end) in ends.iter_mut().enumerate() {
                    if end.is_none() {
                        let stuck = self.revoke(ids[rank]);
                        let hook = self.stuck_rank.lock().unwrap_or_else(|p| p.into_inner());
                        if let (Some(worker), Some(hook)) = (&stuck, hook.as_ref()) {
                            hook(worker);
                        }
                        progress.log(
                            &stage,
                            &format!(
                                "rank {rank} (on {}) did not stop within {grace:?} of another \
                                 rank's failure; its lease was revoked",
                                stuck.map_or("no worker".into(), |w| w.label())
                            ),
                        );
                        // Told to stop and did not: not the gang's cause, and not "lost".
                        *end = Some(Err(StageError::Cancelled));
                    }
                }
                break;
            }
            std::thread::sleep(Duration::from_millis(if gang { 100 } else { 0 }));
            for (rank, ticket) in tickets.iter().enumerate() {
                if ends[rank].is_some() {
                    continue;
                }
                let timeout = if gang { 0 } else { 200 };
                let end = match ticket.replies.recv_timeout(Duration::from_millis(timeout)) {
                    Ok(JobEnd::Done(outcome, lines)) => {
                        forward_lines(progress, &ticket.stage, rank, lines);
                        Some(Ok(outcome))
                    }
                    Ok(JobEnd::Failed(e, lines)) => {
                        forward_lines(progress, &ticket.stage, rank, lines);
                        Some(Err(e))
                    }
                    Err(mpsc::RecvTimeoutError::Disconnected) => Some(Err(StageError::Transient(
                        anyhow::anyhow!("the coordinator dropped the job of {stage}"),
                    ))),
                    Err(mpsc::RecvTimeoutError::Timeout) => self.watch(
                        ticket,
                        rank,
                        gang,
                        progress,
                        cancel.load(Ordering::Relaxed) || abandoned,
                        &mut check,
                    ),
                };
                if let Some(end) = end {
                    if end.is_err() {
                        failure_order.push(rank);
                    }
                    ends[rank] = Some(end);
                }
            }
            if gang && !failure_order.is_empty() && !abandoned {
                abandoned = true;
                abandoned_at = Instant::now();
                self.abandon(&ids);
            }
        }
        if gang {
            self.forget_gang(&ids);
        }
        {
            let mut state = self.hub.lock();
            for id in &ids {
                state.limits.remove(id);
            }
        }
        let mut ends: Vec<Result<RemoteOutcome, StageError>> = ends
            .into_iter()
            .map(|e| e.expect("every rank ended"))
            .collect();
        if failure_order.is_empty() {
            let mut first = ends.swap_remove(0).expect("no failures");
            if gang {
                let others: Vec<String> = ends
                    .into_iter()
                    .map(|e| e.map(|o| o.worker).unwrap_or_default())
                    .collect();
                first.worker = format!("{} + {}", first.worker, others.join(" + "));
            }
            return Ok(first);
        }
        gang_failure(ends, &failure_order)
    }

    /// One look at a job still running: forwards its lines, revokes a silent lease, passes on
    /// cancellation. `Some` when the job ended here.
    fn watch(
        &self,
        ticket: &Ticket,
        rank: usize,
        gang: bool,
        progress: &dyn ProgressSink,
        cancelled: bool,
        check: &mut impl FnMut(usize, bool) -> Option<StageError>,
    ) -> Option<Result<RemoteOutcome, StageError>> {
        let mut state = self.hub.lock();
        if let Some(pos) = state.queue.iter().position(|j| j.id == ticket.id) {
            if cancelled {
                state.queue.remove(pos);
                return Some(Err(StageError::Cancelled));
            }
        }
        let lease_id = state
            .leases
            .iter()
            .find(|(_, l)| l.job.id == ticket.id)
            .map(|(&id, _)| id);
        let leased = lease_id.is_some();
        if let Some(id) = lease_id {
            let lease = state.leases.get_mut(&id).expect("found above");
            lease.cancel |= cancelled;
            forward_lines(progress, &ticket.stage, rank, lease.lines.drain(..));
            if let (Some(p), 0) = (&lease.progress, rank) {
                progress.progress(&ticket.stage, p.done, p.total, &p.unit);
            }
            let silent = lease.last_beat.elapsed();
            if silent > self.hub.lease_timeout {
                let lease = state.leases.remove(&id).expect("found above");
                let worker = worker_label(&lease, gang, rank);
                return Some(Err(StageError::Transient(anyhow::anyhow!(
                    "worker {worker} lost: no heartbeat for {:.1}s",
                    silent.as_secs_f64()
                ))));
            }
        }
        let stall = *self
            .hub
            .stall_timeout
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if let (Some(&limit), Some(id)) = (state.limits.get(&ticket.id), lease_id) {
            let ran = state.leases[&id].leased_at.elapsed();
            if ran > limit {
                let worker = self.revoke_stuck(state, id, gang, rank);
                return Some(Err(StageError::Transient(anyhow::anyhow!(
                    "worker {worker} ran past the stage's time limit ({:.0}s); its lease was \
                     revoked",
                    limit.as_secs_f64()
                ))));
            }
        }
        if let (Some(limit), Some(id)) = (stall, lease_id) {
            let still = state.leases[&id].progressed.elapsed();
            if still > limit {
                let worker = self.revoke_stuck(state, id, gang, rank);
                return Some(Err(StageError::Transient(anyhow::anyhow!(
                    "worker {worker} hung: no progress for {:.0}s (--stall-timeout); its lease \
                     was revoked",
                    still.as_secs_f64()
                ))));
            }
        }
        drop(state);
        if let Some(e) = check(rank, leased) {
            self.revoke(ticket.id);
            return Some(Err(e));
        }
        None
    }

    /// Revokes a lease whose worker will not stop on its own (a hang, a time limit) and hands
    /// the worker to the stuck-rank hook (the local pool kills and restarts it, freeing its
    /// GPU); returns how to name the worker in the error.
    fn revoke_stuck(
        &self,
        mut state: std::sync::MutexGuard<'_, HubState>,
        id: u64,
        gang: bool,
        rank: usize,
    ) -> String {
        let lease = state.leases.remove(&id).expect("the caller found it");
        drop(state);
        let hook = self.stuck_rank.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(hook) = hook.as_ref() {
            hook(&lease.worker);
        }
        worker_label(&lease, gang, rank)
    }

    /// Gives the jobs of these tickets a wall-clock limit, counted from when each is leased:
    /// past it the lease is revoked (transient) and a local worker still on it is killed.
    pub fn limit_time(&self, tickets: &[Ticket], limit: Duration) {
        let mut state = self.hub.lock();
        for t in tickets {
            state.limits.insert(t.id, limit);
        }
    }

    /// Revoke (as transient) a leased stage whose progress has not moved for `limit`: a hang
    /// (e.g. every rank of a gang waiting in a collective, heartbeating from its threads).
    pub fn set_stall_timeout(&self, limit: Option<Duration>) {
        *self
            .hub
            .stall_timeout
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = limit;
    }

    /// A rank of the gang failed: refuse its exchanges and cancel the other ranks.
    fn abandon(&self, jobs: &[u64]) {
        let mut state = self.hub.lock();
        // A gang's id is its rank 0's job id.
        state.abandoned.insert(jobs[0]);
        for lease in state.leases.values_mut() {
            if jobs.contains(&lease.job.id) {
                lease.cancel = true;
            }
        }
        drop(state);
        self.hub.exchanged.notify_waiters();
    }

    fn forget_gang(&self, jobs: &[u64]) {
        let mut state = self.hub.lock();
        state.exchanges.retain(|(gang, _), _| !jobs.contains(gang));
        state.abandoned.retain(|gang| !jobs.contains(gang));
    }

    /// A worker process is gone: revoke its leases now (their jobs fail as transient).
    pub fn worker_lost(&self, name: &str, why: &str) {
        let mut state = self.hub.lock();
        let ids: Vec<u64> = state
            .leases
            .iter()
            .filter(|(_, l)| l.worker.name == name)
            .map(|(&id, _)| id)
            .collect();
        for id in ids {
            let lease = state.leases.remove(&id).expect("listed above");
            let error = StageError::Transient(anyhow::anyhow!(
                "worker {} lost: {why}",
                lease.worker.label()
            ));
            let _ = lease.job.reply.send(JobEnd::Failed(error, lease.lines));
        }
    }

    /// Jobs waiting for a worker, and jobs leased.
    pub fn load(&self) -> (usize, usize) {
        let state = self.hub.lock();
        (state.queue.len(), state.leases.len())
    }

    /// Drops the job (queued or leased); the worker that held it, if any.
    fn revoke(&self, job: u64) -> Option<WorkerInfo> {
        let mut state = self.hub.lock();
        state.queue.retain(|j| j.id != job);
        let lease = state
            .leases
            .iter()
            .find(|(_, l)| l.job.id == job)
            .map(|(&id, _)| id)?;
        state.leases.remove(&lease).map(|l| l.worker)
    }
}

/// The stage's error when ranks of a gang failed: the first failure that is not a rank
/// merely released by another's (transient if any rank was lost, so the stage is retried).
fn gang_failure(
    mut ends: Vec<Result<RemoteOutcome, StageError>>,
    failure_order: &[usize],
) -> Result<RemoteOutcome, StageError> {
    if ends.len() == 1 {
        return ends.pop().expect("one end");
    }
    let is_cause = |e: &StageError| !matches!(e, StageError::Cancelled | StageError::Released(_));
    let errors: Vec<(usize, &StageError)> = failure_order
        .iter()
        .filter_map(|&r| ends[r].as_ref().err().map(|e| (r, e)))
        .collect();
    let (rank, cause) = errors
        .iter()
        .find(|(_, e)| is_cause(e))
        .or(errors.first())
        .copied()
        .expect("at least one rank failed");
    let lost = errors
        .iter()
        .any(|(_, e)| matches!(e, StageError::Transient(_)));
    let message = anyhow::anyhow!("data-parallel rank {rank}: {cause}");
    Err(match cause {
        StageError::Cancelled if !lost => StageError::Cancelled,
        _ if lost => StageError::Transient(message),
        _ => StageError::Fatal(message),
    })
}

impl Drop for Coordinator {
    fn drop(&mut self) {
        let t = self.traffic();
        tracing::info!(
            "data plane: sent {} input artifacts ({} bytes) to workers, received {} uploads \
             ({} bytes); checkpoints in {} write transactions",
            t.artifacts_served,
            t.bytes_served,
            t.uploads,
            t.bytes_received,
            t.checkpoint_transactions
        );
        if let Some(tx) = self.shutdown.lock().ok().and_then(|mut s| s.take()) {
            let _ = tx.send(());
        }
        if let Some(server) = self.server.lock().ok().and_then(|mut s| s.take()) {
            let _ = server.join();
        }
    }
}

mod http;
use http::*;
pub(crate) use http::{artifact_frame, store_call};

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::{ClaimRequest, Failure, Heartbeat};

    fn fatal(message: String) -> Result<RemoteOutcome, StageError> {
        Err(StageError::Fatal(anyhow::anyhow!(message)))
    }

    /// What a rank released by another's failure reports (`Failure::released`).
    fn released() -> Result<RemoteOutcome, StageError> {
        Err(StageError::Released(anyhow::anyhow!(
            "rank 0 closed its connection: another rank of the data-parallel group failed"
        )))
    }

    #[test]
    fn a_gang_reports_the_failing_rank_not_the_ones_it_released() {
        // Rank 1's release arrived first; rank 0's own error is the cause.
        let e = gang_failure(vec![fatal("out of memory".into()), released()], &[1, 0]).unwrap_err();
        assert!(matches!(e, StageError::Fatal(_)), "{e}");
        assert!(e.to_string().contains("rank 0: out of memory"), "{e}");
        // A lost rank makes the gang's failure transient, so the stage is retried.
        let lost = Err(StageError::Transient(anyhow::anyhow!("worker cpu1 lost")));
        let e = gang_failure(vec![released(), lost], &[0, 1]).unwrap_err();
        assert!(matches!(e, StageError::Transient(_)), "{e}");
        assert!(
            e.to_string()
                .contains("rank 1: transient: worker cpu1 lost"),
            "{e}"
        );
        // Ranks that were only cancelled: the stage was cancelled.
        let done = Ok(RemoteOutcome {
            artifacts: vec![],
            log_tail: vec![],
            worker: "cpu0".into(),
        });
        let e = gang_failure(vec![done, Err(StageError::Cancelled)], &[1]).unwrap_err();
        assert!(matches!(e, StageError::Cancelled), "{e}");
    }

    struct Quiet;
    impl ProgressSink for Quiet {
        fn progress(&self, _: &str, _: u64, _: u64, _: &str) {}
        fn log(&self, _: &str, _: &str) {}
    }

    /// A coordinator over real HTTP with a gang of two jobs submitted, and a client.
    struct GangOfTwo {
        _dir: tempfile::TempDir,
        coordinator: Arc<Coordinator>,
        tickets: Vec<Ticket>,
        client: crate::worker::Client,
    }

    fn gang_of_two(lease_timeout: Duration) -> GangOfTwo {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(Store::open_writer(&dir.path().join("store.redb")).unwrap());
        let coordinator =
            Coordinator::start(store, "127.0.0.1:0".parse().unwrap(), None, lease_timeout).unwrap();
        let task = Task {
            key: Digest::of(b"gang"),
            kind: "util.work".into(),
            stage: "train".into(),
            params: serde_json::json!({}),
            inputs: Default::default(),
            attempt: 0,
        };
        let tickets = coordinator.submit_gang(&task, vec![(Route::Any, vec![]); 2], 1);
        let client = crate::worker::Client::new(coordinator.url(), coordinator.token());
        GangOfTwo {
            _dir: dir,
            coordinator,
            tickets,
            client,
        }
    }

    /// Claims the next rank's job as worker `name`.
    fn claim_as(client: &crate::worker::Client, name: &str) -> crate::protocol::Claim {
        let req = ClaimRequest {
            worker: WorkerInfo {
                name: name.into(),
                host: "test".into(),
                pid: 0,
                gpu: None,
            },
            task: None,
            wait_ms: 1000,
        };
        client.claim(&req).unwrap().expect("a rank job")
    }

    /// Over real HTTP: rank 0 fails; rank 1 keeps heartbeating but never ends (as a rank stuck
    /// in NCCL would). After the lease timeout it is revoked and its worker reported, the
    /// gang fails with rank 0's error, and rank 1's late heartbeat is refused.
    #[test]
    fn a_rank_that_does_not_stop_after_its_gang_failed_is_revoked_and_reported() {
        let GangOfTwo {
            coordinator,
            tickets,
            client,
            ..
        } = gang_of_two(Duration::from_millis(500));
        let stuck = Arc::new(Mutex::new(vec![]));
        let seen = stuck.clone();
        coordinator.on_stuck_rank(Box::new(move |w| seen.lock().unwrap().push(w.name.clone())));
        let claim = |name: &str| claim_as(&client, name);
        let (first, second) = (claim("a"), claim("b"));
        assert_eq!(first.gang.map(|g| (g.rank, g.world)), Some((0, 2)));
        assert_eq!(second.gang.map(|g| (g.rank, g.world)), Some((1, 2)));
        let beating = {
            let client = client.clone();
            std::thread::spawn(move || {
                let mut cancel_seen = false;
                while let Ok(Some(reply)) = client.heartbeat(&second.key(), &Heartbeat::default()) {
                    cancel_seen |= reply.cancel;
                    std::thread::sleep(Duration::from_millis(100));
                }
                cancel_seen
            })
        };
        let failure = Failure {
            error: "boom".into(),
            transient: false,
            cancelled: false,
            released: false,
            log_tail: vec![],
        };
        assert!(client.fail(&first.key(), &failure).unwrap());
        let started = Instant::now();
        let result = coordinator.wait_gang(tickets, &Quiet, &AtomicBool::new(false), |_, _| None);
        let e = result.unwrap_err();
        assert!(matches!(e, StageError::Fatal(_)), "{e}");
        assert!(e.to_string().contains("rank 0: boom"), "{e}");
        assert!(started.elapsed() < Duration::from_secs(5));
        assert_eq!(*stuck.lock().unwrap(), vec!["b".to_string()]);
        // The stuck rank was told to cancel, then lost its lease.
        assert!(beating.join().unwrap(), "rank 1 was asked to cancel");
    }

    /// Over real HTTP: both ranks log a last line and end before `wait_gang` looks at them;
    /// the lines still reach the stage's log (rank 1's prefixed), none lost with the lease.
    #[test]
    fn lines_a_job_logged_just_before_it_ended_are_forwarded() {
        #[derive(Default)]
        struct Recorder(Mutex<Vec<String>>);
        impl ProgressSink for Recorder {
            fn progress(&self, _: &str, _: u64, _: u64, _: &str) {}
            fn log(&self, _: &str, line: &str) {
                self.0.lock().unwrap().push(line.to_string());
            }
        }
        let GangOfTwo {
            coordinator,
            tickets,
            client,
            ..
        } = gang_of_two(Duration::from_secs(30));
        for name in ["a", "b"] {
            let claim = claim_as(&client, name);
            let rank = claim.gang.expect("a gang member").rank;
            let beat = Heartbeat {
                lines: vec![format!("last line of rank {rank}")],
                ..Heartbeat::default()
            };
            client.heartbeat(&claim.key(), &beat).unwrap();
            assert!(client.complete(&claim.key(), &[], &[]).unwrap());
        }
        let recorder = Recorder::default();
        coordinator
            .wait_gang(tickets, &recorder, &AtomicBool::new(false), |_, _| None)
            .unwrap();
        let mut lines = recorder.0.into_inner().unwrap();
        lines.sort();
        assert_eq!(
            lines,
            vec!["last line of rank 0", "rank 1: last line of rank 1"]
        );
    }
}
