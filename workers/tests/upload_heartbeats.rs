//! A worker keeps heartbeating while its outputs upload, so a slow upload does not lose its
//! lease. Against a stand-in coordinator whose `complete` takes 3 s to answer.

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::post;
use axum::{Json, Router};
use deeprepair_pipeline::kind::Task;
use deeprepair_pipeline::{Digest, Registry};
use deeprepair_workers::protocol::{Claim, HeartbeatReply};
use deeprepair_workers::worker::{run_worker, WorkerOptions};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

#[derive(Default)]
struct Seen {
    beats: Vec<Instant>,
    upload: Option<(Instant, Instant)>,
    claimed: bool,
}

#[test]
fn heartbeats_go_on_while_the_outputs_upload() {
    let seen = Arc::new(Mutex::new(Seen::default()));
    let key = Digest::of(b"slow upload");
    let app = Router::new()
        .route(
            "/v1/claim",
            post(|State(seen): State<Arc<Mutex<Seen>>>| async move {
                let mut seen = seen.lock().unwrap();
                if seen.claimed {
                    return StatusCode::NO_CONTENT.into_response();
                }
                seen.claimed = true;
                Json(Claim {
                    lease: 1,
                    secret: "0123456789abcdef0123456789abcdef".into(),
                    task: Task {
                        key: Digest::of(b"slow upload"),
                        kind: "util.text".into(),
                        stage: "slow".into(),
                        params: serde_json::json!({"text": "the output"}),
                        inputs: Default::default(),
                        attempt: 0,
                    },
                    threads: 1,
                    gpus: vec![],
                    gang: None,
                })
                .into_response()
            }),
        )
        .route(
            "/v1/leases/1/heartbeat",
            post(|State(seen): State<Arc<Mutex<Seen>>>| async move {
                seen.lock().unwrap().beats.push(Instant::now());
                Json(HeartbeatReply { cancel: false })
            }),
        )
        .route(
            "/v1/leases/1/complete",
            post(
                |State(seen): State<Arc<Mutex<Seen>>>, body: axum::body::Bytes| async move {
                    // The upload "takes" 3 s from the worker's point of view.
                    let started = Instant::now();
                    tokio::time::sleep(Duration::from_secs(3)).await;
                    assert!(!body.is_empty());
                    seen.lock().unwrap().upload = Some((started, Instant::now()));
                    StatusCode::OK
                },
            ),
        )
        .with_state(seen.clone());
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.set_nonblocking(true).unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        tokio::runtime::Runtime::new()
            .unwrap()
            .block_on(async move {
                let listener = tokio::net::TcpListener::from_std(listener).unwrap();
                axum::serve(listener, app).await.unwrap();
            })
    });
    let mut registry = Registry::new();
    deeprepair_pipeline::builtin::register(&mut registry);
    let options = WorkerOptions {
        coordinator: format!("http://{addr}"),
        token: "t".into(),
        name: "w".into(),
        gpu: None,
        task: Some(key),
        idle_exit: None,
        tls_ca: None,
        cache: None,
    };
    let summary = run_worker(&options, &registry).unwrap();
    assert_eq!(summary.succeeded, 1);
    let seen = seen.lock().unwrap();
    let (from, to) = seen.upload.expect("the outputs were uploaded");
    let during = seen.beats.iter().filter(|&&t| t > from && t < to).count();
    assert!(
        during >= 2,
        "{during} heartbeats during the 3 s upload ({} in all)",
        seen.beats.len()
    );
}
