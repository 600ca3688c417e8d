//! Helpers for the integration tests: a scratch directory with a manifest, and the real
//! `deeprepair` binary run against it.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

pub struct Scratch {
    pub dir: tempfile::TempDir,
}

impl Scratch {
    pub fn new() -> Scratch {
        Scratch {
            dir: tempfile::tempdir().expect("temp dir"),
        }
    }
    pub fn path(&self) -> &Path {
        self.dir.path()
    }
    pub fn write(&self, name: &str, text: &str) -> PathBuf {
        let p = self.path().join(name);
        std::fs::write(&p, text).expect("write manifest");
        p
    }
    pub fn store(&self) -> PathBuf {
        self.path().join(".deeprepair").join("store.redb")
    }
}

pub fn bin() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_deeprepair"));
    c.env("DEEPREPAIR_LOG", "warn");
    c.env_remove("DEEPREPAIR_STORE");
    c
}

pub fn run_ok(args: &[&str]) -> Output {
    let out = bin().args(args).output().expect("spawn deeprepair");
    assert!(
        out.status.success(),
        "deeprepair {args:?} failed: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

pub fn json(out: &Output) -> serde_json::Value {
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "stdout is not JSON ({e}): {}",
            String::from_utf8_lossy(&out.stdout)
        )
    })
}

/// stage path → output digest, for the last run in the store next to `manifest`.
pub fn outputs(manifest: &Path) -> std::collections::BTreeMap<String, String> {
    let out = run_ok(&["ls", "--json", "--manifest", manifest.to_str().unwrap()]);
    json(&out)
        .as_array()
        .expect("ls --json gives a list")
        .iter()
        .map(|row| {
            (
                format!(
                    "{}.{}",
                    row["stage"].as_str().unwrap(),
                    row["output"].as_str().unwrap()
                ),
                row["digest"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

/// The stage records of the last run of the store beside `manifest` (`status --json`).
pub fn status_rows(manifest: &Path) -> Vec<serde_json::Value> {
    let store = manifest.parent().unwrap().join(".deeprepair/store.redb");
    let out = run_ok(&["status", "--json", "--store", store.to_str().unwrap()]);
    json(&out)["stages"].as_array().unwrap().clone()
}

/// The artifacts of `manifest_text` run in-process in a fresh store (the reference for runs
/// elsewhere: worker processes, Slurm jobs).
pub fn in_process_outputs(manifest_text: &str) -> std::collections::BTreeMap<String, String> {
    in_process_outputs_with(manifest_text, &[])
}

/// [`in_process_outputs`] with more `run` arguments (e.g. `--data DIR`).
pub fn in_process_outputs_with(
    manifest_text: &str,
    extra: &[&str],
) -> std::collections::BTreeMap<String, String> {
    let s = Scratch::new();
    let m = s.write("p.yaml", manifest_text);
    let mut args = vec!["run", "--plain", "-j", "4", m.to_str().unwrap()];
    args.extend_from_slice(extra);
    run_ok(&args);
    outputs(&m)
}

/// (pid, name) of the worker processes whose parent is `parent`.
pub fn workers_of(parent: u32) -> Vec<(u32, String)> {
    let mut found = vec![];
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        // ppid is the second field after the parenthesized command name.
        let after = &stat[stat.rfind(')').unwrap_or(0) + 1..];
        let ppid: u32 = after
            .split_whitespace()
            .nth(1)
            .and_then(|p| p.parse().ok())
            .unwrap_or(0);
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        let args: Vec<String> = cmdline
            .split(|&b| b == 0)
            .map(|a| String::from_utf8_lossy(a).into_owned())
            .collect();
        if ppid == parent && args.get(1).map(String::as_str) == Some("worker") {
            let name = args
                .iter()
                .position(|a| a == "--name")
                .and_then(|i| args.get(i + 1).cloned())
                .unwrap_or_default();
            found.push((pid, name));
        }
    }
    found.sort();
    found
}

/// The lossless CIFAR-10 subset (`../shared/data`, or `$DEEPREPAIR_DATA`), when present; absent
/// with `DEEPREPAIR_REQUIRE_DATA` set (CI), the test fails instead of skipping.
pub fn data_dir() -> Option<PathBuf> {
    let root = std::env::var_os("DEEPREPAIR_DATA")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| {
            std::path::PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../shared/data"))
        });
    let dir = root.join("cifar10-lossless-subset");
    if dir.join("test_batch.bin").exists() {
        Some(dir)
    } else {
        if std::env::var_os("DEEPREPAIR_REQUIRE_DATA").is_some() {
            panic!(
                "{} is absent, and DEEPREPAIR_REQUIRE_DATA is set: the real data must be there",
                dir.display()
            );
        }
        None
    }
}
