//! The worker side of the protocol ([`crate::protocol`]): `deeprepair worker` claims tasks
//! from a coordinator over HTTP and runs them with the same stage kinds the coordinator
//! knows, reaching inputs and checkpoints through HTTP ([`HttpStore`]). A background
//! thread heartbeats every second, carrying log lines and progress, and learns of
//! cancellation.

use crate::cache::ArtifactCache;
use crate::protocol::{
    frame_parts, read_frame, Claim, ClaimRequest, ExchangePost, ExchangeReply, Failure, GangMember,
    Heartbeat, HeartbeatReply, StageProgress, WorkerInfo, LEASE_HEADER,
};
use anyhow::{bail, Context};
use deeprepair_pipeline::kind::{ProgressSink, StageCtx, StageError, Task, TaskStore};
use deeprepair_pipeline::{Artifact, Digest, Gang, Registry};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// A lease this worker holds: its id and the secret that proves it.
#[derive(Clone, Debug)]
pub struct LeaseKey {
    pub id: u64,
    pub secret: String,
}

impl Claim {
    pub fn key(&self) -> LeaseKey {
        LeaseKey {
            id: self.lease,
            secret: self.secret.clone(),
        }
    }
}

/// Reads a list of byte slices one after another (a frame's head and artifacts, unjoined).
pub(crate) struct PiecesReader<'a> {
    pieces: Vec<&'a [u8]>,
    at: usize,
}

impl<'a> PiecesReader<'a> {
    pub(crate) fn new(pieces: Vec<&'a [u8]>) -> PiecesReader<'a> {
        PiecesReader { pieces, at: 0 }
    }
}

impl std::io::Read for PiecesReader<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        while let Some(piece) = self.pieces.get_mut(self.at) {
            if piece.is_empty() {
                self.at += 1;
                continue;
            }
            let n = piece.len().min(buf.len());
            buf[..n].copy_from_slice(&piece[..n]);
            *piece = &piece[n..];
            return Ok(n);
        }
        Ok(0)
    }
}

/// A blocking HTTP client of one coordinator.
#[derive(Clone)]
pub struct Client {
    agent: ureq::Agent,
    base: String,
    auth: String,
}

impl Client {
    pub fn new(base: &str, token: &str) -> Client {
        Self::build(base, token, None)
    }

    /// A client of an `https://` coordinator that trusts exactly the certificates in `ca_pem`
    /// (e.g. the coordinator's own self-signed certificate).
    pub fn with_ca(base: &str, token: &str, ca_pem: &[u8]) -> anyhow::Result<Client> {
        let certs: Vec<ureq::tls::Certificate<'static>> = ureq::tls::parse_pem(ca_pem)
            .filter_map(|item| match item {
                Ok(ureq::tls::PemItem::Certificate(cert)) => Some(Ok(cert)),
                Ok(_) => None,
                Err(e) => Some(Err(e)),
            })
            .collect::<Result<_, _>>()
            .context("reading the coordinator's certificate")?;
        if certs.is_empty() {
            bail!("no certificate in the PEM given to trust the coordinator");
        }
        Ok(Self::build(base, token, Some(certs)))
    }

    fn build(
        base: &str,
        token: &str,
        trust: Option<Vec<ureq::tls::Certificate<'static>>>,
    ) -> Client {
        let mut config = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(Duration::from_secs(600)));
        if let Some(certs) = trust {
            config = config.tls_config(
                ureq::tls::TlsConfig::builder()
                    .root_certs(ureq::tls::RootCerts::Specific(Arc::new(certs)))
                    .build(),
            );
        }
        Client {
            agent: ureq::Agent::new_with_config(config.build()),
            base: base.trim_end_matches('/').to_string(),
            auth: format!("Bearer {token}"),
        }
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    fn read_all(response: &mut ureq::http::Response<ureq::Body>) -> anyhow::Result<Vec<u8>> {
        Ok(response
            .body_mut()
            .with_config()
            .limit(u64::MAX)
            .read_to_vec()?)
    }

    fn check(
        mut response: ureq::http::Response<ureq::Body>,
        what: &str,
    ) -> anyhow::Result<ureq::http::Response<ureq::Body>> {
        let status = response.status().as_u16();
        if (200..300).contains(&status) {
            return Ok(response);
        }
        let text = Self::read_all(&mut response).unwrap_or_default();
        bail!(
            "{what}: coordinator answered {status}: {}",
            String::from_utf8_lossy(&text)
        )
    }

    /// A task, or `None` when the coordinator had none within `wait`.
    pub fn claim(&self, req: &ClaimRequest) -> anyhow::Result<Option<Claim>> {
        let mut response = Self::check(
            self.agent
                .post(self.url("/v1/claim"))
                .header("Authorization", &self.auth)
                .send_json(req)?,
            "claim",
        )?;
        if response.status().as_u16() == 204 {
            return Ok(None);
        }
        Ok(Some(serde_json::from_slice(&Self::read_all(
            &mut response,
        )?)?))
    }

    /// `None` when the lease is no longer held (revoked: abandon the task).
    pub fn heartbeat(
        &self,
        lease: &LeaseKey,
        beat: &Heartbeat,
    ) -> anyhow::Result<Option<HeartbeatReply>> {
        let response = self
            .agent
            .post(self.url(&format!("/v1/leases/{}/heartbeat", lease.id)))
            .header("Authorization", &self.auth)
            .header(LEASE_HEADER, &lease.secret)
            .send_json(beat)?;
        if response.status().as_u16() == 410 {
            return Ok(None);
        }
        let mut response = Self::check(response, "heartbeat")?;
        Ok(Some(serde_json::from_slice(&Self::read_all(
            &mut response,
        )?)?))
    }

    /// An input of the lease's task, streamed and verified as it arrives (held once).
    pub fn artifact(&self, lease: &LeaseKey, digest: &Digest) -> anyhow::Result<Artifact> {
        let mut response = Self::check(
            self.agent
                .get(self.url(&format!(
                    "/v1/leases/{}/artifacts/{}",
                    lease.id,
                    digest.hex()
                )))
                .header("Authorization", &self.auth)
                .header(LEASE_HEADER, &lease.secret)
                .call()?,
            &format!("fetching artifact {}", digest.short()),
        )?;
        let mut reader = response.body_mut().with_config().limit(u64::MAX).reader();
        let (mut artifacts, _) = read_frame(&mut reader, u64::MAX)
            .with_context(|| format!("fetching artifact {}", digest.short()))?;
        match artifacts.pop() {
            Some(a) if artifacts.is_empty() && a.digest() == *digest => Ok(a),
            _ => bail!(
                "the coordinator sent something else for artifact {}",
                digest.short()
            ),
        }
    }

    pub fn load_checkpoint(&self, lease: &LeaseKey) -> anyhow::Result<Option<Vec<u8>>> {
        let mut response = Self::check(
            self.agent
                .get(self.url(&format!("/v1/leases/{}/checkpoint", lease.id)))
                .header("Authorization", &self.auth)
                .header(LEASE_HEADER, &lease.secret)
                .call()?,
            "loading the checkpoint",
        )?;
        if response.status().as_u16() == 204 {
            return Ok(None);
        }
        Ok(Some(Self::read_all(&mut response)?))
    }

    pub fn save_checkpoint(&self, lease: &LeaseKey, bytes: &[u8]) -> anyhow::Result<()> {
        Self::check(
            self.agent
                .put(self.url(&format!("/v1/leases/{}/checkpoint", lease.id)))
                .header("Authorization", &self.auth)
                .header(LEASE_HEADER, &lease.secret)
                .header("Expect", "100-continue")
                .send(bytes)?,
            "saving the checkpoint",
        )?;
        Ok(())
    }

    /// `Ok(false)` when the lease was revoked meanwhile (the result is not wanted). The
    /// frame streams from the artifacts' own bytes (not copied into one buffer).
    pub fn complete(
        &self,
        lease: &LeaseKey,
        artifacts: &[Artifact],
        log_tail: &[String],
    ) -> anyhow::Result<bool> {
        let (head, bytes) = frame_parts(artifacts, log_tail);
        let len = head.len() + bytes.iter().map(|b| b.len()).sum::<usize>();
        let mut pieces = vec![head.as_slice()];
        pieces.extend(bytes);
        let mut reader = PiecesReader { pieces, at: 0 };
        self.send_frame(lease, "complete", len, &mut reader)
    }

    /// Posts a frame of `len` bytes read from `reader` to `/v1/leases/{id}/{what}`.
    pub fn send_frame(
        &self,
        lease: &LeaseKey,
        what: &str,
        len: usize,
        reader: &mut dyn std::io::Read,
    ) -> anyhow::Result<bool> {
        let response = self
            .agent
            .post(self.url(&format!("/v1/leases/{}/{what}", lease.id)))
            .header("Authorization", &self.auth)
            .header(LEASE_HEADER, &lease.secret)
            .header("Content-Length", len.to_string())
            // The body goes only once the coordinator has accepted the headers (token, lease
            // secret, size): a refusal (e.g. 410, revoked meanwhile) comes back as an answer,
            // not as a broken pipe halfway through the upload.
            .header("Expect", "100-continue")
            .send(ureq::SendBody::from_reader(reader))?;
        if response.status().as_u16() == 410 {
            return Ok(false);
        }
        Self::check(response, "reporting completion")?;
        Ok(true)
    }

    /// Posts this rank's payload to the gang's exchange `name` and waits for every rank's.
    pub fn exchange(
        &self,
        lease: &LeaseKey,
        post: &ExchangePost,
        cancel: &AtomicBool,
    ) -> anyhow::Result<Vec<Vec<u8>>> {
        loop {
            if cancel.load(Ordering::Relaxed) {
                bail!(
                    "cancelled while waiting for the other ranks ({})",
                    post.name
                );
            }
            let mut response = Self::check(
                self.agent
                    .post(self.url(&format!("/v1/leases/{}/exchange", lease.id)))
                    .header("Authorization", &self.auth)
                    .header(LEASE_HEADER, &lease.secret)
                    .send_json(post)?,
                &format!("gang exchange '{}'", post.name),
            )?;
            if response.status().as_u16() == 204 {
                continue;
            }
            let reply: ExchangeReply = serde_json::from_slice(&Self::read_all(&mut response)?)?;
            return Ok(reply.payloads);
        }
    }

    /// This machine's address as the coordinator sees it (the interface that reaches it).
    fn local_address(&self) -> anyhow::Result<std::net::IpAddr> {
        let authority = self
            .base
            .split_once("://")
            .map_or(self.base.as_str(), |(_, rest)| rest);
        let authority = authority.split('/').next().unwrap_or(authority);
        let stream = std::net::TcpStream::connect(authority)
            .with_context(|| format!("reaching the coordinator at {authority}"))?;
        Ok(stream.local_addr()?.ip())
    }

    /// `Ok(false)` when the lease was revoked meanwhile.
    pub fn fail(&self, lease: &LeaseKey, failure: &Failure) -> anyhow::Result<bool> {
        let response = self
            .agent
            .post(self.url(&format!("/v1/leases/{}/fail", lease.id)))
            .header("Authorization", &self.auth)
            .header(LEASE_HEADER, &lease.secret)
            .send_json(failure)?;
        if response.status().as_u16() == 410 {
            return Ok(false);
        }
        Self::check(response, "reporting failure")?;
        Ok(true)
    }
}

/// A running stage's view of the store, over HTTP; inputs through the node's cache when the
/// worker has one; checkpoints uploaded in the background ([`CheckpointUploader`]).
pub struct HttpStore {
    client: Client,
    lease: LeaseKey,
    cache: Option<Arc<ArtifactCache>>,
    checkpoints: CheckpointUploader,
}

impl HttpStore {
    pub fn new(client: Client, lease: LeaseKey, cache: Option<Arc<ArtifactCache>>) -> HttpStore {
        HttpStore {
            checkpoints: CheckpointUploader::start(client.clone(), lease.clone()),
            client,
            lease,
            cache,
        }
    }

    /// Waits for the checkpoint upload in flight and the one pending, if any; the first
    /// upload error since the last call.
    pub fn flush_checkpoints(&self) -> anyhow::Result<()> {
        self.checkpoints.flush()
    }

    /// Drops a pending checkpoint (the stage succeeded: its checkpoint is not wanted) and
    /// waits for the one in flight.
    pub fn discard_checkpoints(&self) {
        self.checkpoints.discard();
    }
}

impl TaskStore for HttpStore {
    fn get_artifact(&self, digest: &Digest) -> anyhow::Result<Artifact> {
        match &self.cache {
            Some(cache) => cache.get_or_fetch(digest, || self.client.artifact(&self.lease, digest)),
            None => self.client.artifact(&self.lease, digest),
        }
    }
    /// Returns once the bytes are queued: the stage trains on while they upload.
    fn save_checkpoint(&self, _key: &Digest, bytes: &[u8]) -> anyhow::Result<()> {
        self.checkpoints.save(bytes)
    }
    fn load_checkpoint(&self, _key: &Digest) -> anyhow::Result<Option<Vec<u8>>> {
        self.checkpoints.flush()?;
        self.client.load_checkpoint(&self.lease)
    }
}

#[derive(Default)]
struct UploaderState {
    /// The newest checkpoint not yet being uploaded (a newer one replaces it: only the
    /// latest matters, the store keeps one per stage).
    pending: Option<Vec<u8>>,
    uploading: bool,
    /// The first failure not yet reported to the stage.
    error: Option<anyhow::Error>,
    closed: bool,
}

/// Uploads a stage's checkpoints on a thread of its own, so a training stage does not wait
/// for the coordinator's writer each epoch. At most one checkpoint waits while another
/// uploads; an upload failure is reported by the next `save` (or `flush`).
pub struct CheckpointUploader {
    shared: Arc<(Mutex<UploaderState>, std::sync::Condvar)>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl CheckpointUploader {
    pub fn start(client: Client, lease: LeaseKey) -> CheckpointUploader {
        let shared = Arc::new((
            Mutex::new(UploaderState::default()),
            std::sync::Condvar::new(),
        ));
        let thread = {
            let shared = shared.clone();
            std::thread::spawn(move || {
                let (lock, changed) = &*shared;
                let mut state = lock.lock().unwrap_or_else(|p| p.into_inner());
                loop {
                    if let Some(bytes) = state.pending.take() {
                        state.uploading = true;
                        drop(state);
                        let result = client.save_checkpoint(&lease, &bytes);
                        drop(bytes);
                        state = lock.lock().unwrap_or_else(|p| p.into_inner());
                        state.uploading = false;
                        if let Err(e) = result {
                            state.error.get_or_insert(e);
                        }
                        changed.notify_all();
                        continue;
                    }
                    if state.closed {
                        return;
                    }
                    state = changed.wait(state).unwrap_or_else(|p| p.into_inner());
                }
            })
        };
        CheckpointUploader {
            shared,
            thread: Some(thread),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, UploaderState> {
        self.shared.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn save(&self, bytes: &[u8]) -> anyhow::Result<()> {
        let mut state = self.lock();
        if let Some(e) = state.error.take() {
            return Err(e.context("uploading an earlier checkpoint"));
        }
        state.pending = Some(bytes.to_vec());
        self.shared.1.notify_all();
        Ok(())
    }

    fn wait_idle(&self, mut state: std::sync::MutexGuard<'_, UploaderState>) -> anyhow::Result<()> {
        while state.pending.is_some() || state.uploading {
            state = self.shared.1.wait(state).unwrap_or_else(|p| p.into_inner());
        }
        match state.error.take() {
            Some(e) => Err(e.context("uploading a checkpoint")),
            None => Ok(()),
        }
    }

    pub fn flush(&self) -> anyhow::Result<()> {
        self.wait_idle(self.lock())
    }

    pub fn discard(&self) {
        let mut state = self.lock();
        state.pending = None;
        let _ = self.wait_idle(state);
    }
}

impl Drop for CheckpointUploader {
    fn drop(&mut self) {
        self.lock().closed = true;
        self.shared.1.notify_all();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// This worker's place in a gang, meeting the other ranks through the coordinator.
struct HttpGang {
    client: Client,
    lease: LeaseKey,
    member: GangMember,
    address: std::net::IpAddr,
    cancel: Arc<AtomicBool>,
}

impl Gang for HttpGang {
    fn rank(&self) -> usize {
        self.member.rank as usize
    }
    fn world_size(&self) -> usize {
        self.member.world as usize
    }
    fn address(&self) -> std::net::IpAddr {
        self.address
    }
    fn exchange(&self, name: &str, payload: &[u8]) -> anyhow::Result<Vec<Vec<u8>>> {
        let post = ExchangePost {
            name: name.into(),
            payload: payload.to_vec(),
        };
        let payloads = self.client.exchange(&self.lease, &post, &self.cancel)?;
        if payloads.len() != self.world_size() {
            bail!(
                "gang exchange '{name}' returned {} payloads for {} ranks",
                payloads.len(),
                self.world_size()
            );
        }
        Ok(payloads)
    }
}

/// Collects log lines and progress for the next heartbeat.
#[derive(Default)]
struct Outbox {
    beat: Mutex<Heartbeat>,
    /// Held while a heartbeat is taken and sent, so lines reach the coordinator in order
    /// (the heartbeat thread and the final flush before the result both send).
    sending: Mutex<()>,
}

/// The most log text one heartbeat carries (well under the coordinator's control-message
/// limit): a stage that logs more in a second keeps its newest lines and says how many it
/// dropped, rather than losing its heartbeat, and so its lease.
const MAX_BEAT_LOG_BYTES: usize = 1 << 20;

impl Outbox {
    fn take(&self) -> Heartbeat {
        let mut beat = std::mem::take(&mut *self.beat.lock().unwrap_or_else(|p| p.into_inner()));
        let total: usize = beat.lines.iter().map(String::len).sum();
        if total > MAX_BEAT_LOG_BYTES {
            let mut kept = 0;
            let keep_from = beat
                .lines
                .iter()
                .rposition(|line| {
                    kept += line.len();
                    kept > MAX_BEAT_LOG_BYTES
                })
                .map_or(0, |i| i + 1);
            let mut lines = beat.lines.split_off(keep_from);
            lines.insert(
                0,
                format!(
                    "({} log lines dropped: more than {MAX_BEAT_LOG_BYTES} bytes in one heartbeat)",
                    keep_from
                ),
            );
            beat.lines = lines;
        }
        beat
    }
}

impl ProgressSink for Outbox {
    fn progress(&self, _stage: &str, done: u64, total: u64, unit: &str) {
        if let Ok(mut b) = self.beat.lock() {
            b.progress = Some(StageProgress {
                done,
                total,
                unit: unit.to_string(),
            });
        }
    }
    fn log(&self, _stage: &str, line: &str) {
        if let Ok(mut b) = self.beat.lock() {
            b.lines.push(line.to_string());
        }
    }
}

pub struct WorkerOptions {
    pub coordinator: String,
    pub token: String,
    pub name: String,
    /// The GPU this worker owns, as the coordinator numbers them.
    pub gpu: Option<u32>,
    /// Run this one task and exit (a Slurm job per stage).
    pub task: Option<Digest>,
    /// Exit after this long without work (`None`: until the coordinator goes away).
    pub idle_exit: Option<Duration>,
    /// PEM certificates to trust for an `https://` coordinator (its own, self-signed).
    pub tls_ca: Option<Vec<u8>>,
    /// Inputs are read through this node's cache (a folder, possibly shared by the workers of
    /// a node or a cluster), so each artifact crosses the wire once per cache, not per stage.
    pub cache: Option<Arc<ArtifactCache>>,
}

#[derive(Debug, Default)]
pub struct WorkerSummary {
    pub succeeded: usize,
    pub failed: usize,
}

/// Claims and runs tasks until told to stop (see [`WorkerOptions`]). Returns when the
/// coordinator has been unreachable for 30 s, when idle for `idle_exit`, or after its one task.
pub fn run_worker(options: &WorkerOptions, registry: &Registry) -> anyhow::Result<WorkerSummary> {
    let client = match &options.tls_ca {
        Some(pem) => Client::with_ca(&options.coordinator, &options.token, pem)?,
        None => Client::new(&options.coordinator, &options.token),
    };
    let info = WorkerInfo {
        name: options.name.clone(),
        host: hostname(),
        pid: std::process::id(),
        gpu: options.gpu,
    };
    let mut summary = WorkerSummary::default();
    let mut last_contact = Instant::now();
    let mut last_work = Instant::now();
    loop {
        let req = ClaimRequest {
            worker: info.clone(),
            task: options.task,
            wait_ms: 5_000,
        };
        let claim = match client.claim(&req) {
            Ok(c) => {
                last_contact = Instant::now();
                c
            }
            Err(e) => {
                if last_contact.elapsed() > Duration::from_secs(30) {
                    return Err(e.context(format!(
                        "coordinator {} unreachable for 30 s",
                        options.coordinator
                    )));
                }
                std::thread::sleep(Duration::from_millis(500));
                continue;
            }
        };
        let Some(claim) = claim else {
            let idle_limit = match options.task {
                Some(_) => Some(Duration::from_secs(60)),
                None => options.idle_exit,
            };
            if idle_limit.is_some_and(|limit| last_work.elapsed() > limit) {
                if let Some(task) = options.task {
                    bail!("the coordinator has no task {} for this job", task.short());
                }
                return Ok(summary);
            }
            continue;
        };
        let ok = run_claim(&client, claim, registry, options.cache.clone())?;
        if ok {
            summary.succeeded += 1;
        } else {
            summary.failed += 1;
        }
        last_work = Instant::now();
        if options.task.is_some() {
            return Ok(summary);
        }
    }
}

/// Runs one claimed task; `Ok(true)` when it completed.
fn run_claim(
    client: &Client,
    claim: Claim,
    registry: &Registry,
    cache: Option<Arc<ArtifactCache>>,
) -> anyhow::Result<bool> {
    let lease = claim.key();
    let task: Task = claim.task;
    let Some(kind) = registry.get(&task.kind).cloned() else {
        client.fail(
            &lease,
            &Failure {
                error: format!(
                    "this worker does not know stage kind '{}' (different binary versions?)",
                    task.kind
                ),
                transient: false,
                cancelled: false,
                released: false,
                log_tail: vec![],
            },
        )?;
        return Ok(false);
    };
    let outbox = Arc::new(Outbox::default());
    let cancel = Arc::new(AtomicBool::new(false));
    // Dropping `done` wakes the heartbeat thread at once (its receive fails).
    let (done, stage_running) = std::sync::mpsc::channel::<()>();
    let revoked = Arc::new(AtomicBool::new(false));
    let beats = {
        let (client, outbox, cancel, revoked, lease) = (
            client.clone(),
            outbox.clone(),
            cancel.clone(),
            revoked.clone(),
            lease.clone(),
        );
        std::thread::spawn(move || loop {
            {
                let _in_order = outbox.sending.lock().unwrap_or_else(|p| p.into_inner());
                let beat = outbox.take();
                match client.heartbeat(&lease, &beat) {
                    Ok(Some(reply)) => {
                        if reply.cancel {
                            cancel.store(true, Ordering::Relaxed);
                        }
                    }
                    Ok(None) => {
                        revoked.store(true, Ordering::Relaxed);
                        cancel.store(true, Ordering::Relaxed);
                        return;
                    }
                    Err(e) => tracing::warn!("heartbeat: {e:#}"),
                }
            }
            if let Err(std::sync::mpsc::RecvTimeoutError::Disconnected) =
                stage_running.recv_timeout(Duration::from_secs(1))
            {
                return;
            }
        })
    };
    let store = HttpStore::new(client.clone(), lease.clone(), cache);
    let gang = match claim.gang {
        Some(member) => Some(HttpGang {
            client: client.clone(),
            lease: lease.clone(),
            member,
            address: client.local_address()?,
            cancel: cancel.clone(),
        }),
        None => None,
    };
    let mut ctx = StageCtx::new(
        &task,
        &store,
        outbox.as_ref(),
        cancel.clone(),
        claim.threads.max(1),
        claim.gpus.clone(),
    );
    if let Some(gang) = &gang {
        ctx = ctx.with_gang(gang);
    }
    let outcome = deeprepair_pipeline::kind::run_catching_panics(kind.as_ref(), &mut ctx);
    // Rank 0's outputs are the stage's; the other ranks' copies need not travel.
    let outcome = match (outcome, claim.gang) {
        (Ok(_), Some(member)) if member.rank > 0 => Ok(vec![]),
        (outcome, _) => outcome,
    };
    let log_tail = ctx.log_tail().to_vec();
    drop(ctx);
    // A failed stage's retry resumes from its newest checkpoint: upload it first. A stage
    // that succeeded needs none (the commit drops it).
    let outcome = match outcome {
        Ok(artifacts) => {
            store.discard_checkpoints();
            Ok(artifacts)
        }
        Err(e) => {
            if let Err(upload) = store.flush_checkpoints() {
                tracing::warn!("{upload:#}");
            }
            Err(e)
        }
    };
    let id = lease.id;
    if revoked.load(Ordering::Relaxed) {
        drop(done);
        let _ = beats.join();
        tracing::warn!("lease {id} of {} was revoked; result dropped", task.stage);
        return Ok(false);
    }
    // Lines logged since the last heartbeat go now, before the result: the coordinator
    // forwards what a finished job's lease still holds and nothing after.
    {
        let _in_order = outbox.sending.lock().unwrap_or_else(|p| p.into_inner());
        let beat = outbox.take();
        if !beat.lines.is_empty() {
            if let Err(e) = client.heartbeat(&lease, &beat) {
                tracing::warn!("heartbeat: {e:#}");
            }
        }
    }
    // Heartbeats go on while the outputs upload (a slow upload must not lose its lease).
    let reported = match outcome {
        Ok(artifacts) => client
            .complete(&lease, &artifacts, &log_tail)
            .with_context(|| format!("uploading the outputs of {}", task.stage))
            .map(|taken| (taken, true)),
        Err(e) => {
            let failure = Failure {
                error: e.to_string(),
                transient: matches!(e, StageError::Transient(_)),
                cancelled: matches!(e, StageError::Cancelled),
                released: matches!(e, StageError::Released(_)),
                log_tail,
            };
            client.fail(&lease, &failure).map(|taken| (taken, false))
        }
    };
    drop(done);
    let _ = beats.join();
    let (taken, succeeded) = reported?;
    if !taken {
        tracing::warn!(
            "lease {id} of {} was revoked; {} dropped",
            task.stage,
            if succeeded { "result" } else { "failure" }
        );
    }
    Ok(taken && succeeded)
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .ok()
        .filter(|s| !s.is_empty())
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_else(|| "localhost".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_flood_of_log_lines_is_cut_to_fit_one_heartbeat() {
        let outbox = Outbox::default();
        let line = "x".repeat(1000);
        for _ in 0..3000 {
            outbox.log("s", &line);
        }
        outbox.log("s", "the newest line");
        let beat = outbox.take();
        let bytes: usize = beat.lines.iter().map(String::len).sum();
        assert!(bytes <= MAX_BEAT_LOG_BYTES + 200, "{bytes}");
        assert!(
            beat.lines[0].contains("log lines dropped"),
            "{}",
            beat.lines[0]
        );
        assert_eq!(beat.lines.last().unwrap(), "the newest line");
        // The next heartbeat starts empty; a small one is left alone.
        assert!(outbox.take().lines.is_empty());
        outbox.log("s", "one");
        assert_eq!(outbox.take().lines, vec!["one".to_string()]);
    }
}
