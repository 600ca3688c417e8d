//! Over real HTTP: a lease is its holder's alone (the token is not enough), and an upload the
//! coordinator cannot take releases its lease at once.

use deeprepair_pipeline::kind::TaskStore;
use deeprepair_pipeline::kind::{InputRef, ProgressSink, StageError, Task};
use deeprepair_pipeline::{Artifact, Digest, Store};
use deeprepair_workers::coordinator::{Coordinator, Route, ServerOptions};
use deeprepair_workers::protocol::{
    encode_frame, Claim, ClaimRequest, Failure, Heartbeat, WorkerInfo,
};
use deeprepair_workers::worker::{Client, HttpStore, LeaseKey};
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::{Duration, Instant};

struct Quiet;
impl ProgressSink for Quiet {
    fn progress(&self, _: &str, _: u64, _: u64, _: &str) {}
    fn log(&self, _: &str, _: &str) {}
}

struct Setup {
    _dir: tempfile::TempDir,
    coordinator: Arc<Coordinator>,
    input: Artifact,
    other: Artifact,
}

fn setup(max_upload: u64) -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(Store::open_writer(&dir.path().join("store.redb")).unwrap());
    let input = Artifact::text("an input of the task");
    let other = Artifact::text("someone else's artifact");
    store
        .put_artifacts(&[input.clone(), other.clone()])
        .unwrap();
    let options = ServerOptions {
        max_upload,
        ..ServerOptions::new(Duration::from_secs(60))
    };
    let coordinator =
        Coordinator::start_with(store, "127.0.0.1:0".parse().unwrap(), None, options).unwrap();
    Setup {
        _dir: dir,
        coordinator,
        input,
        other,
    }
}

fn task(input: &Artifact) -> Task {
    let mut inputs = std::collections::BTreeMap::new();
    inputs.insert(
        "data".to_string(),
        vec![InputRef {
            stage: "source".into(),
            output: "out".into(),
            digest: input.digest(),
        }],
    );
    Task {
        key: Digest::of(b"the stage"),
        kind: "util.work".into(),
        stage: "train".into(),
        params: serde_json::json!({}),
        inputs,
        attempt: 0,
    }
}

fn claim(client: &Client, name: &str) -> Claim {
    let req = ClaimRequest {
        worker: WorkerInfo {
            name: name.into(),
            host: "test".into(),
            pid: 0,
            gpu: None,
        },
        task: None,
        wait_ms: 2000,
    };
    client.claim(&req).unwrap().expect("a job")
}

#[test]
fn a_worker_with_the_token_but_not_the_lease_can_do_nothing_with_it() {
    let s = setup(1 << 30);
    let ticket = s.coordinator.submit(&task(&s.input), Route::Any, 1, vec![]);
    let client = Client::new(s.coordinator.url(), s.coordinator.token());
    let mine = claim(&client, "holder");
    assert_eq!(mine.secret.len(), 32);
    // Another worker with the same token, guessing the (sequential) lease id.
    for guess in ["", "00000000000000000000000000000000", &mine.secret[..31]] {
        let thief = LeaseKey {
            id: mine.lease,
            secret: guess.to_string(),
        };
        let refused = |what: &str, e: anyhow::Error| {
            let e = format!("{e:#}");
            assert!(e.contains("403"), "{what} with secret {guess:?}: {e}");
        };
        refused(
            "read",
            client.artifact(&thief, &s.input.digest()).unwrap_err(),
        );
        refused("load", client.load_checkpoint(&thief).unwrap_err());
        refused(
            "checkpoint",
            client.save_checkpoint(&thief, b"poison").unwrap_err(),
        );
        refused(
            "heartbeat",
            client.heartbeat(&thief, &Heartbeat::default()).unwrap_err(),
        );
        refused(
            "complete",
            client
                .complete(&thief, &[Artifact::text("forged")], &[])
                .unwrap_err(),
        );
        let failure = Failure {
            error: "forged".into(),
            transient: false,
            cancelled: false,
            released: false,
            log_tail: vec![],
        };
        refused("fail", client.fail(&thief, &failure).unwrap_err());
    }
    // Without the token, even the right lease secret is refused.
    let no_token = Client::new(s.coordinator.url(), "not-the-token");
    let e = format!("{:#}", no_token.load_checkpoint(&mine.key()).unwrap_err());
    assert!(e.contains("401"), "{e}");
    // The holder reads its inputs, and only its inputs.
    let got = client.artifact(&mine.key(), &s.input.digest()).unwrap();
    assert_eq!(got.bytes, s.input.bytes);
    let e = format!(
        "{:#}",
        client.artifact(&mine.key(), &s.other.digest()).unwrap_err()
    );
    assert!(e.contains("403") && e.contains("not an input"), "{e}");
    // Nothing the thief sent reached the store: no checkpoint.
    assert_eq!(client.load_checkpoint(&mine.key()).unwrap(), None);
    client.save_checkpoint(&mine.key(), b"mine").unwrap();
    assert_eq!(
        client.load_checkpoint(&mine.key()).unwrap().as_deref(),
        Some(&b"mine"[..])
    );
    // The holder completes; the executor gets the holder's outputs, not a forgery.
    let out = Artifact::text("the real output");
    assert!(client
        .complete(&mine.key(), std::slice::from_ref(&out), &[])
        .unwrap());
    let outcome = s
        .coordinator
        .wait(ticket, &Quiet, &AtomicBool::new(false), |_| None)
        .unwrap();
    assert_eq!(outcome.artifacts.len(), 1);
    assert_eq!(outcome.artifacts[0].bytes, out.bytes);
    assert!(outcome.worker.starts_with("holder@"), "{}", outcome.worker);
    // Leases are gone once ended.
    assert!(!client.complete(&mine.key(), &[out], &[]).unwrap());
}

#[test]
fn a_corrupt_upload_releases_its_lease_at_once() {
    let s = setup(1 << 30);
    let ticket = s.coordinator.submit(&task(&s.input), Route::Any, 1, vec![]);
    let client = Client::new(s.coordinator.url(), s.coordinator.token());
    let mine = claim(&client, "w");
    let mut frame = encode_frame(&[Artifact::text("output bytes")], &[]);
    let last = frame.len() - 1;
    frame[last] ^= 1;
    let e = client
        .send_frame(&mine.key(), "complete", frame.len(), &mut &frame[..])
        .unwrap_err();
    let e = format!("{e:#}");
    assert!(e.contains("400") && e.contains("arrived corrupt"), "{e}");
    let started = Instant::now();
    let end = s
        .coordinator
        .wait(ticket, &Quiet, &AtomicBool::new(false), |_| None)
        .unwrap_err();
    // At once, not after the 60 s lease timeout; transient, so the stage is retried.
    assert!(started.elapsed() < Duration::from_secs(2));
    assert!(matches!(end, StageError::Transient(_)), "{end}");
    assert!(end.to_string().contains("malformed"), "{end}");
    // The lease is gone: the worker's heartbeat learns it was revoked.
    assert!(client
        .heartbeat(&mine.key(), &Heartbeat::default())
        .unwrap()
        .is_none());

    // A frame whose head does not parse: the same.
    let ticket = s.coordinator.submit(&task(&s.input), Route::Any, 1, vec![]);
    let mine = claim(&client, "w");
    let junk = b"\x05\x00\x00\x00{nope";
    assert!(client
        .send_frame(&mine.key(), "complete", junk.len(), &mut &junk[..])
        .is_err());
    let end = s
        .coordinator
        .wait(ticket, &Quiet, &AtomicBool::new(false), |_| None)
        .unwrap_err();
    assert!(matches!(end, StageError::Transient(_)), "{end}");
}

#[test]
fn an_upload_over_the_limit_is_refused_and_fails_the_stage_at_once() {
    let s = setup(4096);
    let ticket = s.coordinator.submit(&task(&s.input), Route::Any, 1, vec![]);
    let client = Client::new(s.coordinator.url(), s.coordinator.token());
    let mine = claim(&client, "w");
    let big = Artifact::text("x".repeat(10_000));
    let e = format!(
        "{:#}",
        client.complete(&mine.key(), &[big], &[]).unwrap_err()
    );
    assert!(e.contains("413"), "{e}");
    let end = s
        .coordinator
        .wait(ticket, &Quiet, &AtomicBool::new(false), |_| None)
        .unwrap_err();
    // The same outputs would be as large next time: fatal, with what to do about it.
    assert!(matches!(end, StageError::Fatal(_)), "{end}");
    assert!(end.to_string().contains("upload limit"), "{end}");
    // A checkpoint over the limit is refused too (the stage reports the failure itself).
    let ticket = s.coordinator.submit(&task(&s.input), Route::Any, 1, vec![]);
    let mine = claim(&client, "w");
    let e = format!(
        "{:#}",
        client
            .save_checkpoint(&mine.key(), &vec![0u8; 10_000])
            .unwrap_err()
    );
    assert!(e.contains("413"), "{e}");
    assert!(client.complete(&mine.key(), &[], &[]).unwrap());
    s.coordinator
        .wait(ticket, &Quiet, &AtomicBool::new(false), |_| None)
        .unwrap();
}

#[test]
fn checkpoints_upload_in_the_background_and_the_newest_wins() {
    let s = setup(1 << 30);
    let ticket = s.coordinator.submit(&task(&s.input), Route::Any, 1, vec![]);
    let client = Client::new(s.coordinator.url(), s.coordinator.token());
    let mine = claim(&client, "w");
    let key = task(&s.input).key;
    let store = HttpStore::new(client.clone(), mine.key(), None);
    for epoch in 0u8..5 {
        store
            .save_checkpoint(&key, &vec![epoch; 3_000_000])
            .unwrap();
    }
    // Loading waits for the uploads: it sees the newest.
    assert_eq!(
        store.load_checkpoint(&key).unwrap(),
        Some(vec![4u8; 3_000_000])
    );
    store.save_checkpoint(&key, b"epoch 5").unwrap();
    store.flush_checkpoints().unwrap();
    assert_eq!(
        client.load_checkpoint(&mine.key()).unwrap().as_deref(),
        Some(&b"epoch 5"[..])
    );
    // The lease ends; a later upload fails, and the stage hears of it.
    assert!(client.complete(&mine.key(), &[], &[]).unwrap());
    s.coordinator
        .wait(ticket, &Quiet, &AtomicBool::new(false), |_| None)
        .unwrap();
    store.save_checkpoint(&key, b"too late").unwrap();
    let e = format!("{:#}", store.flush_checkpoints().unwrap_err());
    assert!(e.contains("410"), "{e}");
}
