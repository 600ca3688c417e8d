//! `deeprepair serve`: a store served read-only over HTTP, and [`pull_from`], which copies its
//! finished stages into another store (`deeprepair pull http://…`).
//!
//! | request | answer |
//! | --- | --- |
//! | `GET /v1/actions` | 200 JSON list of every [`ActionRecord`] |
//! | `GET /v1/actions/{key}` | 200 the [`ActionRecord`] of that stage key; 404 |
//! | `GET /v1/artifacts/{digest}` | 200 frame of one artifact (streamed from the store's chunks); 404 |
//! | `POST /v1/actions` frame: the action record (JSON) then its outputs | 200 stored; 403 read-only; 400 malformed or not matching the record |
//!
//! Every request carries `Authorization: Bearer <token>` (401 otherwise, checked from the
//! headers by one middleware, before any body is read); only a server started writable
//! (`serve --writable`) takes `POST /v1/actions` (what `push URL` sends).

use crate::coordinator::{artifact_frame, store_call};
use crate::protocol::{frame_head_of, read_frame, FrameDecoder};
use anyhow::{bail, Context};
use axum::extract::{Path, Request, State};
use axum::http::StatusCode;
use axum::middleware::{from_fn_with_state, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use deeprepair_pipeline::store::{ActionRecord, ImportReport};
use deeprepair_pipeline::{Artifact, Digest, Plan, Store};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

/// Environment variable holding the token of a `serve` endpoint (for `serve` and `pull`).
pub const SERVE_TOKEN_ENV: &str = "DEEPREPAIR_SERVE_TOKEN";

struct Served {
    store: Arc<Store>,
    token: String,
    writable: bool,
}

/// The largest `push` of one stage a writable server takes.
pub const MAX_PUSH: u64 = 64 << 30;

/// A running `serve`: its address; dropping it stops the server.
pub struct Server {
    pub addr: SocketAddr,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

impl Server {
    /// Blocks until the server stops (it does not, short of an error or the process ending).
    pub fn wait(mut self) {
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Serves `store` on `listen` to holders of `token`: read-only, or taking pushed stages when
/// `writable` (the store must then be opened as the writer).
pub fn serve(
    store: Arc<Store>,
    listen: SocketAddr,
    token: String,
    writable: bool,
) -> anyhow::Result<Server> {
    if token.len() < 16 {
        bail!("the serve token must have at least 16 characters");
    }
    let listener = std::net::TcpListener::bind(listen)
        .with_context(|| format!("cannot listen on {listen}"))?;
    listener.set_nonblocking(true)?;
    let addr = listener.local_addr()?;
    let served = Arc::new(Served {
        store,
        token,
        writable,
    });
    let app = Router::new()
        .route("/v1/actions", get(actions).post(receive))
        .route("/v1/actions/{key}", get(action))
        .route("/v1/artifacts/{digest}", get(artifact))
        .layer(from_fn_with_state(served.clone(), require_token))
        .with_state(served);
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("serve-http")
        .enable_all()
        .build()?;
    let thread = std::thread::Builder::new()
        .name("serve".into())
        .spawn(move || {
            runtime.block_on(async move {
                let listener = match tokio::net::TcpListener::from_std(listener) {
                    Ok(l) => l,
                    Err(e) => {
                        tracing::error!("serve listener: {e}");
                        return;
                    }
                };
                let served = axum::serve(listener, app).with_graceful_shutdown(async {
                    let _ = rx.await;
                });
                if let Err(e) = served.await {
                    tracing::error!("serve: {e}");
                }
            });
        })?;
    Ok(Server {
        addr,
        shutdown: Some(tx),
        thread: Some(thread),
    })
}

async fn require_token(
    State(served): State<Arc<Served>>,
    request: Request,
    next: Next,
) -> Response {
    let ok = request
        .headers()
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.as_bytes().strip_prefix(b"Bearer "))
        .is_some_and(|t| crate::same_secret(t, served.token.as_bytes()));
    if !ok {
        return (StatusCode::UNAUTHORIZED, "missing or wrong token").into_response();
    }
    next.run(request).await
}

async fn actions(State(served): State<Arc<Served>>) -> Response {
    match store_call(&served.store, |store| store.actions()).await {
        Ok(actions) => Json(actions).into_response(),
        Err(response) => response,
    }
}

/// A pushed stage: a frame whose first artifact is the action record (JSON) and the rest its
/// outputs, decoded and verified as it arrives, then imported in one transaction.
async fn receive(State(served): State<Arc<Served>>, body: axum::body::Body) -> Response {
    use http_body_util::BodyExt;
    if !served.writable {
        return (
            StatusCode::FORBIDDEN,
            "this store is served read-only (serve --writable takes pushes)",
        )
            .into_response();
    }
    let mut decoder = FrameDecoder::new(MAX_PUSH);
    let mut body = body;
    while let Some(frame) = body.frame().await {
        let data = match frame {
            Ok(frame) => match frame.into_data() {
                Ok(data) => data,
                Err(_) => continue,
            },
            Err(e) => return (StatusCode::BAD_REQUEST, format!("{e}")).into_response(),
        };
        if let Err(e) = decoder.push(&data) {
            return (StatusCode::BAD_REQUEST, format!("{e}")).into_response();
        }
    }
    let mut artifacts = match decoder.finish() {
        Ok((artifacts, _)) => artifacts,
        Err(e) => return (StatusCode::BAD_REQUEST, format!("{e}")).into_response(),
    };
    if artifacts.is_empty() {
        return (StatusCode::BAD_REQUEST, "no action record in the frame").into_response();
    }
    let record = artifacts.remove(0);
    let action: ActionRecord = match serde_json::from_slice(&record.bytes) {
        Ok(action) => action,
        Err(e) => {
            return (StatusCode::BAD_REQUEST, format!("the action record: {e}")).into_response()
        }
    };
    let key = action.key;
    match store_call(&served.store, move |store| {
        if store.action(&action.key)?.is_some() {
            return Ok(false);
        }
        store.import_action(&action, &artifacts).map(|()| true)
    })
    .await
    {
        Ok(true) => StatusCode::OK.into_response(),
        Ok(false) => (
            StatusCode::OK,
            format!("stage {} was already here", key.short()),
        )
            .into_response(),
        Err(response) => response,
    }
}

async fn action(State(served): State<Arc<Served>>, Path(key): Path<String>) -> Response {
    let Some(key) = Digest::from_hex(&key) else {
        return (StatusCode::BAD_REQUEST, "not a stage key").into_response();
    };
    match store_call(&served.store, move |store| store.action(&key)).await {
        Ok(Some(action)) => Json(action).into_response(),
        Ok(None) => (StatusCode::NOT_FOUND, format!("no stage {}", key.short())).into_response(),
        Err(response) => response,
    }
}

async fn artifact(State(served): State<Arc<Served>>, Path(digest): Path<String>) -> Response {
    let Some(digest) = Digest::from_hex(&digest) else {
        return (StatusCode::BAD_REQUEST, "not a digest").into_response();
    };
    match artifact_frame(&served.store, digest).await {
        Ok((response, _)) => response,
        Err(response) => response,
    }
}

/// A client of a `serve` endpoint.
pub struct RemoteStore {
    agent: ureq::Agent,
    base: String,
    auth: String,
}

impl RemoteStore {
    pub fn new(url: &str, token: &str) -> RemoteStore {
        RemoteStore {
            agent: ureq::Agent::new_with_config(
                ureq::Agent::config_builder()
                    .http_status_as_error(false)
                    .timeout_global(Some(Duration::from_secs(3600)))
                    .build(),
            ),
            base: url.trim_end_matches('/').to_string(),
            auth: format!("Bearer {token}"),
        }
    }

    /// The answer to `GET path`: `None` for 404, an error for anything but 200.
    fn get(&self, path: &str) -> anyhow::Result<Option<ureq::http::Response<ureq::Body>>> {
        let base = &self.base;
        let mut response = self
            .agent
            .get(format!("{base}{path}"))
            .header("Authorization", &self.auth)
            .call()
            .with_context(|| format!("reaching {base}"))?;
        match response.status().as_u16() {
            200 => Ok(Some(response)),
            404 => Ok(None),
            status => {
                let text = response.body_mut().read_to_string().unwrap_or_default();
                bail!("{base}{path} answered {status}: {text}")
            }
        }
    }

    fn json<T: serde::de::DeserializeOwned>(&self, path: &str) -> anyhow::Result<Option<T>> {
        let Some(mut response) = self.get(path)? else {
            return Ok(None);
        };
        let bytes = response
            .body_mut()
            .with_config()
            .limit(1 << 30)
            .read_to_vec()?;
        Ok(Some(
            serde_json::from_slice(&bytes).with_context(|| format!("{}{path}", self.base))?,
        ))
    }

    /// Every finished stage the remote store has.
    pub fn actions(&self) -> anyhow::Result<Vec<ActionRecord>> {
        self.json("/v1/actions")?
            .ok_or_else(|| anyhow::anyhow!("{} has no /v1/actions", self.base))
    }

    /// The remote store's record of stage `key`, if it has one.
    pub fn action(&self, key: &Digest) -> anyhow::Result<Option<ActionRecord>> {
        self.json(&format!("/v1/actions/{}", key.hex()))
    }

    /// One artifact, verified as it streams in.
    pub fn artifact(&self, digest: &Digest) -> anyhow::Result<Artifact> {
        let mut response = self
            .get(&format!("/v1/artifacts/{}", digest.hex()))?
            .ok_or_else(|| anyhow::anyhow!("{} has no artifact {}", self.base, digest.short()))?;
        let mut reader = response.body_mut().with_config().limit(u64::MAX).reader();
        let (mut artifacts, _) = read_frame(&mut reader, u64::MAX)?;
        match artifacts.pop() {
            Some(a) if artifacts.is_empty() && a.digest() == *digest => Ok(a),
            _ => bail!(
                "{} sent something else for artifact {}",
                self.base,
                digest.short()
            ),
        }
    }

    /// Sends one finished stage (its record and outputs) to a writable server.
    pub fn push_action(&self, action: &ActionRecord, outputs: &[Artifact]) -> anyhow::Result<()> {
        // The record, then the outputs' own bytes (not copied into one buffer).
        let record = Artifact::json(
            deeprepair_pipeline::ArtifactKind::Text,
            &serde_json::to_value(action)?,
        );
        let described: Vec<_> = std::iter::once(&record)
            .chain(outputs)
            .map(|a| (a.header.clone(), a.digest(), a.bytes.len() as u64))
            .collect();
        let head = frame_head_of(&described, &[]);
        let mut pieces = vec![head.as_slice(), record.bytes.as_slice()];
        pieces.extend(outputs.iter().map(|a| a.bytes.as_slice()));
        let len: usize = pieces.iter().map(|p| p.len()).sum();
        let mut reader = crate::worker::PiecesReader::new(pieces);
        let mut response = self
            .agent
            .post(format!("{}/v1/actions", self.base))
            .header("Authorization", &self.auth)
            .header("Content-Length", len.to_string())
            .header("Expect", "100-continue")
            .send(ureq::SendBody::from_reader(&mut reader))
            .with_context(|| format!("reaching {}", self.base))?;
        let status = response.status().as_u16();
        if status != 200 {
            let text = response.body_mut().read_to_string().unwrap_or_default();
            bail!(
                "{} refused stage {}: {status} {text}",
                self.base,
                action.stage
            );
        }
        Ok(())
    }

    /// Copies the remote stage `action` into `dest` (outputs verified); `Err` names why not.
    fn import(&self, action: &ActionRecord, dest: &Store) -> Result<u64, String> {
        let mut outputs = vec![];
        for (name, digest) in &action.outputs {
            match self.artifact(digest) {
                Ok(a) => outputs.push(a),
                Err(e) => return Err(format!("output '{name}': {e:#}")),
            }
        }
        dest.import_action(action, &outputs)
            .map_err(|e| format!("{e}"))?;
        Ok(outputs.iter().map(|a| a.bytes.len() as u64).sum())
    }
}

/// Copies every finished stage of the store served at `url` that `dest` lacks (outputs
/// verified as they arrive and against the action record; one transaction per stage).
pub fn pull_from(url: &str, token: &str, dest: &Store) -> anyhow::Result<ImportReport> {
    let remote = RemoteStore::new(url, token);
    let mut report = ImportReport::default();
    for action in remote.actions()? {
        if dest.action(&action.key)?.is_some() {
            report.already_present += 1;
            continue;
        }
        match remote.import(&action, dest) {
            Ok(bytes) => {
                report.copied += 1;
                report.bytes += bytes;
            }
            Err(problem) => report.skipped.push(format!(
                "{} ({}): {problem}",
                action.stage,
                action.key.short()
            )),
        }
    }
    Ok(report)
}

/// `run --remote-cache URL`: before the run, resolves the plan's stage keys in topological
/// order as far as this store and the remote one know their outputs, and copies from the
/// remote every stage this store lacks, so the run answers them from its cache. (Stages
/// whose inputs only this run will produce are not looked up: their keys are not known yet.)
pub fn prefetch(plan: &Plan, dest: &Store, remote: &RemoteStore) -> anyhow::Result<ImportReport> {
    let mut report = ImportReport::default();
    let mut outputs: Vec<Option<std::collections::BTreeMap<String, Digest>>> =
        vec![None; plan.stages.len()];
    for (i, stage) in plan.stages.iter().enumerate() {
        let mut digests = std::collections::BTreeMap::new();
        let mut known = true;
        for (name, edges) in &stage.inputs {
            let mut list = vec![];
            for edge in edges {
                match outputs[edge.from]
                    .as_ref()
                    .and_then(|o| o.get(&edge.output))
                {
                    Some(d) => list.push(*d),
                    None => known = false,
                }
            }
            digests.insert(name.clone(), list);
        }
        if !known {
            continue;
        }
        let key = deeprepair_pipeline::key::stage_key_with_fingerprint(
            &stage.kind,
            &stage.version,
            &stage.params,
            &digests,
            stage.fingerprint.as_deref(),
        );
        if let Some(action) = dest.action(&key)? {
            let mut present = true;
            for d in action.outputs.values() {
                present &= dest.artifact_record(d)?.is_some();
            }
            if present {
                report.already_present += 1;
                outputs[i] = Some(action.outputs);
                continue;
            }
        }
        let Some(action) = remote.action(&key)? else {
            continue;
        };
        match remote.import(&action, dest) {
            Ok(bytes) => {
                report.copied += 1;
                report.bytes += bytes;
                outputs[i] = Some(action.outputs);
            }
            Err(problem) => report.skipped.push(format!("{}: {problem}", stage.path)),
        }
    }
    Ok(report)
}

/// Sends every finished stage of `from` that the writable server at `url` lacks.
pub fn push_to(from: &Store, url: &str, token: &str) -> anyhow::Result<ImportReport> {
    let remote = RemoteStore::new(url, token);
    deeprepair_pipeline::store::copy_actions::<anyhow::Error>(
        from,
        |key| Ok(remote.action(key)?.is_some()),
        |action, outputs| remote.push_action(action, outputs),
    )
}
