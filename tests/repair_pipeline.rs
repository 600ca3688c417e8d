//! A reduced smoke grid end to end on real CIFAR-10 bytes (the lossless binary subset):
//! dataset → pretrain → corrupt → select-failures → four repair methods → evaluate → report.
//! Checks that every stage runs, the report holds a record per method, repaired models are
//! evaluated on their unseen failures, and a re-run executes nothing.

mod common;
use common::*;

const MANIFEST: &str = r#"
name: mini-repair
vars:
  data: UNSET
grid:
  corruption: [gaussian_noise]
defaults:
  finetune: {epochs: 1, batch: 32, train_on: train+failures}
  augmix: {epochs: 1, batch: 32, train_on: train+failures}
  fsgmix: {epochs: 1, batch: 32, train_on: train+failures, weight_steps: 3}
  deeprepair: {epochs: 1, batch: 32, train_on: train+failures, clusters: 2}
  cutout: {epochs: 1, batch: 32}
  mixup: {epochs: 1, batch: 32}
  cutmix: {epochs: 1, batch: 32, prob: 1.0}
  sensei: {epochs: 2, batch: 32, train_on: failures}
stages:
  train-data: {kind: dataset, params: {path: "${data}", split: train, per_class: 20}}
  test-data: {kind: dataset, params: {path: "${data}", split: test, per_class: 10, eval_set: clean}}
  base:
    kind: pretrain
    params: {arch: tiny-cnn, epochs: 2, batch: 32, lr: 0.05}
    inputs: {train: train-data}
  corrupted:
    kind: corrupt
    over: [corruption]
    params: {severities: [3, 5]}
    inputs: {images: test-data}
  failures:
    kind: select-failures
    over: [corruption]
    params: {per_class: 3}
    inputs: {model: base.model, images: corrupted}
  finetune: {kind: finetune, over: [corruption], inputs: {model: base.model, failures: failures.collected, train: train-data}}
  augmix: {kind: augmix, over: [corruption], inputs: {model: base.model, failures: failures.collected, train: train-data}}
  fsgmix: {kind: fsgmix, over: [corruption], inputs: {model: base.model, failures: failures.collected, train: train-data}}
  deeprepair: {kind: deeprepair, over: [corruption], inputs: {model: base.model, failures: failures.collected, train: train-data}}
  cutout: {kind: cutout, over: [corruption], inputs: {model: base.model, failures: failures.collected, train: train-data}}
  mixup: {kind: mixup, over: [corruption], inputs: {model: base.model, failures: failures.collected, train: train-data}}
  cutmix: {kind: cutmix, over: [corruption], inputs: {model: base.model, failures: failures.collected, train: train-data}}
  sensei: {kind: sensei, over: [corruption], inputs: {model: base.model, failures: failures.collected}}
  eval-cutout: {kind: evaluate, over: [corruption], inputs: {model: cutout.model, sets: failures.unseen}}
  eval-mixup: {kind: evaluate, over: [corruption], inputs: {model: mixup.model, sets: failures.unseen}}
  eval-cutmix: {kind: evaluate, over: [corruption], inputs: {model: cutmix.model, sets: failures.unseen}}
  eval-sensei: {kind: evaluate, over: [corruption], inputs: {model: sensei.model, sets: failures.unseen}}
  eval-base: {kind: evaluate, inputs: {model: base.model, sets: [test-data, {from: corrupted, all: true}, {from: failures.unseen, all: true}]}}
  eval-finetune: {kind: evaluate, over: [corruption], inputs: {model: finetune.model, sets: [test-data, corrupted, failures.unseen]}}
  eval-augmix: {kind: evaluate, over: [corruption], inputs: {model: augmix.model, sets: [test-data, corrupted, failures.unseen]}}
  eval-fsgmix: {kind: evaluate, over: [corruption], inputs: {model: fsgmix.model, sets: [test-data, corrupted, failures.unseen]}}
  eval-deeprepair: {kind: evaluate, over: [corruption], inputs: {model: deeprepair.model, sets: [test-data, corrupted, failures.unseen]}}
  report:
    kind: report
    inputs:
      results:
        - {from: eval-base, all: true}
        - {from: eval-finetune, all: true}
        - {from: eval-augmix, all: true}
        - {from: eval-fsgmix, all: true}
        - {from: eval-deeprepair, all: true}
        - {from: eval-cutout, all: true}
        - {from: eval-mixup, all: true}
        - {from: eval-cutmix, all: true}
        - {from: eval-sensei, all: true}
"#;

#[test]
fn reduced_smoke_grid_runs_end_to_end_and_reruns_nothing() {
    let Some(data) = data_dir() else {
        eprintln!(
            "SKIPPED: ../shared/data/cifar10-lossless-subset not found (set DEEPREPAIR_DATA)"
        );
        return;
    };
    let s = Scratch::new();
    let m = s.write("mini.yaml", MANIFEST);
    let m_str = m.to_str().unwrap();
    let data_arg = data.to_str().unwrap();
    let first = json(&run_ok(&[
        "run", "--json", "--plain", m_str, "--data", data_arg,
    ]));
    assert_eq!(first["executed"].as_array().unwrap().len(), 23, "{first}");

    let outputs = outputs(&m);
    let records_digest = &outputs["report.records"];
    let file = export_file(m_str, records_digest, &s.path().join("export"), |name| {
        name.ends_with(".json") && !name.ends_with(".artifact.json")
    })
    .expect("exported records");
    let records: Vec<serde_json::Value> =
        serde_json::from_slice(&std::fs::read(file).unwrap()).unwrap();
    for method in [
        "base",
        "finetune",
        "augmix",
        "fsgmix",
        "deeprepair",
        "cutout",
        "mixup",
        "cutmix",
        "sensei",
    ] {
        assert!(
            records.iter().any(|r| r["method"] == method),
            "no records for {method}"
        );
    }
    // Each repaired model is evaluated on its unseen failures De_k; the base model gets them all
    // wrong by construction.
    for r in records
        .iter()
        .filter(|r| r["eval_set"] == "failures:gaussian_noise")
    {
        let acc = r["accuracy"].as_f64().unwrap();
        assert!((0.0..=1.0).contains(&acc));
        if r["method"] == "base" {
            assert_eq!(acc, 0.0, "the base model fails every De_k image: {r}");
        }
    }
    assert_eq!(
        records
            .iter()
            .filter(|r| r["eval_set"] == "failures:gaussian_noise")
            .count(),
        9
    );

    // The report artifact unpacks into the tables and figures.
    let report_dir = s.path().join("report");
    run_ok(&[
        "export",
        "--manifest",
        m_str,
        "--out",
        report_dir.to_str().unwrap(),
        &outputs["report.report"],
    ]);
    let found: Vec<String> = walk(&report_dir);
    for name in ["report.md", "table2.md", "table2.csv", "table2.tex"] {
        assert!(
            found.iter().any(|f| f.ends_with(name)),
            "{name} missing from {found:?}"
        );
    }

    let again = json(&run_ok(&[
        "run", "--json", "--plain", m_str, "--data", data_arg,
    ]));
    assert_eq!(again["executed"].as_array().unwrap().len(), 0, "{again}");

    repair_command_on_a_folder_of_field_failures(&s, &outputs["base.model"], m_str, &data);
}

fn walk(dir: &std::path::Path) -> Vec<String> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else {
            out.push(p.display().to_string());
        }
    }
    out
}

/// `deeprepair repair` with the base model exported as a user's file and a folder of failure
/// images (class subfolders) made with `deeprepair corrupt`.
fn repair_command_on_a_folder_of_field_failures(
    s: &Scratch,
    model_digest: &str,
    m_str: &str,
    data: &std::path::Path,
) {
    let jpeg = data.parent().unwrap().join("cifar10-jpeg").join("test");
    if !jpeg.exists() {
        eprintln!("SKIPPED repair command: {} not found", jpeg.display());
        return;
    }
    let model = export_file(m_str, model_digest, &s.path().join("model"), |name| {
        name.ends_with(".safetensors")
    })
    .expect("exported model");
    let failures = s.path().join("field-failures");
    for class in deeprepair_data::CIFAR10_CLASSES {
        std::fs::create_dir_all(failures.join(class)).unwrap();
        for k in 0..4 {
            let input = jpeg.join(class).join(format!("{:04}.jpg", 200 + k));
            let output = failures.join(class).join(format!("{k}.png"));
            run_ok(&[
                "corrupt",
                "--corruption",
                "fog",
                "--severity",
                "5",
                input.to_str().unwrap(),
                output.to_str().unwrap(),
            ]);
        }
    }
    let out = s.path().join("repaired").join("model.safetensors");
    let printed = run_ok(&[
        "repair",
        "--arch",
        "tiny-cnn",
        "--model",
        model.to_str().unwrap(),
        "--failures",
        failures.to_str().unwrap(),
        "--train",
        data.to_str().unwrap(),
        "--method",
        "finetune",
        "--epochs",
        "1",
        "--batch",
        "16",
        "--train-per-class",
        "5",
        "--out",
        out.to_str().unwrap(),
        "--plain",
    ]);
    let text = String::from_utf8_lossy(&printed.stdout);
    assert!(text.contains("held-out failures (10)"), "{text}");
    assert!(text.contains("collected failures (30)"), "{text}");
    let bytes = std::fs::read(&out).unwrap();
    let tensors = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    assert!(
        tensors.names().contains(&"fc.weight"),
        "PyTorch names in the repaired weights"
    );
    assert_ne!(bytes, std::fs::read(&model).unwrap(), "the weights changed");

    // A wrong architecture for the weights is a clear error naming the tensors.
    let bad = bin()
        .args([
            "repair",
            "--arch",
            "allconv",
            "--model",
            model.to_str().unwrap(),
            "--failures",
            failures.to_str().unwrap(),
            "--train",
            data.to_str().unwrap(),
            "--out",
            s.path().join("bad.safetensors").to_str().unwrap(),
            "--plain",
        ])
        .output()
        .unwrap();
    assert!(!bad.status.success());
    let err = String::from_utf8_lossy(&bad.stderr);
    assert!(
        err.contains("do not fit allconv") && err.contains("missing"),
        "{err}"
    );
}

const PRETRAIN_ONLY: &str = r#"
name: pretrain-kill
vars:
  data: UNSET
stages:
  train-data: {kind: dataset, params: {path: "${data}", split: train, per_class: 20}}
  base:
    kind: pretrain
    params: {arch: tiny-cnn, epochs: 8, batch: 16, lr: 0.05}
    inputs: {train: train-data}
"#;

/// kill -9 a training stage after its second epoch; the re-run resumes from the stored
/// checkpoint and ends with the same model bytes as a run never interrupted.
#[test]
fn killed_pretraining_resumes_to_the_same_model() {
    kill_and_resume(PRETRAIN_ONLY, None);
}

/// The same with two data-parallel ranks (threads on this CPU) and synchronized BatchNorm:
/// the stage takes the data-parallel path, says so, and resumes to the same bytes.
#[test]
fn killed_data_parallel_pretraining_resumes_to_the_same_model() {
    kill_and_resume(
        &PRETRAIN_ONLY.replace("lr: 0.05}", "lr: 0.05, ranks: 2, sync_batch_norm: true}"),
        Some("data-parallel reduction: threads through host memory, synchronized BatchNorm"),
    );
}

/// Two ranks as two worker processes (`run --workers 2`: a gang meeting through the
/// coordinator, reducing over TCP) with synchronized BatchNorm give the bytes two ranks as
/// threads give. A rank's worker killed after epoch 2 fails the whole gang; the stage is
/// retried as a new gang, resumes from the epoch checkpoint and still ends with those bytes.
#[test]
fn data_parallel_ranks_as_worker_processes_match_threads_and_survive_a_killed_rank() {
    gang_loses_a_rank(RankFault::Killed);
}

/// The same with a rank's worker frozen (SIGSTOP) for 4 s: its lease times out, the other
/// rank stops waiting for it (cancelled), and the retried gang resumes to the same bytes.
#[test]
fn a_frozen_rank_abandons_its_gang_and_the_retry_resumes() {
    gang_loses_a_rank(RankFault::Frozen);
}

enum RankFault {
    Killed,
    Frozen,
}

fn gang_loses_a_rank(fault: RankFault) {
    use std::io::{BufRead, BufReader};
    let Some(data) = data_dir() else {
        eprintln!(
            "SKIPPED: ../shared/data/cifar10-lossless-subset not found (set DEEPREPAIR_DATA)"
        );
        return;
    };
    let manifest = PRETRAIN_ONLY.replace(
        "epochs: 8, batch: 16, lr: 0.05}",
        "epochs: 5, batch: 16, lr: 0.05, ranks: 2, sync_batch_norm: true}",
    );
    let data_arg = data.to_str().unwrap();
    // Two ranks as threads, in-process: the reference.
    let expected = in_process_outputs_with(&manifest, &["--data", data_arg])["base.model"].clone();

    let gang = Scratch::new();
    let m = gang.write("m.yaml", &manifest);
    let mut child = bin()
        .env("DEEPREPAIR_LOG", "info")
        .args(["run", "--plain", "--workers", "2", "--lease-timeout", "2"])
        .args([m.to_str().unwrap(), "--data", data_arg])
        .stderr(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let mut log = String::new();
    for line in lines.by_ref() {
        let line = line.unwrap();
        log.push_str(&line);
        log.push('\n');
        if line.contains("base: epoch 2:") {
            break;
        }
    }
    for wanted in [
        "rank 0 of 2 (one per worker process)",
        "rank 1: data-parallel: rank 1 of 2",
        "data-parallel reduction: TCP between worker processes, synchronized BatchNorm",
        "base: epoch 2:",
    ] {
        assert!(log.contains(wanted), "no '{wanted}' in:\n{log}");
    }
    let workers = workers_of(child.id());
    assert_eq!(workers.len(), 2, "{workers:?}");
    let (victim, name) = &workers[1];
    let signal = |sig: &str| {
        assert!(std::process::Command::new("kill")
            .args([sig, &victim.to_string()])
            .status()
            .unwrap()
            .success())
    };
    let lost = match fault {
        RankFault::Killed => {
            signal("-9");
            format!("worker {name} process exited")
        }
        RankFault::Frozen => {
            signal("-STOP");
            std::thread::sleep(std::time::Duration::from_secs(4));
            signal("-CONT");
            "lost: no heartbeat".to_string()
        }
    };
    for line in lines {
        log.push_str(&line.unwrap());
        log.push('\n');
    }
    assert!(child.wait().unwrap().success(), "the run failed:\n{log}");
    for wanted in [lost.as_str(), "resuming from the last epoch checkpoint"] {
        assert!(log.contains(wanted), "no '{wanted}' in:\n{log}");
    }
    // The surviving rank stopped on its own (EOF or cancellation), not by revocation.
    assert!(!log.contains("did not stop within"), "{log}");
    assert_eq!(
        outputs(&m)["base.model"],
        expected,
        "ranks as processes (with a lost rank, resumed) differ from ranks as threads"
    );
}

fn kill_and_resume(manifest: &str, expected_log: Option<&str>) {
    use std::io::{BufRead, BufReader};
    let Some(data) = data_dir() else {
        eprintln!(
            "SKIPPED: ../shared/data/cifar10-lossless-subset not found (set DEEPREPAIR_DATA)"
        );
        return;
    };
    let data_arg = data.to_str().unwrap();
    let expected = in_process_outputs_with(manifest, &["--data", data_arg])["base.model"].clone();

    let killed = Scratch::new();
    let m = killed.write("m.yaml", manifest);
    let mut child = bin()
        .env("DEEPREPAIR_LOG", "info")
        .args(["run", "--plain", m.to_str().unwrap(), "--data", data_arg])
        .stderr(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let (mut saw, mut log_before_kill) = (false, String::new());
    for line in BufReader::new(stderr).lines() {
        let line = line.unwrap();
        log_before_kill.push_str(&line);
        log_before_kill.push('\n');
        if line.contains("base: epoch 2:") {
            saw = true;
            break;
        }
    }
    assert!(saw, "the run never logged epoch 2:\n{log_before_kill}");
    if let Some(expected_log) = expected_log {
        assert!(
            log_before_kill.contains(expected_log),
            "no '{expected_log}' in:\n{log_before_kill}"
        );
    }
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();

    let resumed = bin()
        .env("DEEPREPAIR_LOG", "info")
        .args(["run", "--plain", m.to_str().unwrap(), "--data", data_arg])
        .output()
        .unwrap();
    assert!(resumed.status.success());
    let log = String::from_utf8_lossy(&resumed.stderr);
    assert!(
        log.contains("resuming from the last epoch checkpoint"),
        "{log}"
    );
    assert!(
        !log.contains("base: epoch 1:"),
        "epoch 1 was not redone: {log}"
    );
    assert_eq!(
        outputs(&m)["base.model"],
        expected,
        "resumed model differs from the uninterrupted one"
    );
}

/// The released CIFAR-10-C layout (`<corruption>.npy` in 5 severity blocks, `labels.npy`)
/// imports as Dv_k with exactly the chosen severity blocks, in order.
#[test]
fn cifar10c_npy_imports_the_chosen_severity_blocks() {
    let s = Scratch::new();
    let npy_dir = s.path().join("CIFAR-10-C");
    std::fs::create_dir_all(&npy_dir).unwrap();
    let (n, per) = (10usize, 32 * 32 * 3);
    // Image i is filled with the value i; labels cycle through the classes.
    let images: Vec<u8> = (0..n)
        .flat_map(|i| std::iter::repeat_n(i as u8, per))
        .collect();
    let labels: Vec<u8> = (0..n as u8).map(|i| i % 10).collect();
    deeprepair_data::write_cifar_c_npy(&npy_dir, "fog", &images, n, &labels).unwrap();
    let manifest = format!(
        "name: c\nstages:\n  fog:\n    kind: cifar10c\n    params: {{path: {:?}, corruption: fog, severities: [2, 5]}}\n",
        npy_dir.display().to_string()
    );
    let m = s.write("c.yaml", &manifest);
    run_ok(&["run", "--plain", m.to_str().unwrap()]);
    let digest = &outputs(&m)["fog.images"];
    let out = s.path().join("out");
    run_ok(&[
        "export",
        "--manifest",
        m.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        digest,
    ]);
    let raw = std::fs::read_dir(&out)
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.extension().is_some_and(|e| e == "drds"))
        .expect("exported dataset bytes");
    let ds = deeprepair_data::Dataset::from_bytes(&std::fs::read(raw).unwrap()).unwrap();
    assert_eq!(ds.len(), 4);
    // Severity 2 = images 2,3; severity 5 = images 8,9 (blocks of n/5 = 2).
    let firsts: Vec<u8> = (0..4).map(|i| ds.image(i)[0]).collect();
    assert_eq!(firsts, vec![2, 3, 8, 9]);
    assert_eq!(ds.labels, vec![2, 3, 8, 9]);

    // A file that is not 5 severity blocks is refused, naming it.
    let odd_dir = s.path().join("odd");
    std::fs::create_dir_all(&odd_dir).unwrap();
    deeprepair_data::write_cifar_c_npy(&odd_dir, "snow", &images[..7 * per], 7, &labels[..7])
        .unwrap();
    let bad = s.write(
        "bad.yaml",
        &manifest
            .replace("corruption: fog", "corruption: snow")
            .replace(
                &npy_dir.display().to_string(),
                &odd_dir.display().to_string(),
            ),
    );
    let o = bin()
        .args(["run", "--plain", bad.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("snow.npy") && err.contains("severity blocks"),
        "{err}"
    );
}

/// Exports artifact `digest` of the manifest's store into `dir` and returns the written file
/// whose name satisfies `wanted` (export also writes a `.artifact.json` header beside it).
fn export_file(
    m_str: &str,
    digest: &str,
    dir: &std::path::Path,
    wanted: impl Fn(&str) -> bool,
) -> Option<std::path::PathBuf> {
    run_ok(&[
        "export",
        "--manifest",
        m_str,
        "--out",
        dir.to_str().unwrap(),
        digest,
    ]);
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| wanted(&p.file_name().unwrap().to_string_lossy()))
}
