//! The worker side of the protocol ([`crate::protocol`]): `deeprepair worker` claims tasks
//! from a coordinator over HTTP and runs them with the same stage kinds the coordinator
//! knows, reaching inputs and checkpoints through HTTP ([`HttpStore`]). A background
//! thread heartbeats every second, carrying log lines and progress, and learns of
//! cancellation.

use crate::protocol::{
    decode_frame, encode_frame, Claim, ClaimRequest, ExchangePost, ExchangeReply, Failure,
    GangMember, Heartbeat, HeartbeatReply, WorkerInfo,
};
use anyhow::{bail, Context};
use deeprepair_pipeline::kind::{ProgressSink, StageCtx, StageError, Task, TaskStore};
use deeprepair_pipeline::{Artifact, Digest, Gang, Registry};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// A blocking HTTP client of one coordinator.
#[derive(Clone)]
pub struct Client {
    agent: ureq::Agent,
    base: String,
    auth: String,
}

impl Client {
    pub fn new(base: &str, token: &str) -> Client {
        let config = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(Duration::from_secs(600)))
            .build();
        Client {
            agent: ureq::Agent::new_with_config(config),
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
        lease: u64,
        beat: &Heartbeat,
    ) -> anyhow::Result<Option<HeartbeatReply>> {
        let response = self
            .agent
            .post(self.url(&format!("/v1/leases/{lease}/heartbeat")))
            .header("Authorization", &self.auth)
            .send_json(beat)?;
        if response.status().as_u16() == 410 {
            return Ok(None);
        }
        let mut response = Self::check(response, "heartbeat")?;
        Ok(Some(serde_json::from_slice(&Self::read_all(
            &mut response,
        )?)?))
    }

    pub fn artifact(&self, digest: &Digest) -> anyhow::Result<Artifact> {
        let mut response = Self::check(
            self.agent
                .get(self.url(&format!("/v1/artifacts/{}", digest.hex())))
                .header("Authorization", &self.auth)
                .call()?,
            &format!("fetching artifact {}", digest.short()),
        )?;
        let (mut artifacts, _) = decode_frame(&Self::read_all(&mut response)?)?;
        match artifacts.pop() {
            Some(a) if artifacts.is_empty() && a.digest() == *digest => Ok(a),
            _ => bail!(
                "the coordinator sent something else for artifact {}",
                digest.short()
            ),
        }
    }

    pub fn load_checkpoint(&self, lease: u64) -> anyhow::Result<Option<Vec<u8>>> {
        let mut response = Self::check(
            self.agent
                .get(self.url(&format!("/v1/leases/{lease}/checkpoint")))
                .header("Authorization", &self.auth)
                .call()?,
            "loading the checkpoint",
        )?;
        if response.status().as_u16() == 204 {
            return Ok(None);
        }
        Ok(Some(Self::read_all(&mut response)?))
    }

    pub fn save_checkpoint(&self, lease: u64, bytes: &[u8]) -> anyhow::Result<()> {
        Self::check(
            self.agent
                .put(self.url(&format!("/v1/leases/{lease}/checkpoint")))
                .header("Authorization", &self.auth)
                .send(bytes)?,
            "saving the checkpoint",
        )?;
        Ok(())
    }

    /// `Ok(false)` when the lease was revoked meanwhile (the result is not wanted).
    pub fn complete(
        &self,
        lease: u64,
        artifacts: &[Artifact],
        log_tail: &[String],
    ) -> anyhow::Result<bool> {
        let response = self
            .agent
            .post(self.url(&format!("/v1/leases/{lease}/complete")))
            .header("Authorization", &self.auth)
            .send(&encode_frame(artifacts, log_tail)[..])?;
        if response.status().as_u16() == 410 {
            return Ok(false);
        }
        Self::check(response, "reporting completion")?;
        Ok(true)
    }

    /// Posts this rank's payload to the gang's exchange `name` and waits for every rank's.
    pub fn exchange(
        &self,
        lease: u64,
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
                    .post(self.url(&format!("/v1/leases/{lease}/exchange")))
                    .header("Authorization", &self.auth)
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
    pub fn fail(&self, lease: u64, failure: &Failure) -> anyhow::Result<bool> {
        let response = self
            .agent
            .post(self.url(&format!("/v1/leases/{lease}/fail")))
            .header("Authorization", &self.auth)
            .send_json(failure)?;
        if response.status().as_u16() == 410 {
            return Ok(false);
        }
        Self::check(response, "reporting failure")?;
        Ok(true)
    }
}

/// A running stage's view of the store, over HTTP.
pub struct HttpStore {
    client: Client,
    lease: u64,
}

impl TaskStore for HttpStore {
    fn get_artifact(&self, digest: &Digest) -> anyhow::Result<Artifact> {
        self.client.artifact(digest)
    }
    fn save_checkpoint(&self, _key: &Digest, bytes: &[u8]) -> anyhow::Result<()> {
        self.client.save_checkpoint(self.lease, bytes)
    }
    fn load_checkpoint(&self, _key: &Digest) -> anyhow::Result<Option<Vec<u8>>> {
        self.client.load_checkpoint(self.lease)
    }
}

/// This worker's place in a gang, meeting the other ranks through the coordinator.
struct HttpGang {
    client: Client,
    lease: u64,
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
        let payloads = self.client.exchange(self.lease, &post, &self.cancel)?;
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
}

impl ProgressSink for Outbox {
    fn progress(&self, _stage: &str, done: u64, total: u64, unit: &str) {
        if let Ok(mut b) = self.beat.lock() {
            b.progress = Some((done, total, unit.to_string()));
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
}

#[derive(Debug, Default)]
pub struct WorkerSummary {
    pub succeeded: usize,
    pub failed: usize,
}

/// Claims and runs tasks until told to stop (see [`WorkerOptions`]). Returns when the
/// coordinator has been unreachable for 30 s, when idle for `idle_exit`, or after its one task.
pub fn run_worker(options: &WorkerOptions, registry: &Registry) -> anyhow::Result<WorkerSummary> {
    let client = Client::new(&options.coordinator, &options.token);
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
        let ok = run_claim(&client, claim, registry)?;
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
fn run_claim(client: &Client, claim: Claim, registry: &Registry) -> anyhow::Result<bool> {
    let lease = claim.lease;
    let task: Task = claim.task;
    let Some(kind) = registry.get(&task.kind).cloned() else {
        client.fail(
            lease,
            &Failure {
                error: format!(
                    "this worker does not know stage kind '{}' (different binary versions?)",
                    task.kind
                ),
                transient: false,
                cancelled: false,
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
        let (client, outbox, cancel, revoked) = (
            client.clone(),
            outbox.clone(),
            cancel.clone(),
            revoked.clone(),
        );
        std::thread::spawn(move || loop {
            {
                let beat = std::mem::take(&mut *outbox.beat.lock().expect("outbox lock"));
                match client.heartbeat(lease, &beat) {
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
    let store = HttpStore {
        client: client.clone(),
        lease,
    };
    let gang = match claim.gang {
        Some(member) => Some(HttpGang {
            client: client.clone(),
            lease,
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
    drop(done);
    let _ = beats.join();
    if revoked.load(Ordering::Relaxed) {
        tracing::warn!(
            "lease {lease} of {} was revoked; result dropped",
            task.stage
        );
        return Ok(false);
    }
    // Lines logged after the last heartbeat ride in the log tail of the completion.
    match outcome {
        Ok(artifacts) => {
            let taken = client
                .complete(lease, &artifacts, &log_tail)
                .with_context(|| format!("uploading the outputs of {}", task.stage))?;
            if !taken {
                tracing::warn!(
                    "lease {lease} of {} was revoked; result dropped",
                    task.stage
                );
            }
            Ok(taken)
        }
        Err(e) => {
            let failure = Failure {
                error: e.to_string(),
                transient: matches!(e, StageError::Transient(_)),
                cancelled: matches!(e, StageError::Cancelled),
                log_tail,
            };
            if !client.fail(lease, &failure)? {
                tracing::warn!(
                    "lease {lease} of {} was revoked; failure dropped",
                    task.stage
                );
            }
            Ok(false)
        }
    }
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .ok()
        .filter(|s| !s.is_empty())
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_else(|| "localhost".into())
}
