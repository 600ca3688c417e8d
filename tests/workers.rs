//! Worker processes over real HTTP: `run --workers N` gives the same artifacts as an
//! in-process run; a worker killed (kill -9) or frozen (SIGSTOP) mid-stage loses nothing
//! committed: its stage moves to another worker and resumes from the last checkpoint.

mod common;
use common::*;
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

/// Four checkpointing stages of ~3 s each, two at a time, then a fan-in.
const PIPELINE: &str = r#"
grid:
  seed: [1, 2, 3, 4]
stages:
  source:
    kind: util.text
    params: {text: "worker test"}
  train:
    kind: util.work
    over: [seed]
    inputs: {after: source}
    params: {steps: 30, step_ms: 100, checkpoint_every: 5, size: 300000}
  report:
    kind: util.concat
    inputs: {parts: {from: train, all: true}}
"#;

fn start_run(manifest: &std::path::Path, extra: &[&str]) -> Child {
    bin()
        .args(["run", "--plain", "-j", "2", "--workers", "2"])
        .args(extra)
        .arg(manifest)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

/// Waits until the run has committed a checkpoint-bearing stage in progress: ~1.5 s in.
fn wait_for_workers(run: &Child) -> Vec<(u32, String)> {
    let started = Instant::now();
    loop {
        let w = workers_of(run.id());
        if w.len() == 2 {
            return w;
        }
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "workers did not start"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn finish(run: Child) -> String {
    let out = run.wait_with_output().unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "run failed:\n{text}");
    text
}

#[test]
fn cpu_workers_produce_the_in_process_artifacts() {
    let expected = in_process_outputs(PIPELINE);
    let s = Scratch::new();
    let m = s.write("p.yaml", PIPELINE);
    finish(start_run(&m, &[]));
    assert_eq!(outputs(&m), expected);
    // Every stage ran in a worker process, named in its provenance.
    for row in status_rows(&m) {
        let worker = row["worker"].as_str().unwrap();
        assert!(
            worker.starts_with("cpu0@") || worker.starts_with("cpu1@"),
            "{row}"
        );
    }
    // A second run answers everything from the cache, workers or not.
    let out = run_ok(&["run", "--json", "--workers", "1", m.to_str().unwrap()]);
    let summary = json(&out);
    assert_eq!(summary["executed"].as_array().unwrap().len(), 0);
    assert_eq!(summary["cached"].as_array().unwrap().len(), 6);
}

fn retried_stage_resumed(manifest: &std::path::Path) {
    let rows = status_rows(manifest);
    let retried: Vec<&serde_json::Value> = rows
        .iter()
        .filter(|r| r["attempt"].as_u64().unwrap() > 0)
        .collect();
    assert_eq!(
        retried.len(),
        1,
        "exactly the lost stage is retried: {rows:?}"
    );
    let stage = retried[0]["stage"].as_str().unwrap().to_string();
    let out = run_ok(&[
        "inspect",
        &stage,
        "--store",
        manifest
            .parent()
            .unwrap()
            .join(".deeprepair/store.redb")
            .to_str()
            .unwrap(),
    ]);
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        text.contains("resumed from checkpoint at step"),
        "the retry resumed from the lost worker's checkpoint:\n{text}"
    );
}

#[test]
fn a_killed_worker_loses_nothing_committed() {
    let expected = in_process_outputs(PIPELINE);
    let s = Scratch::new();
    let m = s.write("p.yaml", PIPELINE);
    let run = start_run(&m, &[]);
    let workers = wait_for_workers(&run);
    // Both workers are a checkpoint or more into their first stage.
    std::thread::sleep(Duration::from_millis(1500));
    let (victim, name) = &workers[0];
    let status = std::process::Command::new("kill")
        .args(["-9", &victim.to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let log = finish(run);
    assert!(
        log.contains(&format!("worker {name} process exited")),
        "the coordinator noticed: {log}"
    );
    assert_eq!(outputs(&m), expected, "same artifacts as without the kill");
    retried_stage_resumed(&m);
}

#[test]
fn a_frozen_worker_loses_its_lease_to_another_worker() {
    let expected = in_process_outputs(PIPELINE);
    let s = Scratch::new();
    let m = s.write("p.yaml", PIPELINE);
    let run = start_run(&m, &["--lease-timeout", "2"]);
    let workers = wait_for_workers(&run);
    std::thread::sleep(Duration::from_millis(1500));
    let (victim, name) = workers[0].clone();
    let stop = |sig: &str| {
        std::process::Command::new("kill")
            .args([sig, &victim.to_string()])
            .status()
            .unwrap()
    };
    assert!(stop("-STOP").success());
    // The other worker finishes its stage and picks up the frozen one's after the timeout.
    std::thread::sleep(Duration::from_secs(4));
    assert!(stop("-CONT").success());
    finish(run);
    assert_eq!(outputs(&m), expected);
    retried_stage_resumed(&m);
    // The frozen worker woke up to a revoked lease and dropped its late result.
    let log =
        std::fs::read_to_string(s.path().join(format!(".deeprepair/workers/{name}.log"))).unwrap();
    assert!(log.contains("was revoked"), "{log}");
}

/// Four 0.6 s stages that each declare one GPU.
const GPU_STAGES: &str = r#"
gpu_share: 2
grid:
  seed: [1, 2, 3, 4]
stages:
  g:
    kind: util.work
    over: [seed]
    params: {steps: 6, step_ms: 100}
    resources: {cpus: 1, gpus: 1}
"#;

/// The largest number of stages whose [started, ended] intervals overlap.
fn max_overlap(rows: &[serde_json::Value]) -> usize {
    let mut events: Vec<(u64, i32)> = vec![];
    for r in rows {
        events.push((r["started_ms"].as_u64().unwrap(), 1));
        events.push((r["ended_ms"].as_u64().unwrap(), -1));
    }
    // Ends before starts at the same millisecond.
    events.sort();
    let (mut now, mut most) = (0i32, 0i32);
    for (_, d) in events {
        now += d;
        most = most.max(now);
    }
    most as usize
}

#[test]
fn gpu_slots_follow_gpu_share_and_cpu_runs_ignore_gpu_requests() {
    // One GPU shared by two stages at a time (in-process: this build has no CUDA, and
    // util.work only records the GPU it was given).
    let s = Scratch::new();
    let m = s.write("g.yaml", GPU_STAGES);
    run_ok(&[
        "run",
        "-j",
        "4",
        "--gpus",
        "0",
        "--in-process",
        m.to_str().unwrap(),
    ]);
    let rows = status_rows(&m);
    assert_eq!(rows.len(), 4);
    assert!(rows.iter().all(|r| r["worker"] == "local:gpu0"), "{rows:?}");
    assert_eq!(
        max_overlap(&rows),
        2,
        "gpu_share: 2 → two stages per GPU: {rows:?}"
    );

    // --gpu-share overrides the manifest.
    let s = Scratch::new();
    let m = s.write("g.yaml", GPU_STAGES);
    run_ok(&[
        "run",
        "-j",
        "4",
        "--gpus",
        "0",
        "--in-process",
        "--gpu-share",
        "1",
        m.to_str().unwrap(),
    ]);
    assert_eq!(max_overlap(&status_rows(&m)), 1);

    // Without --gpus the same stages run on the CPU, four at a time.
    let s = Scratch::new();
    let m = s.write("g.yaml", GPU_STAGES);
    run_ok(&["run", "-j", "4", m.to_str().unwrap()]);
    let rows = status_rows(&m);
    assert!(rows.iter().all(|r| r["worker"] == "local:cpu"), "{rows:?}");
    assert!(max_overlap(&rows) > 2, "{rows:?}");

    // A data-parallel stage wanting more GPUs than the run has fails clearly.
    let s = Scratch::new();
    let m = s.write("g.yaml", &GPU_STAGES.replace("gpus: 1", "gpus: 2"));
    let out = bin()
        .args(["run", "--gpus", "0", "--in-process", m.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("needs 2 GPU(s) but the run has 1"), "{err}");

    // gpu_share: 0 is a manifest error with its location.
    let s = Scratch::new();
    let m = s.write(
        "g.yaml",
        &GPU_STAGES.replace("gpu_share: 2", "gpu_share: 0"),
    );
    let out = bin().args(["plan", m.to_str().unwrap()]).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("g.yaml:2:") && err.contains("gpu_share must be at least 1"),
        "{err}"
    );
}

/// Whether `pid` is a live process (not a zombie).
fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|stat| {
            let state = stat
                .rsplit(')')
                .next()
                .and_then(|r| r.split_whitespace().next());
            state != Some("Z") && state != Some("X")
        })
        .unwrap_or(false)
}

/// Workers die with their `run`, however it dies (here SIGKILL, which it cannot handle): they
/// get the parent-death signal instead of running on for the 30 s a worker waits for an
/// unreachable coordinator.
#[test]
fn workers_die_with_a_killed_run() {
    // 30 s stages that never checkpoint: nothing makes a worker call the coordinator (and
    // notice it is gone) before they end.
    let s = Scratch::new();
    let m = s.write(
        "p.yaml",
        r#"
grid:
  seed: [1, 2]
stages:
  long:
    kind: util.work
    over: [seed]
    params: {steps: 300, step_ms: 100, checkpoint_every: 0}
"#,
    );
    let mut run = start_run(&m, &[]);
    let workers = wait_for_workers(&run);
    // Both are into their stage.
    std::thread::sleep(Duration::from_millis(1500));
    run.kill().unwrap();
    run.wait().unwrap();
    let started = Instant::now();
    while workers.iter().any(|(pid, _)| alive(*pid)) {
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "workers {workers:?} outlived their run"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// SIGTERM stops a run like Ctrl-C: no new stages, running ones stop at their next
/// checkpoint, the run is recorded as cancelled (exit 130) rather than killed.
#[test]
fn sigterm_stops_a_run_like_ctrl_c() {
    let s = Scratch::new();
    let m = s.write("p.yaml", PIPELINE);
    let run = start_run(&m, &[]);
    wait_for_workers(&run);
    std::thread::sleep(Duration::from_millis(500));
    let status = std::process::Command::new("kill")
        .args(["-TERM", &run.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let out = run.wait_with_output().unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(out.status.code(), Some(130), "{text}");
    assert!(text.contains("SIGTERM: no new stages"), "{text}");
    assert!(text.contains("Cancelled"), "{text}");
}

/// A stage that makes no progress for `--stall-timeout` counts as hung (e.g. every rank of
/// a gang stuck in a collective while their threads still heartbeat): its lease is revoked
/// and it fails as transient. The same stage with a longer limit succeeds.
#[test]
fn a_stage_without_progress_is_revoked_as_hung() {
    // A progress update every 2.5 s.
    let manifest = r#"
stages:
  slow:
    kind: util.work
    params: {steps: 2, step_ms: 2500}
"#;
    let s = Scratch::new();
    let m = s.write("p.yaml", manifest);
    let run = |stall: &str| {
        bin()
            .args([
                "run",
                "--plain",
                "-j",
                "1",
                "--workers",
                "1",
                "--retries",
                "0",
            ])
            .args(["--stall-timeout", stall])
            .arg(&m)
            .output()
            .unwrap()
    };
    let out = run("1");
    let text = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!out.status.success(), "{text}");
    assert!(text.contains("hung: no progress for"), "{text}");
    let out = run("10");
    let text = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "{text}");
}

/// A stage's `time` is its wall-clock limit in a worker process too: past it the lease is
/// revoked and the stage fails as transient. The same stage with more time succeeds.
#[test]
fn a_stage_past_its_time_limit_is_revoked() {
    let s = Scratch::new();
    let manifest = |time: &str| {
        format!(
            "stages:\n  slow:\n    kind: util.work\n    params: {{steps: 4, step_ms: 1000}}\n    \
             resources: {{time: \"{time}\"}}\n"
        )
    };
    let run = |time: &str| {
        let m = s.write("p.yaml", &manifest(time));
        bin()
            .args([
                "run",
                "--plain",
                "-j",
                "1",
                "--workers",
                "1",
                "--retries",
                "0",
            ])
            .arg(&m)
            .output()
            .unwrap()
    };
    let out = run("0:02");
    let text = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!out.status.success(), "{text}");
    assert!(
        text.contains("ran past the stage's time limit (2s)"),
        "{text}"
    );
    let out = run("0:20");
    let text = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "{text}");
}

/// One 2 MB input read by six stages (two worker processes).
const SHARED_INPUT: &str = r#"
grid:
  seed: [1, 2, 3, 4, 5, 6]
stages:
  source:
    kind: util.work
    params: {steps: 1, size: 2000000}
  eval:
    kind: util.work
    over: [seed]
    inputs: {after: source}
    params: {steps: 2}
"#;

/// Runs `manifest` on two CPU workers (with `cache` as their cache folder, if any); returns
/// how many input artifacts and bytes the coordinator sent, from its closing log line.
fn run_counting_transfers(
    manifest: &std::path::Path,
    cache: Option<&std::path::Path>,
) -> (u64, u64) {
    let mut cmd = bin();
    cmd.env("DEEPREPAIR_LOG", "info")
        .env_remove("DEEPREPAIR_CACHE_DIR")
        .args(["run", "--plain", "-j", "2", "--workers", "2"])
        .arg(manifest);
    if let Some(dir) = cache {
        cmd.env("DEEPREPAIR_CACHE_DIR", dir);
    }
    let out = cmd.output().unwrap();
    let log = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "run failed:\n{log}");
    let line = log
        .lines()
        .find(|l| l.contains("data plane: sent"))
        .unwrap_or_else(|| panic!("no data plane line in:\n{log}"));
    let numbers: Vec<u64> = line
        .split(|c: char| !c.is_ascii_digit())
        .filter_map(|n| n.parse().ok())
        .collect();
    // "... sent N input artifacts (B bytes) to workers, received U uploads (R bytes);
    // checkpoints in T write transactions"
    let n = numbers.len();
    (numbers[n - 5], numbers[n - 4])
}

#[test]
fn a_shared_cache_fetches_each_input_once_per_node_and_refetches_a_corrupt_entry() {
    let expected = in_process_outputs(SHARED_INPUT);
    // Without a cache, each of the six stages downloads the input.
    let s = Scratch::new();
    let m = s.write("p.yaml", SHARED_INPUT);
    let (sent, bytes) = run_counting_transfers(&m, None);
    assert_eq!(sent, 6, "one download per stage without a cache");
    assert!(bytes > 6 * 2_000_000, "{bytes}");
    assert_eq!(outputs(&m), expected);

    // With one cache folder for both workers (one node): one download in all.
    let s = Scratch::new();
    let m = s.write("p.yaml", SHARED_INPUT);
    let cache = s.path().join("cache");
    let (sent, bytes) = run_counting_transfers(&m, Some(&cache));
    assert_eq!(sent, 1, "one download per node with the cache");
    assert!(bytes < 2 * 2_000_000, "{bytes}");
    assert_eq!(outputs(&m), expected, "same artifacts through the cache");
    let logs: String = ["cpu0", "cpu1"]
        .iter()
        .map(|w| {
            std::fs::read_to_string(s.path().join(format!(".deeprepair/workers/{w}.log")))
                .unwrap_or_default()
        })
        .collect();
    assert_eq!(logs.matches("artifact cache: fetched").count(), 1, "{logs}");

    // Flip a byte of the cached input; new stages reading it detect that and fetch it again.
    let entry = std::fs::read_dir(&cache)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|e| e == "frame"))
        .expect("a cache entry");
    let mut bytes = std::fs::read(&entry).unwrap();
    let middle = bytes.len() - 1000;
    bytes[middle] ^= 0x40;
    std::fs::write(&entry, &bytes).unwrap();
    let more = SHARED_INPUT.replace("[1, 2, 3, 4, 5, 6]", "[7, 8, 9]");
    let m = s.write("p.yaml", &more);
    let (sent, _) = run_counting_transfers(&m, Some(&cache));
    assert_eq!(sent, 1, "the corrupt entry was fetched again, once");
    let logs: String = ["cpu0", "cpu1"]
        .iter()
        .map(|w| {
            std::fs::read_to_string(s.path().join(format!(".deeprepair/workers/{w}.log")))
                .unwrap_or_default()
        })
        .collect();
    assert!(logs.contains("is corrupt"), "{logs}");
    assert_eq!(outputs(&m), in_process_outputs(&more));
}

#[test]
fn workers_over_tls_produce_the_in_process_artifacts() {
    let expected = in_process_outputs(SHARED_INPUT);
    let s = Scratch::new();
    let m = s.write("p.yaml", SHARED_INPUT);
    let cert = rcgen::generate_simple_self_signed(vec!["127.0.0.1".to_string()]).unwrap();
    let cert_path = s.write("cert.pem", &cert.cert.pem());
    let key_path = s.write("key.pem", &cert.signing_key.serialize_pem());
    let out = bin()
        .env("DEEPREPAIR_LOG", "info")
        .env_remove("DEEPREPAIR_TLS_CA")
        .args(["run", "--plain", "-j", "2", "--workers", "2", "--tls-cert"])
        .arg(&cert_path)
        .arg("--tls-key")
        .arg(&key_path)
        .arg(&m)
        .output()
        .unwrap();
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{log}");
    assert!(log.contains("coordinator listening at https://"), "{log}");
    assert_eq!(outputs(&m), expected);
    // A missing key file is a clear error before anything runs.
    let out = bin()
        .args(["run", "--workers", "1", "--tls-cert"])
        .arg(&cert_path)
        .args(["--tls-key", "/nonexistent/key.pem"])
        .arg(&m)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("cannot use TLS certificate"), "{err}");
}
