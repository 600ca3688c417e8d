//! Crash safety: kill -9 at random points loses nothing committed and never leaves a corrupt
//! artifact; a flipped byte in a stored blob is detected and the stage recomputed; a second
//! writer gets a clear error; Ctrl-C stops cleanly and the next run resumes.

mod common;
use common::*;
use rand::{Rng, SeedableRng};
use std::time::{Duration, Instant};

/// Eight checkpointing stages feeding a fan-in: about a second of work on 2 slots.
const PIPELINE: &str = r#"
grid:
  seed: [1, 2, 3, 4, 5, 6, 7, 8]
stages:
  source:
    kind: util.text
    params: {text: "crash test"}
  train:
    kind: util.work
    over: [seed]
    inputs: {after: source}
    params: {steps: 24, step_ms: 8, checkpoint_every: 3, size: 300000}
  report:
    kind: util.concat
    inputs: {parts: {from: train, all: true}}
"#;

fn kill9(child: &mut std::process::Child) {
    // SIGKILL: no destructor, no flush, no chance to clean up.
    child.kill().expect("kill -9");
    child.wait().expect("reap");
}

#[test]
fn kill_9_at_random_points_then_rerun_gives_identical_results() {
    let reference = Scratch::new();
    let m = reference.write("p.yaml", PIPELINE);
    let t = Instant::now();
    run_ok(&["run", "--plain", m.to_str().unwrap()]);
    let full_ms = t.elapsed().as_millis() as u64;
    let expected = outputs(&m);
    assert_eq!(expected.len(), 10);

    let mut rng = rand::rngs::StdRng::seed_from_u64(20261123);
    let mut resumed_somewhere = false;
    let mut killed_mid_run = 0;
    for trial in 0..20 {
        let s = Scratch::new();
        let m = s.write("p.yaml", PIPELINE);
        // One or two kills at random moments of successive attempts, then a clean finish.
        for _ in 0..rng.random_range(1..=2) {
            let mut child = bin()
                .args(["run", "--plain", m.to_str().unwrap()])
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .spawn()
                .unwrap();
            std::thread::sleep(Duration::from_millis(rng.random_range(0..full_ms.max(50))));
            if child.try_wait().unwrap().is_none() {
                killed_mid_run += 1;
            }
            kill9(&mut child);
        }
        let out = run_ok(&["run", "--json", "--plain", m.to_str().unwrap()]);
        let summary = json(&out);
        assert_eq!(summary["state"], "succeeded", "trial {trial}: {summary}");
        assert_eq!(
            summary["recomputed_corrupt"].as_array().unwrap().len(),
            0,
            "trial {trial}: a committed artifact was corrupt after kill -9: {summary}"
        );
        assert_eq!(
            outputs(&m),
            expected,
            "trial {trial}: results differ from an uninterrupted run"
        );
        run_ok(&["verify", "--manifest", m.to_str().unwrap()]);
        for seed in 1..=8 {
            let stage = format!("train[seed={seed}]");
            let v = json(&run_ok(&[
                "inspect",
                "--json",
                "--manifest",
                m.to_str().unwrap(),
                &stage,
            ]));
            let tail = v["action"]["log_tail"].to_string();
            resumed_somewhere |= tail.contains("resumed from checkpoint");
        }
    }
    assert!(
        killed_mid_run >= 10,
        "most kills should land mid-run ({killed_mid_run}/20+)"
    );
    assert!(
        resumed_somewhere,
        "no stage ever resumed from a checkpoint in 20 trials"
    );
}

#[test]
fn a_flipped_byte_in_a_stored_blob_is_detected_and_the_stage_recomputed() {
    let s = Scratch::new();
    let m = s.write(
        "p.yaml",
        r#"
stages:
  blob:
    kind: util.work
    params: {steps: 3, size: 65536}
  after:
    kind: util.work
    inputs: {after: blob}
"#,
    );
    run_ok(&["run", "--plain", m.to_str().unwrap()]);
    let expected = outputs(&m);
    let digest = &expected["blob.data"];
    let export_dir = s.path().join("export");
    run_ok(&[
        "export",
        "--manifest",
        m.to_str().unwrap(),
        &digest[..12],
        "--out",
        export_dir.to_str().unwrap(),
    ]);
    let blob = std::fs::read(export_dir.join(format!("{}.bin", &digest[..12]))).unwrap();
    assert_eq!(blob.len(), 65536);

    // Find the blob's bytes inside the redb file and flip one.
    let mut file = std::fs::read(s.store()).unwrap();
    let probe = &blob[1000..1064];
    let at = file
        .windows(probe.len())
        .position(|w| w == probe)
        .expect("blob bytes are in the store file");
    file[at + 10] ^= 0x40;
    std::fs::write(s.store(), &file).unwrap();

    let verify = bin()
        .args(["verify", "--manifest", m.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(
        !verify.status.success(),
        "verify must report the flipped byte"
    );
    assert!(String::from_utf8_lossy(&verify.stdout).contains("does not match"));

    let summary = json(&run_ok(&["run", "--json", "--plain", m.to_str().unwrap()]));
    assert_eq!(
        summary["recomputed_corrupt"],
        serde_json::json!(["blob"]),
        "{summary}"
    );
    assert_eq!(
        summary["executed"],
        serde_json::json!(["blob"]),
        "the downstream stage stays cached: same bytes"
    );
    assert_eq!(outputs(&m), expected);
    run_ok(&["verify", "--manifest", m.to_str().unwrap()]);
}

#[test]
fn a_second_run_on_the_same_store_gets_a_clear_error() {
    let s = Scratch::new();
    let m = s.write(
        "p.yaml",
        "stages:\n  slow:\n    kind: util.work\n    params: {steps: 100, step_ms: 20}\n",
    );
    let mut first = bin()
        .args(["run", "--plain", m.to_str().unwrap()])
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while !s.store().exists() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    std::thread::sleep(Duration::from_millis(200));
    let second = bin()
        .args(["run", "--plain", m.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(!second.status.success());
    let err = String::from_utf8_lossy(&second.stderr);
    assert!(
        err.contains("in use by another deeprepair process"),
        "{err}"
    );
    // Readers still work while the run writes (poll: the run record is its first commit).
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let status = bin()
            .args(["status", "--manifest", m.to_str().unwrap()])
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&status.stdout).to_string();
        if status.status.success() && text.contains(": running") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "status never showed the running run: {text} {}",
            String::from_utf8_lossy(&status.stderr)
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    kill9(&mut first);
    let status = run_ok(&["status", "--manifest", m.to_str().unwrap()]);
    let first_look = String::from_utf8_lossy(&status.stdout).to_string();
    assert!(first_look.contains("interrupted"), "{first_look}");
    // The duration of a dead run stops at its last recorded activity: it does not grow.
    std::thread::sleep(Duration::from_millis(1200));
    let status = run_ok(&["status", "--manifest", m.to_str().unwrap()]);
    let second_look = String::from_utf8_lossy(&status.stdout).to_string();
    let duration = |text: &str| {
        text.lines()
            .next()
            .unwrap()
            .split(", ")
            .nth(1)
            .unwrap()
            .to_string()
    };
    assert_eq!(
        duration(&first_look),
        duration(&second_look),
        "{first_look}\n{second_look}"
    );
}

#[test]
fn ctrl_c_stops_at_a_checkpoint_and_the_next_run_resumes() {
    let s = Scratch::new();
    let m = s.write(
        "p.yaml",
        "stages:\n  long:\n    kind: util.work\n    params: {steps: 200, step_ms: 10, checkpoint_every: 10}\n",
    );
    let child = bin()
        .args(["run", "--plain", "--json", m.to_str().unwrap()])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(700));
    let ok = std::process::Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(ok.success());
    let out = child.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(130), "Ctrl-C exits 130");
    assert_eq!(json(&out)["state"], "cancelled");
    let summary = json(&run_ok(&["run", "--json", "--plain", m.to_str().unwrap()]));
    assert_eq!(summary["executed"], serde_json::json!(["long"]));
    let v = json(&run_ok(&[
        "inspect",
        "--json",
        "--manifest",
        m.to_str().unwrap(),
        "long",
    ]));
    assert!(
        v["action"]["log_tail"]
            .to_string()
            .contains("resumed from checkpoint"),
        "{v}"
    );
}
