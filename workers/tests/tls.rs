//! `run --tls-cert/--tls-key`: the coordinator serves HTTPS; a worker that trusts its
//! certificate talks to it, plain HTTP and untrusting clients do not get through.

use deeprepair_pipeline::Store;
use deeprepair_workers::coordinator::{Coordinator, ServerOptions, TlsFiles};
use deeprepair_workers::protocol::{ClaimRequest, WorkerInfo};
use deeprepair_workers::worker::Client;
use std::sync::Arc;
use std::time::Duration;

fn request() -> ClaimRequest {
    ClaimRequest {
        worker: WorkerInfo {
            name: "w".into(),
            host: "test".into(),
            pid: 0,
            gpu: None,
        },
        task: None,
        wait_ms: 10,
    }
}

#[test]
fn workers_reach_an_https_coordinator_only_trusting_its_certificate() {
    let dir = tempfile::tempdir().unwrap();
    let cert = rcgen::generate_simple_self_signed(vec!["127.0.0.1".to_string()]).unwrap();
    let (cert_path, key_path) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
    std::fs::write(&cert_path, cert.cert.pem()).unwrap();
    std::fs::write(&key_path, cert.signing_key.serialize_pem()).unwrap();
    let store = Arc::new(Store::open_writer(&dir.path().join("store.redb")).unwrap());
    let options = ServerOptions {
        tls: Some(TlsFiles {
            cert: cert_path.clone(),
            key: key_path.clone(),
        }),
        ..ServerOptions::new(Duration::from_secs(30))
    };
    let coordinator = Coordinator::start_with(
        store.clone(),
        "127.0.0.1:0".parse().unwrap(),
        None,
        options.clone(),
    )
    .unwrap();
    assert!(coordinator.url().starts_with("https://127.0.0.1:"));
    assert_eq!(coordinator.tls_ca(), Some(cert_path.as_path()));
    let pem = std::fs::read(&cert_path).unwrap();

    // Trusting the certificate: the protocol works (no work queued: None).
    let client = Client::with_ca(coordinator.url(), coordinator.token(), &pem).unwrap();
    assert!(client.claim(&request()).unwrap().is_none());
    // The token is still required inside TLS.
    let stranger = Client::with_ca(coordinator.url(), "wrong", &pem).unwrap();
    let e = format!("{:#}", stranger.claim(&request()).unwrap_err());
    assert!(e.contains("401"), "{e}");
    // Not trusting it (the default web roots): refused by the client.
    let untrusting = Client::new(coordinator.url(), coordinator.token());
    assert!(untrusting.claim(&request()).is_err());
    // Plain HTTP to the TLS port gets nowhere.
    let plain_url = coordinator.url().replace("https://", "http://");
    let plain = Client::new(&plain_url, coordinator.token());
    assert!(plain.claim(&request()).is_err());

    // A key that does not load stops the coordinator from starting, with the reason.
    std::fs::write(&key_path, "not a key").unwrap();
    let err = Coordinator::start_with(store, "127.0.0.1:0".parse().unwrap(), None, options)
        .err()
        .expect("a bad key is refused");
    assert!(
        err.to_string().contains("cannot use TLS certificate"),
        "{err}"
    );
}
