//! `push`/`pull` between two store files: a second sweep of the same manifest on the other
//! store executes nothing the first finished, and ends with byte-identical outputs.

mod common;
use common::*;

const SWEEP: &str = r#"
grid:
  seed: [1, 2, 3]
stages:
  source:
    kind: util.work
    params: {steps: 2, size: 5000000}
  train:
    kind: util.work
    over: [seed]
    inputs: {after: source}
    params: {steps: 3, size: 100000}
  report:
    kind: util.concat
    inputs: {parts: {from: train, all: true}}
"#;

fn run_json(manifest: &std::path::Path) -> serde_json::Value {
    json(&run_ok(&["run", "--json", manifest.to_str().unwrap()]))
}

fn exported(store: &std::path::Path, digest: &str, dir: &std::path::Path) -> Vec<u8> {
    run_ok(&[
        "export",
        digest,
        "--out",
        dir.to_str().unwrap(),
        "--store",
        store.to_str().unwrap(),
    ]);
    let file = std::fs::read_dir(dir)
        .unwrap()
        .flatten()
        .next()
        .unwrap()
        .path();
    std::fs::read(file).unwrap()
}

#[test]
fn pulled_and_pushed_results_answer_a_second_sweep_with_zero_stages_executed() {
    // The first sweep, on its own store.
    let first = Scratch::new();
    let m1 = first.write("sweep.yaml", SWEEP);
    let summary = run_json(&m1);
    assert_eq!(summary["executed"].as_array().unwrap().len(), 5);
    let expected = outputs(&m1);

    // pull: a second machine's fresh store takes the first's results.
    let second = Scratch::new();
    let m2 = second.write("sweep.yaml", SWEEP);
    let out = run_ok(&[
        "pull",
        first.store().to_str().unwrap(),
        "--store",
        second.store().to_str().unwrap(),
    ]);
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(said.contains("copied 5 stages"), "{said}");
    let summary = run_json(&m2);
    assert_eq!(
        summary["executed"].as_array().unwrap().len(),
        0,
        "{summary}"
    );
    assert_eq!(summary["cached"].as_array().unwrap().len(), 5);
    assert_eq!(outputs(&m2), expected);
    // Byte-identical: the report's bytes exported from both stores.
    let report = &expected["report.text"];
    let a = exported(&first.store(), report, &first.path().join("x"));
    let b = exported(&second.store(), report, &second.path().join("x"));
    assert!(!a.is_empty());
    assert_eq!(a, b);

    // Pulling again copies nothing new.
    let out = run_ok(&[
        "pull",
        first.store().to_str().unwrap(),
        "--store",
        second.store().to_str().unwrap(),
    ]);
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(
        said.contains("copied 0 stages") && said.contains("5 already there"),
        "{said}"
    );

    // push: a sweep with more seeds merges into a third store that already has other results.
    let third = Scratch::new();
    let m3 = third.write("sweep.yaml", &SWEEP.replace("[1, 2, 3]", "[3, 4]"));
    run_json(&m3);
    run_ok(&[
        "push",
        third.store().to_str().unwrap(),
        "--store",
        first.store().to_str().unwrap(),
    ]);
    let summary = run_json(&m3);
    assert_eq!(
        summary["executed"].as_array().unwrap().len(),
        0,
        "{summary}"
    );
    let m3b = third.write("sweep.yaml", &SWEEP.replace("[1, 2, 3]", "[1, 2, 3, 4]"));
    let summary = run_json(&m3b);
    // seeds 1–4 trained and the report over 1, 2, 3, 4 is new: only it runs.
    assert_eq!(
        summary["executed"].as_array().unwrap().len(),
        1,
        "{summary}"
    );

    // A source that does not exist is a clear error.
    let out = bin()
        .args(["pull", "/nonexistent/store.redb", "--store"])
        .arg(second.store())
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("no store at"));
}

#[test]
fn pull_over_http_from_a_served_store() {
    use std::io::BufRead;
    let first = Scratch::new();
    let m1 = first.write("sweep.yaml", SWEEP);
    run_json(&m1);
    let expected = outputs(&m1);
    let token = "a-test-token-of-enough-length";
    let mut server = bin()
        .env("DEEPREPAIR_SERVE_TOKEN", token)
        .args(["serve", "--listen", "127.0.0.1:0", "--store"])
        .arg(first.store())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = std::io::BufReader::new(server.stdout.take().unwrap()).lines();
    let url = loop {
        let line = lines.next().expect("serve printed its address").unwrap();
        if let Some(at) = line.find("http://") {
            break line[at..].trim().to_string();
        }
    };
    let second = Scratch::new();
    let m2 = second.write("sweep.yaml", SWEEP);
    // Without the right token: refused, nothing copied.
    let out = bin()
        .env("DEEPREPAIR_SERVE_TOKEN", "wrong-token-of-enough-length")
        .args(["pull", &url, "--store"])
        .arg(second.store())
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("401"));
    let out = bin()
        .env("DEEPREPAIR_SERVE_TOKEN", token)
        .args(["pull", &url, "--store"])
        .arg(second.store())
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{said}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(said.contains("copied 5 stages"), "{said}");
    // run --remote-cache: a third, empty store runs a bigger sweep; what the served store
    // finished is copied instead of executed, only the new seed and the fan-in run.
    let third = Scratch::new();
    let m3 = third.write("sweep.yaml", &SWEEP.replace("[1, 2, 3]", "[1, 2, 3, 4]"));
    let out = bin()
        .env("DEEPREPAIR_SERVE_TOKEN", token)
        .args(["run", "--json", "--remote-cache", &url])
        .arg(&m3)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let summary = json(&out);
    let executed: Vec<&str> = summary["executed"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s.as_str().unwrap())
        .collect();
    assert_eq!(executed.len(), 2, "{summary}");
    assert!(executed.iter().any(|s| s.contains("seed=4")), "{summary}");
    assert!(
        executed.iter().any(|s| s.starts_with("report")),
        "{summary}"
    );
    let _ = server.kill();
    let _ = server.wait();
    let summary = run_json(&m2);
    assert_eq!(
        summary["executed"].as_array().unwrap().len(),
        0,
        "{summary}"
    );
    assert_eq!(outputs(&m2), expected);
}

/// Starts `deeprepair serve` on `store` (extra args), returns it and its URL.
fn start_serve(
    store: &std::path::Path,
    token: &str,
    extra: &[&str],
) -> (std::process::Child, String) {
    use std::io::BufRead;
    let mut server = bin()
        .env("DEEPREPAIR_SERVE_TOKEN", token)
        .args(["serve", "--listen", "127.0.0.1:0", "--store"])
        .arg(store)
        .args(extra)
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = std::io::BufReader::new(server.stdout.take().unwrap()).lines();
    let url = loop {
        let line = lines.next().expect("serve printed its address").unwrap();
        if let Some(at) = line.find("http://") {
            break line[at..].trim().to_string();
        }
    };
    (server, url)
}

#[test]
fn push_over_http_to_a_writable_served_store() {
    let first = Scratch::new();
    let m1 = first.write("sweep.yaml", SWEEP);
    run_json(&m1);
    let expected = outputs(&m1);
    let token = "another-test-token-of-length";
    let push = |url: &str| {
        bin()
            .env("DEEPREPAIR_SERVE_TOKEN", token)
            .args(["push", url, "--store"])
            .arg(first.store())
            .output()
            .unwrap()
    };
    // A read-only server refuses pushes.
    let other = Scratch::new();
    run_json(&other.write("sweep.yaml", &SWEEP.replace("[1, 2, 3]", "[9]")));
    let (mut read_only, url) = start_serve(&other.store(), token, &[]);
    let out = push(&url);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("403") && err.contains("read-only"), "{err}");
    let _ = read_only.kill();
    let _ = read_only.wait();
    // A writable one (a fresh store) takes them; a run on it executes nothing.
    let second = Scratch::new();
    let m2 = second.write("sweep.yaml", SWEEP);
    let (mut writable, url) = start_serve(&second.store(), token, &["--writable"]);
    let out = push(&url);
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{said}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(said.contains("copied 5 stages"), "{said}");
    // Pushing again sends nothing.
    let said = String::from_utf8_lossy(&push(&url).stdout).into_owned();
    assert!(said.contains("copied 0 stages"), "{said}");
    let _ = writable.kill();
    let _ = writable.wait();
    let summary = run_json(&m2);
    assert_eq!(
        summary["executed"].as_array().unwrap().len(),
        0,
        "{summary}"
    );
    assert_eq!(outputs(&m2), expected);
}
