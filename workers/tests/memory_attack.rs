//! A client without the token cannot make the coordinator buffer a large body: the token is
//! checked from the headers before any of the body is read. Alone in its test binary so no
//! other test's allocations blur the resident-set measurement.

use deeprepair_pipeline::Store;
use deeprepair_workers::coordinator::Coordinator;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// This process's resident set, in bytes (from /proc/self/status).
fn rss() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let line = status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .expect("VmRSS in /proc/self/status");
    let kb: u64 = line
        .split_whitespace()
        .nth(1)
        .and_then(|n| n.parse().ok())
        .expect("VmRSS in kB");
    kb * 1024
}

/// Posts `total` bytes of body to `path` on `addr`, with `headers`; returns the status line
/// and how many body bytes the server let through before answering or closing.
fn post_big(addr: &str, path: &str, headers: &str, total: u64) -> (String, u64) {
    let mut stream = TcpStream::connect(addr).unwrap();
    stream
        .set_write_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    write!(
        stream,
        "POST {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Length: {total}\r\n{headers}\r\n"
    )
    .unwrap();
    let chunk = vec![0u8; 1 << 20];
    let mut sent = 0u64;
    while sent < total {
        match stream.write(&chunk) {
            Ok(0) | Err(_) => break,
            Ok(n) => sent += n as u64,
        }
    }
    let mut answer = vec![0u8; 4096];
    let n = stream.read(&mut answer).unwrap_or(0);
    let text = String::from_utf8_lossy(&answer[..n]).into_owned();
    (text.lines().next().unwrap_or_default().to_string(), sent)
}

#[test]
fn an_unauthenticated_gigabyte_is_refused_without_being_read() {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(Store::open_writer(&dir.path().join("store.redb")).unwrap());
    let coordinator = Coordinator::start(
        store,
        "127.0.0.1:0".parse().unwrap(),
        None,
        Duration::from_secs(30),
    )
    .unwrap();
    let addr = coordinator.url().trim_start_matches("http://").to_string();
    // Warm the server up (its threads, buffers) so their first allocations are not counted.
    let (warm, _) = post_big(&addr, "/v1/claim", "", 10);
    assert!(warm.contains("401"), "{warm}");
    let before = rss();
    let started = Instant::now();
    const GIB: u64 = 1 << 30;
    for (path, headers) in [
        ("/v1/leases/1/complete", ""),
        ("/v1/leases/1/complete", "Authorization: Bearer wrong\r\n"),
        ("/v1/leases/1/checkpoint", ""),
        ("/v1/claim", ""),
    ] {
        let (status, sent) = post_big(&addr, path, headers, GIB);
        assert!(status.contains("401"), "{path} {headers:?}: {status}");
        // The server answered and closed instead of reading: most of the gigabyte never left.
        assert!(
            sent < GIB / 4,
            "{path}: {sent} bytes went through before the refusal"
        );
    }
    let grown = rss().saturating_sub(before);
    assert!(
        grown < 10 << 20,
        "the resident set grew by {} MiB",
        grown >> 20
    );
    assert!(started.elapsed() < Duration::from_secs(30));
    // With the token but without a lease: refused (410) from the headers as well.
    let token = format!("Authorization: Bearer {}\r\n", coordinator.token());
    let (status, sent) = post_big(&addr, "/v1/leases/1/complete", &token, GIB);
    assert!(status.contains("410"), "{status}");
    assert!(sent < GIB / 4, "{sent}");
    // A control route refuses a body over its limit.
    let json = format!("{token}Content-Type: application/json\r\n");
    let (status, _) = post_big(&addr, "/v1/claim", &json, GIB);
    assert!(status.contains("413"), "{status}");
    let grown = rss().saturating_sub(before);
    assert!(
        grown < 10 << 20,
        "the resident set grew by {} MiB",
        grown >> 20
    );
}
