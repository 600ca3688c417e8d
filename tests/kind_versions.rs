//! "Bump the version when the output changes" is held by a test: every ML stage kind runs on a
//! tiny synthetic input (image folders written here, a 1-epoch tiny-cnn, every repair method)
//! and its outputs' digests are pinned in `tests/fixtures/kind_digests.json` beside the kind's
//! version. An output that changes while its kind's version stays is a failure: either the
//! change was unintended, or the version must go up (then refresh the pins with
//! `DEEPREPAIR_PIN_DIGESTS=update cargo test --test kind_versions`).
//!
//! Floating-point results depend on the GEMM kernels the CPU gets (AVX-512 or AVX2 sum in a
//! different order), so the pins record the instruction set they were made on; elsewhere only
//! the kinds without float GEMMs (`dataset`, `corrupt`) are compared.

mod common;
use common::*;
use std::collections::BTreeMap;

const CLASSES: [&str; 4] = ["cat", "dog", "frog", "ship"];
const FIXTURE: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/tests/fixtures/kind_digests.json"
);

/// A deterministic 32×32 image per (class, index): a class-coloured gradient plus texture.
fn png(path: &std::path::Path, class: usize, i: usize) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    let px: Vec<u8> = (0..32 * 32 * 3)
        .map(|p| {
            let (y, x, c) = (p / 96, (p / 3) % 32, p % 3);
            let base = if c == class % 3 { 160 } else { 60 } + 10 * class;
            (base + (x * (i + 1) + y * (class + 2)) % 64) as u8
        })
        .collect();
    std::fs::write(path, deeprepair_data::encode_png(&px, 32, 32).unwrap()).unwrap();
}

fn manifest(data: &str) -> String {
    let classes = format!("[{}]", CLASSES.join(", "));
    let mut m = format!(
        r#"
stages:
  train-data:
    kind: dataset
    params: {{path: "{data}", split: train, class_names: {classes}}}
  test-data:
    kind: dataset
    params: {{path: "{data}", split: test, class_names: {classes}, eval_set: clean}}
  base:
    kind: pretrain
    params: {{arch: tiny-cnn, epochs: 1, batch: 8, seed: 1}}
    inputs: {{train: train-data}}
  noisy:
    kind: corrupt
    params: {{corruption: gaussian_noise, severities: [3]}}
    inputs: {{images: test-data}}
  failures:
    kind: select-failures
    params: {{per_class: 3, seed: 1}}
    inputs: {{model: base.model, images: noisy}}
  style:
    kind: style-check
    inputs: {{model: base.model, clean: test-data, failures: failures.collected, corrupted: noisy}}
  eval-base:
    kind: evaluate
    inputs: {{model: base.model, sets: [test-data, failures.unseen]}}
"#
    );
    for method in [
        "finetune",
        "cutout",
        "mixup",
        "cutmix",
        "sensei",
        "augmix",
        "fsgmix",
        "deeprepair",
        "randaugment",
    ] {
        m.push_str(&format!(
            r#"  {method}:
    kind: {method}
    params: {{epochs: 1, batch: 8, seed: 1}}
    inputs: {{model: base.model, failures: failures.collected, train: train-data}}
  eval-{method}:
    kind: evaluate
    inputs: {{model: {method}.model, sets: [test-data, failures.unseen]}}
"#
        ));
    }
    m
}

#[test]
fn every_kind_s_output_is_pinned_to_its_version() {
    let s = Scratch::new();
    for (split, n) in [("train", 10), ("test", 8)] {
        for (c, class) in CLASSES.iter().enumerate() {
            for i in 0..n {
                png(
                    &s.path().join(format!("data/{split}/{class}/{i:02}.png")),
                    c,
                    i + if split == "test" { 50 } else { 0 },
                );
            }
        }
    }
    let m = s.write(
        "pins.yaml",
        &manifest(&s.path().join("data").display().to_string()),
    );
    run_ok(&["run", "--plain", m.to_str().unwrap()]);

    // stage → {kind, version, outputs: {name → digest}}, from the run's stage records.
    let store = s.store();
    let status = json(&run_ok(&[
        "status",
        "--json",
        "--store",
        store.to_str().unwrap(),
    ]));
    let mut pins = BTreeMap::new();
    for row in status["stages"].as_array().unwrap() {
        let stage = row["stage"].as_str().unwrap().to_string();
        let mut outputs = row["outputs"].as_object().unwrap().clone();
        if outputs.contains_key("model") {
            // A training stage's `metrics` is its curve, which records each epoch's wall time.
            outputs.remove("metrics");
        }
        pins.insert(
            stage,
            serde_json::json!({
                "kind": row["kind"],
                "version": row["version"],
                "outputs": outputs,
            }),
        );
    }
    let found = serde_json::to_string_pretty(&serde_json::json!({"isa": isa(), "stages": pins}))
        .unwrap()
        + "\n";
    if std::env::var("DEEPREPAIR_PIN_DIGESTS").as_deref() == Ok("update") {
        std::fs::write(FIXTURE, &found).unwrap();
        eprintln!("pinned {} stages in {FIXTURE}", pins.len());
        return;
    }
    let fixture: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(FIXTURE).unwrap()).unwrap();
    let pinned: BTreeMap<String, serde_json::Value> =
        serde_json::from_value(fixture["stages"].clone()).unwrap();
    let same_isa = fixture["isa"] == isa();
    if !same_isa {
        eprintln!(
            "pins made on {}, this CPU is {}: comparing only dataset and corrupt stages",
            fixture["isa"],
            isa()
        );
    }
    let mut problems = vec![];
    for (stage, now) in &pins {
        if !same_isa && !["dataset", "corrupt"].contains(&now["kind"].as_str().unwrap_or("")) {
            continue;
        }
        let Some(then) = pinned.get(stage) else {
            problems.push(format!("{stage}: not pinned (new stage in the test?)"));
            continue;
        };
        if now["outputs"] == then["outputs"] {
            continue;
        }
        if now["version"] == then["version"] {
            problems.push(format!(
                "{stage} ({} v{}): outputs changed without a version bump",
                now["kind"], now["version"]
            ));
        } else {
            problems.push(format!(
                "{stage} ({}): version {} -> {} with new outputs: refresh the pins",
                now["kind"], then["version"], now["version"]
            ));
        }
    }
    assert!(
        problems.is_empty(),
        "{}\n(if intended: bump the kind's version, then \
         DEEPREPAIR_PIN_DIGESTS=update cargo test --test kind_versions)",
        problems.join("\n")
    );
}

/// The instruction set the GEMM kernels dispatch on.
fn isa() -> String {
    #[cfg(target_arch = "x86_64")]
    {
        if std::is_x86_feature_detected!("avx512f") {
            return "x86_64-avx512f".into();
        }
        if std::is_x86_feature_detected!("avx2") {
            return "x86_64-avx2".into();
        }
    }
    std::env::consts::ARCH.into()
}
