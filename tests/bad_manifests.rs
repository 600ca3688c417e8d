//! Every bad manifest gives a clear error naming file:line:column and what was expected, a
//! non-zero exit (2), and never a panic.

mod common;
use common::*;

/// (name, manifest text, expected line, expected column or 0 for "any", message fragments)
const CASES: &[(&str, &str, u64, u64, &[&str])] = &[
    (
        "bad time limit",
        "stages:\n  a:\n    kind: util.work\n    resources: {time: \"1:2:3:4\"}\n",
        4,
        23,
        &["time '1:2:3:4'", "Slurm time limit"],
    ),
    (
        "resources for an unknown kind",
        "resources:\n  util.wrk: {time: \"10\"}\nstages:\n  a:\n    kind: util.work\n",
        2,
        13,
        &["resources for unknown stage kind 'util.wrk'", "did you mean 'util.work'?"],
    ),
    (
        "sbatch arg a resources key says",
        "stages:\n  a:\n    kind: util.work\n    resources:\n      sbatch_args: [\"--nice=3\", \"--time=5\"]\n",
        5,
        33,
        &["--time is not allowed here", "`time`"],
    ),
    (
        "sbatch arg deeprepair sets",
        "stages:\n  a:\n    kind: util.work\n    resources: {sbatch_args: [\"--wrap=x\"]}\n",
        4,
        31,
        &["--wrap is not allowed here", "deeprepair sets it"],
    ),
    (
        "not an sbatch option",
        "stages:\n  a:\n    kind: util.work\n    resources: {sbatch_args: [\"-t 5\"]}\n",
        4,
        31,
        &["expected a long sbatch option"],
    ),
    (
        "nodes that ranks do not fill",
        "stages:\n  a:\n    kind: util.work\n    resources: {nodes: 2}\n",
        4,
        24,
        &["runs 1 rank(s), which cannot spread evenly over 2 nodes"],
    ),
    (
        "partition with a space",
        "stages:\n  a:\n    kind: util.work\n    resources: {partition: \"gpu nodes\"}\n",
        4,
        28,
        &["partition 'gpu nodes'", "expected a Slurm name"],
    ),
    (
        "gpu type with a count",
        "stages:\n  a:\n    kind: util.work\n    resources: {gpu_type: \"a100:2\"}\n",
        4,
        27,
        &["gpu_type 'a100:2'", "the count is `gpus`"],
    ),
    (
        "syntax error",
        "stages:\n  a:\n    kind: util.text\n    params: {text: \"x\"\n",
        4,
        13,
        &["unclosed bracket"],
    ),
    (
        "unknown top-level key",
        "stagez:\n  a:\n    kind: util.text\n",
        1,
        1,
        &["stagez"],
    ),
    (
        "unknown stage key",
        "stages:\n  a:\n    kind: util.text\n    parms: {text: x}\n",
        4,
        5,
        &["parms"],
    ),
    (
        "wrong type",
        "stages:\n  a:\n    kind: util.work\n    params: {steps: many}\n",
        4,
        21,
        &["param 'steps'", "expected an integer", "\"many\""],
    ),
    (
        "unknown kind",
        "stages:\n  a:\n    kind: util.txt\n",
        3,
        11,
        &["unknown stage kind 'util.txt'", "did you mean 'util.text'?"],
    ),
    (
        "unknown param",
        "stages:\n  a:\n    kind: util.work\n    params:\n      stepz: 3\n",
        5,
        14,
        &["unknown param 'stepz'", "did you mean 'steps'?"],
    ),
    (
        "missing required param",
        "stages:\n  a:\n    kind: util.text\n",
        3,
        0,
        &["needs param 'text'"],
    ),
    (
        "cycle",
        "stages:\n  a:\n    kind: util.concat\n    inputs: {parts: b}\n  b:\n    kind: util.concat\n    inputs: {parts: a}\n",
        0,
        0,
        &["cycle"],
    ),
    (
        "missing input stage",
        "stages:\n  a:\n    kind: util.concat\n    inputs: {parts: nothere}\n",
        4,
        21,
        &["unknown stage 'nothere'"],
    ),
    (
        "missing required input",
        "stages:\n  a:\n    kind: util.concat\n",
        3,
        0,
        &["missing required input 'parts'"],
    ),
    (
        "unknown input name",
        "stages:\n  s:\n    kind: util.text\n    params: {text: x}\n  a:\n    kind: util.concat\n    inputs: {part: s}\n",
        7,
        20,
        &["has no input 'part'", "did you mean 'parts'?"],
    ),
    (
        "unknown grid axis",
        "grid:\n  seed: [1]\nstages:\n  a:\n    kind: util.work\n    over: [sed]\n",
        6,
        12,
        &["unknown grid axis 'sed'", "did you mean 'seed'?"],
    ),
    (
        "axis that is not a param",
        "grid:\n  colour: [red]\nstages:\n  a:\n    kind: util.work\n    over: [colour]\n",
        6,
        12,
        &["'colour' is not a param"],
    ),
    (
        "ambiguous single input",
        "grid:\n  seed: [1, 2]\nstages:\n  w:\n    kind: util.work\n    over: [seed]\n  t:\n    kind: util.work\n    inputs: {after: w}\n    params: {fail: true}\n  ok:\n    kind: util.text\n    params: {text: x}\n",
        9,
        21,
        &["matches 2 instances of 'w'", "{from: w, all: true}"],
    ),
    (
        "negative value a kind rejects",
        "stages:\n  a:\n    kind: util.work\n    params: {steps: -3}\n",
        4,
        21,
        &["param 'steps'", "must not be negative"],
    ),
    (
        "empty grid axis",
        "grid:\n  seed: []\nstages:\n  a:\n    kind: util.work\n    over: [seed]\n",
        2,
        0,
        &["has no values"],
    ),
    (
        "duplicate grid value",
        "grid:\n  seed: [0, 1, 0]\nstages:\n  a:\n    kind: util.work\n    over: [seed]\n",
        2,
        16,
        &["grid axis 'seed' lists 0 twice"],
    ),
    (
        "axis twice in over",
        "grid:\n  seed: [0, 1]\nstages:\n  a:\n    kind: util.work\n    over: [seed, seed]\n",
        6,
        18,
        &["lists grid axis 'seed' twice"],
    ),
    (
        "override for an unknown stage",
        "grid:\n  seed: [0, 1]\nstages:\n  a:\n    kind: util.work\n    over: [seed]\noverrides:\n  - stage: b\n    params: {steps: 2}\n",
        8,
        12,
        &["override for unknown stage 'b'"],
    ),
    (
        "override when on an unknown axis",
        "grid:\n  seed: [0, 1]\nstages:\n  a:\n    kind: util.work\n    over: [seed]\noverrides:\n  - when: {sed: 1}\n    params: {steps: 2}\n",
        8,
        17,
        &["unknown grid axis 'sed'", "did you mean 'seed'?"],
    ),
    (
        "override setting a grid axis",
        "grid:\n  seed: [0, 1]\nstages:\n  a:\n    kind: util.work\n    over: [seed]\noverrides:\n  - stage: a\n    params: {seed: 5}\n",
        9,
        20,
        &["override sets param 'seed'", "its values come from the grid"],
    ),
    (
        "variable naming a variable",
        "vars:\n  a: x\n  b: \"${a}/y\"\nstages:\n  s:\n    kind: util.text\n    params: {text: \"${b}\"}\n",
        3,
        6,
        &["variable 'b' refers to another variable"],
    ),
    (
        "a grid too large to plan",
        "grid:\n  steps: [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10]\n  step_ms: [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10]\n  seed: [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10]\n  checkpoint_every: [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10]\n  size: [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10]\n  fail_attempts: [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10]\nstages:\n  w:\n    kind: util.work\n    over: [steps, step_ms, seed, checkpoint_every, size, fail_attempts]\n",
        10,
        0,
        &["would make 1.772e6 stages", "at most 1000000"],
    ),
    (
        "a huge util.work output",
        "stages:\n  w:\n    kind: util.work\n    params: {size: 99999999999}\n",
        4,
        0,
        &["param 'size'", "at most 1073741824"],
    ),
    (
        "empty stage name",
        "stages:\n  \"\":\n    kind: util.text\n    params: {text: x}\n",
        3,
        5,
        &["a stage needs a name"],
    ),
    (
        "a custom YAML tag on a value",
        "stages:\n  a:\n    kind: util.text\n    params: {text: !secret x}\n",
        4,
        0,
        &["YAML tag", "!secret", "not part of the manifest schema"],
    ),
    (
        "a custom YAML tag on a key",
        "stages:\n  a:\n    !opt kind: util.text\n    params: {text: x}\n",
        3,
        0,
        &["YAML tag", "!opt"],
    ),
];

#[test]
fn nesting_too_deep_is_said_in_words() {
    let s = Scratch::new();
    let deep = format!(
        "stages:\n  a:\n    kind: util.text\n    params: {{text: {}x{}}}\n",
        "[".repeat(100),
        "]".repeat(100)
    );
    let m = s.write("deep.yaml", &deep);
    let out = bin().args(["plan", m.to_str().unwrap()]).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("levels deep"), "{err}");
    assert!(!err.contains("Depth {"), "no Debug form: {err}");
}

#[test]
fn an_unreadable_manifest_has_no_line_zero_and_a_long_line_is_not_echoed_whole() {
    let s = Scratch::new();
    let out = bin()
        .args(["plan", s.path().to_str().unwrap()])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("cannot read manifest"), "{err}");
    assert!(!err.contains(":0:0"), "{err}");

    // One line of 1 MB with a mistake near its end.
    let long = format!(
        "{{stages: {{a: {{kind: util.text, params: {{text: \"{}\", txet: 1}}}}}}}}\n",
        "y".repeat(1 << 20)
    );
    let m = s.write("long.yaml", &long);
    let out = bin().args(["plan", m.to_str().unwrap()]).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        out.status.code(),
        Some(2),
        "{}",
        &err[..err.len().min(2000)]
    );
    assert!(err.len() < 2000, "stderr is {} bytes", err.len());
    assert!(err.contains("txet") && err.contains('…'), "{err}");
}

#[test]
fn bad_manifests_give_located_errors() {
    let s = Scratch::new();
    let mut failures = vec![];
    for (name, text, line, col, fragments) in CASES {
        let m = s.write("bad.yaml", text);
        let out = bin().args(["plan", m.to_str().unwrap()]).output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr).to_string();
        if out.status.code() != Some(2) {
            failures.push(format!(
                "{name}: exit {:?}, stderr {err}",
                out.status.code()
            ));
            continue;
        }
        if err.contains("panicked") {
            failures.push(format!("{name}: panicked: {err}"));
        }
        let want = if *line == 0 {
            format!("{}:", m.display())
        } else if *col == 0 {
            format!("{}:{line}:", m.display())
        } else {
            format!("{}:{line}:{col}:", m.display())
        };
        if !err.contains(&want) {
            failures.push(format!("{name}: expected location '{want}' in: {err}"));
        }
        for f in *fragments {
            if !err.contains(f) {
                failures.push(format!("{name}: expected '{f}' in: {err}"));
            }
        }
    }
    assert!(failures.is_empty(), "\n{}", failures.join("\n---\n"));
}

#[test]
fn a_missing_manifest_file_is_named() {
    let out = bin()
        .args(["plan", "/nonexistent/x.yaml"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("/nonexistent/x.yaml") && err.contains("cannot read manifest"),
        "{err}"
    );
}
