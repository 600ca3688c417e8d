//! Plan expansion of a grid manifest, stage-key stability and sensitivity, and the action
//! cache: a re-run executes nothing; a changed param re-runs exactly its downstream.

mod common;
use common::*;
use deeprepair_pipeline::key::stage_key;
use deeprepair_pipeline::{builtin, plan_file, Digest, Registry};
use serde_json::json;
use std::collections::BTreeMap;

fn registry() -> Registry {
    let mut r = Registry::new();
    builtin::register(&mut r);
    r
}

const GRID: &str = r#"
name: grid
grid:
  seed: [0, 1, 2]
  label: [a, b, c, d]
  steps: [1, 2]
stages:
  source:
    kind: util.text
    params: {text: "source"}
  per-seed:
    kind: util.work
    over: [seed]
    inputs: {after: source}
  cell:
    kind: util.work
    over: [seed, label, steps]
    inputs: {after: per-seed}
  by-label:
    kind: util.concat
    over: []
    inputs: {parts: {from: cell, all: true}}
overrides:
  - stage: cell
    when: {label: b}
    params: {size: 99}
"#;

#[test]
fn grid_expands_to_the_cartesian_product_with_matched_edges() {
    let s = Scratch::new();
    let m = s.write("grid.yaml", GRID);
    let plan = plan_file(&m, &registry()).expect("plans");
    let counts = plan.counts_by_kind();
    assert_eq!(counts["util.text"], 1);
    assert_eq!(counts["util.work"], 3 + 3 * 4 * 2);
    assert_eq!(counts["util.concat"], 1);
    // Topological order: every input points to an earlier stage.
    for (i, st) in plan.stages.iter().enumerate() {
        for e in st.inputs.values().flatten() {
            assert!(e.from < i, "{} depends on a later stage", st.path);
        }
    }
    // A cell is fed by the per-seed stage with the same seed, and only that one.
    let cell = plan
        .find("cell[seed=2,label=c,steps=1]")
        .expect("cell exists");
    let ups = &plan.stages[cell].inputs["after"];
    assert_eq!(ups.len(), 1);
    assert_eq!(plan.stages[ups[0].from].path, "per-seed[seed=2]");
    // The fan-in takes all 24 cells.
    let join = plan.find("by-label").unwrap();
    assert_eq!(plan.stages[join].inputs["parts"].len(), 24);
    assert_eq!(plan.graph().edge_count(), 3 + 24 + 24);
    // Grid values become params; overrides apply only where `when` matches.
    assert_eq!(plan.stages[cell].params["seed"], json!(2));
    assert_eq!(plan.stages[cell].params["size"], json!(256));
    let b = plan.find("cell[seed=0,label=b,steps=2]").unwrap();
    assert_eq!(plan.stages[b].params["size"], json!(99));
    assert_eq!(plan.stages[b].params["steps"], json!(2));
}

#[test]
fn stage_keys_are_stable_and_sensitive() {
    let params = json!({"lr": 0.1, "epochs": 3, "arch": "wrn-40-2"});
    let reordered = json!({"arch": "wrn-40-2", "epochs": 3, "lr": 0.1});
    let mut inputs = BTreeMap::new();
    inputs.insert("model".to_string(), vec![Digest::of(b"model")]);
    let k = stage_key("train", "1", &params, &inputs);
    // Pinned value: a change in the key encoding must be deliberate (bump KEY_SCHEMA).
    assert_eq!(k, stage_key("train", "1", &reordered, &inputs));
    assert_eq!(
        k.hex(),
        stage_key("train", "1", &params, &inputs).hex(),
        "same inputs, same key"
    );
    assert_ne!(k, stage_key("train", "2", &params, &inputs), "code version");
    assert_ne!(k, stage_key("evaluate", "1", &params, &inputs), "kind");
    let mut p2 = params.clone();
    p2["lr"] = json!(0.2);
    assert_ne!(k, stage_key("train", "1", &p2, &inputs), "a param");
    let mut i2 = inputs.clone();
    i2.insert("model".into(), vec![Digest::of(b"other model")]);
    assert_ne!(k, stage_key("train", "1", &params, &i2), "an input digest");
    // Plans of the same manifest give the same keys in two processes: compare via the CLI.
    let s = Scratch::new();
    let m = s.write("grid.yaml", GRID);
    let a = json(&run_ok(&["plan", "--format", "json", m.to_str().unwrap()]));
    let b = json(&run_ok(&["plan", "--format", "json", m.to_str().unwrap()]));
    assert_eq!(a["status"]["keys"], b["status"]["keys"]);
    assert_eq!(a["status"]["keys"][0].as_str().map(str::len), Some(64));
}

fn run_json(m: &std::path::Path) -> serde_json::Value {
    json(&run_ok(&["run", "--json", "--plain", m.to_str().unwrap()]))
}

fn names(v: &serde_json::Value) -> Vec<String> {
    let mut out: Vec<String> = v
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s.as_str().unwrap().to_string())
        .collect();
    out.sort();
    out
}

#[test]
fn rerun_executes_nothing_and_a_param_change_reruns_exactly_downstream() {
    let s = Scratch::new();
    let m = s.write("grid.yaml", GRID);
    let first = run_json(&m);
    assert_eq!(first["executed"].as_array().unwrap().len(), 29);
    let before = outputs(&m);

    let again = run_json(&m);
    assert_eq!(again["executed"].as_array().unwrap().len(), 0, "{again}");
    assert_eq!(again["cached"].as_array().unwrap().len(), 29);
    assert_eq!(outputs(&m), before);

    // Change the params of one per-seed stage: it, its 8 cells and the fan-in re-run.
    let changed = GRID.replace(
        "overrides:\n",
        "overrides:\n  - stage: per-seed\n    when: {seed: 1}\n    params: {steps: 7}\n",
    );
    let m2 = s.write("grid.yaml", &changed);
    let third = run_json(&m2);
    let mut expected = vec!["by-label".to_string(), "per-seed[seed=1]".to_string()];
    for label in ["a", "b", "c", "d"] {
        for steps in [1, 2] {
            expected.push(format!("cell[seed=1,label={label},steps={steps}]"));
        }
    }
    expected.sort();
    assert_eq!(names(&third["executed"]), expected);
    assert_eq!(
        third["cached"].as_array().unwrap().len(),
        29 - expected.len()
    );

    // `plan` now reports everything cached.
    let plan = json(&run_ok(&["plan", "--format", "json", m2.to_str().unwrap()]));
    let states = plan["status"]["states"].as_array().unwrap();
    assert!(states.iter().all(|s| s == "cached"), "{states:?}");
}

#[test]
fn transient_failures_retry_and_fatal_ones_stop_or_keep_going() {
    let s = Scratch::new();
    let m = s.write(
        "flaky.yaml",
        r#"
stages:
  flaky:
    kind: util.work
    params: {fail_attempts: 2}
"#,
    );
    let out = run_ok(&["run", "--json", "--plain", m.to_str().unwrap()]);
    assert_eq!(json(&out)["executed"], json!(["flaky"]));
    let inspect = json(&run_ok(&[
        "inspect",
        "--json",
        "--manifest",
        m.to_str().unwrap(),
        "flaky",
    ]));
    assert_eq!(
        inspect["action"]["attempt"],
        json!(2),
        "succeeded on the third attempt"
    );

    let broken = r#"
grid:
  seed: [1, 2, 3]
stages:
  bad:
    kind: util.work
    params: {fail: true}
  after-bad:
    kind: util.work
    inputs: {after: bad}
  good:
    kind: util.work
    over: [seed]
    params: {steps: 5, step_ms: 5}
"#;
    let m = s.write("broken.yaml", broken);
    let out = bin()
        .args([
            "run",
            "--json",
            "--plain",
            "--jobs",
            "1",
            "--keep-going",
            m.to_str().unwrap(),
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let v = json(&out);
    assert_eq!(v["failed"][0]["stage"], json!("bad"));
    assert_eq!(v["failed"][0]["error"], json!("asked to fail"));
    assert_eq!(names(&v["skipped"]), vec!["after-bad".to_string()]);
    assert_eq!(
        v["executed"].as_array().unwrap().len(),
        3,
        "keep-going ran the good ones"
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("stage bad failed: asked to fail"),
        "{stderr}"
    );
    assert!(
        stderr.contains("failing as asked"),
        "log tail shown: {stderr}"
    );

    // Fail-fast (the default): once `bad` fails nothing new launches; `slow`, already
    // running, finishes and is committed; the stages waiting on it are skipped.
    let s2 = Scratch::new();
    let gated = broken.replace(
        "    params: {steps: 5, step_ms: 5}",
        "    params: {steps: 5, step_ms: 5}\n    inputs: {after: slow}\n  slow:\n    kind: util.work\n    params: {steps: 20, step_ms: 20}",
    );
    let m = s2.write("broken.yaml", &gated);
    let out = bin()
        .args([
            "run",
            "--json",
            "--plain",
            "--jobs",
            "2",
            m.to_str().unwrap(),
        ])
        .output()
        .unwrap();
    let v = json(&out);
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(v["executed"], json!(["slow"]), "{v}");
    assert_eq!(
        names(&v["skipped"]),
        vec!["after-bad", "good[seed=1]", "good[seed=2]", "good[seed=3]"]
    );
}

#[test]
fn gc_drops_only_what_kept_runs_do_not_reach() {
    let s = Scratch::new();
    let v1 = "stages:\n  a:\n    kind: util.work\n    params: {seed: 1, size: 5000}\n  b:\n    kind: util.work\n    inputs: {after: a}\n";
    let m = s.write("p.yaml", v1);
    run_ok(&["run", "--plain", m.to_str().unwrap()]);
    let old = outputs(&m);
    let m = s.write("p.yaml", &v1.replace("seed: 1", "seed: 2"));
    run_ok(&["run", "--plain", m.to_str().unwrap()]);
    let new = outputs(&m);
    assert_ne!(old["a.data"], new["a.data"]);

    let dry = run_ok(&[
        "gc",
        "--dry-run",
        "--keep-runs",
        "1",
        "--manifest",
        m.to_str().unwrap(),
    ]);
    let text = String::from_utf8_lossy(&dry.stdout);
    assert!(
        text.contains("would drop 1 runs, 2 actions, 2 artifacts, 2 chunks"),
        "{text}"
    );
    // A dry run changed nothing: the old artifact is still there.
    run_ok(&[
        "inspect",
        "--manifest",
        m.to_str().unwrap(),
        &old["a.data"][..16],
    ]);

    let real = run_ok(&["gc", "--keep-runs", "1", "--manifest", m.to_str().unwrap()]);
    assert!(
        String::from_utf8_lossy(&real.stdout).contains("dropped 1 runs, 2 actions, 2 artifacts")
    );
    let gone = bin()
        .args([
            "inspect",
            "--manifest",
            m.to_str().unwrap(),
            &old["a.data"][..16],
        ])
        .output()
        .unwrap();
    assert!(!gone.status.success());
    run_ok(&["verify", "--manifest", m.to_str().unwrap()]);
    let again = json(&run_ok(&["run", "--json", "--plain", m.to_str().unwrap()]));
    assert_eq!(
        again["executed"].as_array().unwrap().len(),
        0,
        "kept run still fully cached"
    );
}
