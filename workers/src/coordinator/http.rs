//! The coordinator's HTTP side: the token and lease-secret layers (checked before any body
//! is read), the handlers workers call, the checkpoint writer thread and streamed artifact
//! frames. The job queue and leases they act on are in the parent module.

use super::*;
use crate::protocol::{
    frame_head_of, Claim, ClaimRequest, ExchangePost, ExchangeReply, Failure, FrameDecoder,
    FrameError, Heartbeat, HeartbeatReply, LEASE_HEADER,
};
use axum::body::{Body, Bytes};
use axum::extract::{Path, Request, State};
use axum::http::{HeaderMap, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::Json;
use deeprepair_pipeline::kind::{StageError, Task};
use deeprepair_pipeline::{Digest, RemoteOutcome, Store};
use http_body_util::BodyExt;
use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

pub(super) fn authorized(hub: &Hub, headers: &HeaderMap) -> bool {
    headers
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.as_bytes().strip_prefix(b"Bearer "))
        .is_some_and(|t| crate::same_secret(t, hub.token.as_bytes()))
}

/// Every request: the run's token, from the headers, before the body is touched (a request
/// without it is answered 401 and its body never read).
pub(super) async fn require_token(
    State(hub): State<Arc<Hub>>,
    request: Request,
    next: Next,
) -> Response {
    if !authorized(&hub, request.headers()) {
        return (StatusCode::UNAUTHORIZED, "missing or wrong worker token").into_response();
    }
    next.run(request).await
}

/// Every `/v1/leases/{id}/…` request: the secret of that lease, given to the worker that
/// claimed it. 410 when the lease is not held (revoked, ended), 403 for a wrong secret.
pub(super) async fn require_lease(
    State(hub): State<Arc<Hub>>,
    Path(params): Path<HashMap<String, String>>,
    request: Request,
    next: Next,
) -> Response {
    let Some(id) = params.get("id").and_then(|id| id.parse::<u64>().ok()) else {
        return (StatusCode::BAD_REQUEST, "not a lease id").into_response();
    };
    let given = request
        .headers()
        .get(LEASE_HEADER)
        .map(|v| v.as_bytes())
        .unwrap_or_default();
    let held = hub
        .lock()
        .leases
        .get(&id)
        .map(|lease| crate::same_secret(given, lease.secret.as_bytes()));
    match held {
        None => gone(id),
        Some(false) => (
            StatusCode::FORBIDDEN,
            format!("lease {id} is held by another worker (missing or wrong lease secret)"),
        )
            .into_response(),
        Some(true) => next.run(request).await,
    }
}

pub(super) fn gone(id: u64) -> Response {
    (StatusCode::GONE, format!("lease {id} is not held")).into_response()
}

pub(super) fn takes(route: &Route, req: &ClaimRequest, task: &Task) -> bool {
    match (req.task, route) {
        (Some(wanted), _) => wanted == task.key,
        (None, Route::Any) => true,
        (None, Route::Gpu(g)) => req.worker.gpu == Some(*g),
        (None, Route::Task(_)) => false,
    }
}

pub(super) async fn claim(State(hub): State<Arc<Hub>>, Json(req): Json<ClaimRequest>) -> Response {
    let deadline = Instant::now() + Duration::from_millis(req.wait_ms.min(30_000));
    loop {
        // Registered before looking, so a job queued in between still wakes this claim.
        let woken = hub.queued.notified();
        tokio::pin!(woken);
        woken.as_mut().enable();
        {
            let mut state = hub.lock();
            if let Some(pos) = state
                .queue
                .iter()
                .position(|j| takes(&j.route, &req, &j.task))
            {
                // Fail closed: without OS randomness no lease is handed out.
                let secret = match crate::unguessable_hex() {
                    Ok(secret) => secret,
                    Err(e) => {
                        tracing::error!("{e:#}");
                        return (StatusCode::SERVICE_UNAVAILABLE, format!("{e:#}")).into_response();
                    }
                };
                let job = state.queue.remove(pos).expect("position is valid");
                let claim = Claim {
                    lease: job.id,
                    secret: secret.clone(),
                    task: job.task.clone(),
                    threads: job.threads,
                    gpus: job.gpus.clone(),
                    gang: job.gang,
                };
                tracing::debug!("{} leased to {}", job.task.stage, req.worker.label());
                state.leases.insert(
                    job.id,
                    Lease {
                        job,
                        secret,
                        worker: req.worker.clone(),
                        last_beat: Instant::now(),
                        lines: vec![],
                        progress: None,
                        progressed: Instant::now(),
                        leased_at: Instant::now(),
                        cancel: false,
                    },
                );
                return Json(claim).into_response();
            }
        }
        let now = Instant::now();
        if now >= deadline {
            return StatusCode::NO_CONTENT.into_response();
        }
        // Jobs another worker could not take stay queued: re-check at least every 250 ms.
        let _ = tokio::time::timeout((deadline - now).min(Duration::from_millis(250)), woken).await;
    }
}

pub(super) async fn heartbeat(
    State(hub): State<Arc<Hub>>,
    Path(id): Path<u64>,
    Json(beat): Json<Heartbeat>,
) -> Response {
    let mut state = hub.lock();
    let Some(lease) = state.leases.get_mut(&id) else {
        return gone(id);
    };
    lease.last_beat = Instant::now();
    lease.lines.extend(beat.lines);
    if beat.progress.is_some() {
        if beat.progress != lease.progress {
            lease.progressed = Instant::now();
        }
        lease.progress = beat.progress;
    }
    Json(HeartbeatReply {
        cancel: lease.cancel,
    })
    .into_response()
}

/// Ends a leased job now with `error` (an upload that cannot be taken): the executor retries
/// a transient one elsewhere instead of waiting for the lease to time out.
pub(super) fn release(hub: &Hub, id: u64, error: StageError) {
    if let Some(lease) = hub.lock().leases.remove(&id) {
        tracing::warn!("lease {id} of {} released: {error}", lease.job.task.stage);
        let _ = lease.job.reply.send(JobEnd::Failed(error, lease.lines));
    }
}

/// The outputs frame, decoded and verified as it streams in (held once, never twice).
pub(super) async fn complete(
    State(hub): State<Arc<Hub>>,
    Path(id): Path<u64>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let worker = hub
        .lock()
        .leases
        .get(&id)
        .map(|l| l.worker.label())
        .unwrap_or_default();
    let too_large = |hub: &Hub, limit: u64| {
        let message = format!(
            "the outputs from {worker} are larger than the upload limit of {limit} bytes \
             (raise it with `run --max-upload-mib`)"
        );
        release(hub, id, StageError::Fatal(anyhow::anyhow!("{message}")));
        (StatusCode::PAYLOAD_TOO_LARGE, message).into_response()
    };
    let declared = headers
        .get(axum::http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|len| len > hub.max_upload) {
        return too_large(&hub, hub.max_upload);
    }
    let mut decoder = FrameDecoder::new(hub.max_upload);
    let mut body = body;
    let mut received = 0u64;
    let failure = loop {
        match body.frame().await {
            None => break None,
            Some(Err(e)) => {
                break Some(FrameError::Malformed(format!("the upload broke off: {e}")))
            }
            Some(Ok(frame)) => {
                if let Ok(data) = frame.into_data() {
                    received += data.len() as u64;
                    if let Err(e) = decoder.push(&data) {
                        break Some(e);
                    }
                }
            }
        }
    };
    let decoded = match failure {
        None => decoder.finish(),
        Some(e) => Err(e),
    };
    let (artifacts, log_tail) = match decoded {
        Ok(d) => d,
        Err(FrameError::TooLarge { limit }) => return too_large(&hub, limit),
        Err(FrameError::Malformed(e)) => {
            // Transient: a transfer that went wrong may go right on another attempt.
            let message = format!("the outputs from {worker} arrived malformed: {e}");
            release(
                &hub,
                id,
                StageError::Transient(anyhow::anyhow!("{message}")),
            );
            return (StatusCode::BAD_REQUEST, message).into_response();
        }
    };
    hub.traffic.uploads.fetch_add(1, Ordering::Relaxed);
    hub.traffic
        .bytes_received
        .fetch_add(received, Ordering::Relaxed);
    let Some(lease) = hub.lock().leases.remove(&id) else {
        return gone(id);
    };
    let outcome = RemoteOutcome {
        artifacts,
        log_tail,
        worker: lease.worker.label(),
    };
    let _ = lease.job.reply.send(JobEnd::Done(outcome, lease.lines));
    StatusCode::OK.into_response()
}

pub(super) async fn fail(
    State(hub): State<Arc<Hub>>,
    Path(id): Path<u64>,
    Json(failure): Json<Failure>,
) -> Response {
    let Some(lease) = hub.lock().leases.remove(&id) else {
        return gone(id);
    };
    let where_ = lease.worker.label();
    let error = anyhow::anyhow!("{} (on {where_})", failure.error);
    let end = if failure.cancelled {
        StageError::Cancelled
    } else if failure.released {
        StageError::Released(error)
    } else if failure.transient {
        StageError::Transient(error)
    } else {
        StageError::Fatal(error)
    };
    let _ = lease.job.reply.send(JobEnd::Failed(end, lease.lines));
    StatusCode::OK.into_response()
}

/// A gang member posts its payload and waits (up to 10 s per request) for the others'.
pub(super) async fn exchange(
    State(hub): State<Arc<Hub>>,
    Path(id): Path<u64>,
    Json(post): Json<ExchangePost>,
) -> Response {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let woken = hub.exchanged.notified();
        tokio::pin!(woken);
        woken.as_mut().enable();
        let posted = {
            let mut state = hub.lock();
            let Some(lease) = state.leases.get(&id) else {
                return gone(id);
            };
            let Some(member) = lease.job.gang else {
                return (
                    StatusCode::BAD_REQUEST,
                    format!("lease {id} is not a gang member"),
                )
                    .into_response();
            };
            if state.abandoned.contains(&member.gang) {
                return (
                    StatusCode::CONFLICT,
                    "the gang was abandoned: another rank failed",
                )
                    .into_response();
            }
            let slots = state
                .exchanges
                .entry((member.gang, post.name.clone()))
                .or_insert_with(|| vec![None; member.world as usize]);
            let slot = &mut slots[member.rank as usize];
            // A repeated post (the previous answer was 204) keeps the first payload.
            let posted = slot.is_none();
            if posted {
                *slot = Some(post.payload.clone());
            }
            if slots.iter().all(Option::is_some) {
                let payloads = slots
                    .iter()
                    .map(|p| p.clone().expect("all posted"))
                    .collect();
                drop(state);
                if posted {
                    hub.exchanged.notify_waiters();
                }
                return Json(ExchangeReply { payloads }).into_response();
            }
            posted
        };
        if posted {
            hub.exchanged.notify_waiters();
        }
        let now = Instant::now();
        if now >= deadline {
            return StatusCode::NO_CONTENT.into_response();
        }
        let _ = tokio::time::timeout((deadline - now).min(Duration::from_millis(250)), woken).await;
    }
}

pub(super) fn leased_key(hub: &Hub, id: u64) -> Option<Digest> {
    hub.lock().leases.get(&id).map(|l| l.job.task.key)
}

/// Runs a store call off the async threads (redb blocks); errors become 500, a missing
/// artifact 404.
pub(super) async fn with_store<T: Send + 'static>(
    hub: &Hub,
    call: impl FnOnce(&Store) -> Result<T, deeprepair_pipeline::StoreError> + Send + 'static,
    ok: impl FnOnce(T) -> Response,
) -> Response {
    match store_call(&hub.store, call).await {
        Ok(value) => ok(value),
        Err(response) => response,
    }
}

/// [`with_store`]'s call, its errors as responses.
pub(crate) async fn store_call<T: Send + 'static>(
    store: &Arc<Store>,
    call: impl FnOnce(&Store) -> Result<T, deeprepair_pipeline::StoreError> + Send + 'static,
) -> Result<T, Response> {
    let store = store.clone();
    match tokio::task::spawn_blocking(move || call(&store)).await {
        Ok(Ok(value)) => Ok(value),
        Ok(Err(deeprepair_pipeline::StoreError::NotFound(what))) => {
            Err((StatusCode::NOT_FOUND, format!("no {what}")).into_response())
        }
        Ok(Err(e)) => Err((StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response()),
        Err(e) => Err((StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response()),
    }
}

pub(super) async fn load_checkpoint(State(hub): State<Arc<Hub>>, Path(id): Path<u64>) -> Response {
    let Some(key) = leased_key(&hub, id) else {
        return gone(id);
    };
    with_store(
        &hub,
        move |store| store.load_checkpoint(&key),
        |found| match found {
            Some(bytes) => bytes.into_response(),
            None => StatusCode::NO_CONTENT.into_response(),
        },
    )
    .await
}

pub(super) async fn save_checkpoint(
    State(hub): State<Arc<Hub>>,
    Path(id): Path<u64>,
    body: Bytes,
) -> Response {
    let Some(key) = leased_key(&hub, id) else {
        return gone(id);
    };
    hub.traffic.uploads.fetch_add(1, Ordering::Relaxed);
    hub.traffic
        .bytes_received
        .fetch_add(body.len() as u64, Ordering::Relaxed);
    let (reply, answer) = tokio::sync::oneshot::channel();
    let queued = hub
        .checkpoints
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .send(CheckpointWrite { key, body, reply });
    if queued.is_err() {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            "the checkpoint writer stopped",
        )
            .into_response();
    }
    match answer.await {
        Ok(Ok(())) => StatusCode::OK.into_response(),
        Ok(Err(e)) => (StatusCode::INTERNAL_SERVER_ERROR, e).into_response(),
        Err(_) => (
            StatusCode::SERVICE_UNAVAILABLE,
            "the checkpoint writer stopped",
        )
            .into_response(),
    }
}

/// A checkpoint for the writer thread, and where its result goes.
pub(super) struct CheckpointWrite {
    key: Digest,
    body: Bytes,
    reply: tokio::sync::oneshot::Sender<Result<(), String>>,
}

/// The most checkpoint bytes written in one transaction.
pub(super) const CHECKPOINT_BATCH_BYTES: usize = 1 << 30;

/// Writes checkpoints as they come, batching those that arrived while the previous write was
/// under way into one transaction (one fsync for many stages' epochs), until every sender
/// is gone.
pub(super) fn checkpoint_writer(
    hub: std::sync::Weak<Hub>,
    store: Arc<Store>,
    queue: mpsc::Receiver<CheckpointWrite>,
) {
    while let Ok(first) = queue.recv() {
        let mut batch = vec![first];
        let mut bytes = batch[0].body.len();
        while bytes < CHECKPOINT_BATCH_BYTES {
            match queue.try_recv() {
                Ok(next) => {
                    bytes += next.body.len();
                    batch.push(next);
                }
                Err(_) => break,
            }
        }
        let writes: Vec<(Digest, &[u8])> = batch.iter().map(|w| (w.key, &w.body[..])).collect();
        let result = store.save_checkpoints(&writes).map_err(|e| e.to_string());
        if let Some(hub) = hub.upgrade() {
            hub.traffic
                .checkpoint_transactions
                .fetch_add(1, Ordering::Relaxed);
        }
        if batch.len() > 1 {
            tracing::debug!("{} checkpoints ({bytes} bytes) in one write", batch.len());
        }
        for write in batch {
            let _ = write.reply.send(result.clone());
        }
    }
}

/// One input of the lease's task, as a frame streamed from the store's bytes (not copied).
pub(super) async fn artifact(
    State(hub): State<Arc<Hub>>,
    Path((id, digest)): Path<(u64, String)>,
) -> Response {
    let Some(digest) = Digest::from_hex(&digest) else {
        return (StatusCode::BAD_REQUEST, "not a digest").into_response();
    };
    let is_input = hub.lock().leases.get(&id).map(|l| {
        l.job
            .task
            .inputs
            .values()
            .flatten()
            .any(|input| input.digest == digest)
    });
    match is_input {
        None => return gone(id),
        Some(false) => {
            return (
                StatusCode::FORBIDDEN,
                format!(
                    "artifact {} is not an input of lease {id}'s task",
                    digest.short()
                ),
            )
                .into_response()
        }
        Some(true) => {}
    }
    match artifact_frame(&hub.store, digest).await {
        Ok((response, len)) => {
            hub.traffic.artifacts_served.fetch_add(1, Ordering::Relaxed);
            hub.traffic.bytes_served.fetch_add(len, Ordering::Relaxed);
            response
        }
        Err(response) => response,
    }
}

/// One artifact as a frame: the record first (a missing artifact is a plain 404), then the
/// bytes chunk by chunk from the store (each chunk verified, and the whole at the end),
/// straight onto the wire: the server never holds the artifact whole. Also the frame's length.
pub(crate) async fn artifact_frame(
    store: &Arc<Store>,
    digest: Digest,
) -> Result<(Response, u64), Response> {
    let record = match store_call(store, move |store| store.artifact_record(&digest)).await? {
        Some(record) => record,
        None => {
            return Err((
                StatusCode::NOT_FOUND,
                format!("no artifact {}", digest.short()),
            )
                .into_response())
        }
    };
    let head = frame_head_of(&[(record.header.clone(), digest, record.size)], &[]);
    let len = head.len() as u64 + record.size;
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Bytes, std::io::Error>>(2);
    let store = store.clone();
    tokio::task::spawn_blocking(move || {
        use std::io::Read;
        if tx.blocking_send(Ok(Bytes::from(head))).is_err() {
            return;
        }
        let mut reader = match store.reader(&record) {
            Ok(reader) => reader,
            Err(e) => {
                let _ = tx.blocking_send(Err(std::io::Error::other(e)));
                return;
            }
        };
        loop {
            let mut piece = vec![0u8; 4 << 20];
            let mut filled = 0;
            // Fill whole pieces (the reader returns a chunk's worth at a time).
            while filled < piece.len() {
                match reader.read(&mut piece[filled..]) {
                    Ok(0) => break,
                    Ok(n) => filled += n,
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                    Err(e) => {
                        tracing::error!("serving artifact {}: {e}", record.digest.short());
                        // An error ends the body early: the worker sees a cut-short frame.
                        let _ = tx.blocking_send(Err(e));
                        return;
                    }
                }
            }
            if filled == 0 {
                return;
            }
            piece.truncate(filled);
            if tx.blocking_send(Ok(Bytes::from(piece))).is_err() {
                return; // the worker went away
            }
        }
    });
    let body = futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|item| (item, rx))
    });
    let response = (
        [(axum::http::header::CONTENT_LENGTH, len.to_string())],
        Body::from_stream(body),
    )
        .into_response();
    Ok((response, len))
}
