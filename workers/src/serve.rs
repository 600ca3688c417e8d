//! `deeprepair serve`: a store served read-only over HTTP, and [`pull_from`], which copies its
//! finished stages into another store (`deeprepair pull http://…`).
//!
//! | request | answer |
//! | --- | --- |
//! | `GET /v1/actions` | 200 JSON list of every [`ActionRecord`] |
//! | `GET /v1/artifacts/{digest}` | 200 frame of one artifact (streamed from the store's chunks); 404 |
//!
//! Every request carries `Authorization: Bearer <token>` (401 otherwise, checked from the
//! headers by one middleware); the server never writes the store.

use crate::coordinator::{artifact_frame, store_call};
use crate::protocol::read_frame;
use anyhow::{bail, Context};
use axum::extract::{Path, Request, State};
use axum::http::StatusCode;
use axum::middleware::{from_fn_with_state, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use deeprepair_pipeline::store::{ActionRecord, ImportReport};
use deeprepair_pipeline::{Digest, Store};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

/// Environment variable holding the token of a `serve` endpoint (for `serve` and `pull`).
pub const SERVE_TOKEN_ENV: &str = "DEEPREPAIR_SERVE_TOKEN";

struct Served {
    store: Arc<Store>,
    token: String,
}

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

/// Serves `store` read-only on `listen` to holders of `token`.
pub fn serve(store: Arc<Store>, listen: SocketAddr, token: String) -> anyhow::Result<Server> {
    if token.len() < 16 {
        bail!("the serve token must have at least 16 characters");
    }
    let listener = std::net::TcpListener::bind(listen)
        .with_context(|| format!("cannot listen on {listen}"))?;
    listener.set_nonblocking(true)?;
    let addr = listener.local_addr()?;
    let served = Arc::new(Served { store, token });
    let app = Router::new()
        .route("/v1/actions", get(actions))
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

async fn artifact(State(served): State<Arc<Served>>, Path(digest): Path<String>) -> Response {
    let Some(digest) = Digest::from_hex(&digest) else {
        return (StatusCode::BAD_REQUEST, "not a digest").into_response();
    };
    match artifact_frame(&served.store, digest).await {
        Ok((response, _)) => response,
        Err(response) => response,
    }
}

/// Copies every finished stage of the store served at `url` that `dest` lacks (outputs
/// verified as they arrive and against the action record; one transaction per stage).
pub fn pull_from(url: &str, token: &str, dest: &Store) -> anyhow::Result<ImportReport> {
    let base = url.trim_end_matches('/');
    let agent = ureq::Agent::new_with_config(
        ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(Duration::from_secs(3600)))
            .build(),
    );
    let auth = format!("Bearer {token}");
    let get = |path: &str| -> anyhow::Result<ureq::http::Response<ureq::Body>> {
        let response = agent
            .get(format!("{base}{path}"))
            .header("Authorization", &auth)
            .call()
            .with_context(|| format!("reaching {base}"))?;
        let status = response.status().as_u16();
        if status != 200 {
            let mut response = response;
            let text = response.body_mut().read_to_string().unwrap_or_default();
            bail!("{base}{path} answered {status}: {text}");
        }
        Ok(response)
    };
    let mut response = get("/v1/actions")?;
    let actions: Vec<ActionRecord> = serde_json::from_slice(
        &response
            .body_mut()
            .with_config()
            .limit(1 << 30)
            .read_to_vec()?,
    )
    .context("the list of actions")?;
    let mut report = ImportReport::default();
    for action in actions {
        if dest.action(&action.key)?.is_some() {
            report.already_present += 1;
            continue;
        }
        let mut outputs = vec![];
        let mut problem = None;
        for (name, digest) in &action.outputs {
            let fetched = get(&format!("/v1/artifacts/{}", digest.hex())).and_then(|mut r| {
                let mut reader = r.body_mut().with_config().limit(u64::MAX).reader();
                read_frame(&mut reader, u64::MAX)
            });
            match fetched {
                Ok((mut artifacts, _)) => match artifacts.pop() {
                    Some(a) if artifacts.is_empty() && a.digest() == *digest => outputs.push(a),
                    _ => problem = Some(format!("output '{name}' arrived as something else")),
                },
                Err(e) => problem = Some(format!("output '{name}': {e:#}")),
            }
            if problem.is_some() {
                break;
            }
        }
        if let Some(problem) = problem {
            report.skipped.push(format!(
                "{} ({}): {problem}",
                action.stage,
                action.key.short()
            ));
            continue;
        }
        dest.import_action(&action, &outputs)?;
        report.copied += 1;
        report.bytes += outputs.iter().map(|a| a.bytes.len() as u64).sum::<u64>();
    }
    Ok(report)
}
