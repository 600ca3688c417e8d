//! A damaged store (#14, cases 2 and 3): random bursts written over every page of a real store.
//! No command panics; `verify` reports every damage that another command runs into; `verify
//! --repair` then `run` gives the outputs of an undamaged run.

mod common;
use common::*;
use rand::{Rng, SeedableRng};
use std::path::Path;
use std::process::Output;

const PIPELINE: &str = r#"
grid:
  seed: [1, 2, 3]
stages:
  source:
    kind: util.text
    params: {text: "damage test"}
  train:
    kind: util.work
    over: [seed]
    inputs: {after: source}
    params: {steps: 4, step_ms: 1, checkpoint_every: 2, size: 30000}
  report:
    kind: util.concat
    inputs: {parts: {from: train, all: true}}
"#;

/// redb's page size: one burst per page reaches every header, branch, leaf and free page.
const PAGE: usize = 4096;

fn deeprepair(args: &[&str]) -> Output {
    bin().args(args).output().expect("spawn deeprepair")
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Exits 0 or with a message; never a panic (101) or an abort.
fn assert_no_crash(what: &str, offset: usize, out: &Output) -> bool {
    let all = text(out);
    assert!(
        out.status
            .code()
            .is_some_and(|c| c == 0 || c == 1 || c == 2)
            && !all.contains("panicked"),
        "{what} on a store damaged at {offset} crashed ({:?}):\n{all}",
        out.status
    );
    if !out.status.success() {
        assert!(
            all.contains("damaged") || all.contains("corrupt") || all.contains("unreadable"),
            "{what} failed at {offset} without saying the store is damaged:\n{all}"
        );
    }
    out.status.success()
}

fn damage(clean: &[u8], offset: usize, rng: &mut impl Rng, store: &Path) {
    let mut bytes = clean.to_vec();
    let len = rng.random_range(1..=64);
    for b in bytes.iter_mut().skip(offset).take(len) {
        *b ^= rng.random_range(1..=255u8);
    }
    std::fs::write(store, bytes).unwrap();
}

#[test]
fn every_command_survives_damage_on_every_page_and_repair_then_run_restores_the_outputs() {
    let s = Scratch::new();
    let m = s.write("p.yaml", PIPELINE);
    let manifest = m.to_str().unwrap();
    run_ok(&["run", "--plain", manifest]);
    let expected = outputs(&m);
    let store = s.store();
    let store_arg = store.to_str().unwrap().to_string();
    let clean = std::fs::read(&store).unwrap();
    let mut rng = rand::rngs::StdRng::seed_from_u64(14);
    let (mut damaged_somewhere, mut repaired) = (0, 0);

    for page in 0..clean.len().div_ceil(PAGE) {
        let offset = page * PAGE + rng.random_range(0..PAGE.min(clean.len() - page * PAGE));
        // Each command on its own copy of the same damage: verify and run may write.
        let mut works = vec![];
        for cmd in [
            vec!["ls", "--store", &store_arg],
            vec!["status", "--store", &store_arg],
            vec!["run", "--plain", manifest],
        ] {
            damage(
                &clean,
                offset,
                &mut rand::rngs::StdRng::seed_from_u64(offset as u64),
                &store,
            );
            works.push(assert_no_crash(cmd[0], offset, &deeprepair(&cmd)));
        }
        damage(
            &clean,
            offset,
            &mut rand::rngs::StdRng::seed_from_u64(offset as u64),
            &store,
        );
        let verify = deeprepair(&["verify", "--store", &store_arg]);
        let verified = assert_no_crash("verify", offset, &verify);
        assert!(
            !verified || works.iter().all(|w| *w),
            "verify said ok at {offset} but another command failed ({works:?}):\n{}",
            text(&verify)
        );
        if verified {
            continue;
        }
        damaged_somewhere += 1;
        // Salvage, then run: the lost stages are recomputed to the same bytes.
        for stale in std::fs::read_dir(store.parent().unwrap()).unwrap() {
            let stale = stale.unwrap().path();
            if stale != store {
                std::fs::remove_file(stale).unwrap();
            }
        }
        let repair = deeprepair(&["verify", "--store", &store_arg, "--repair"]);
        assert!(
            repair.status.success(),
            "verify --repair failed at {offset}:\n{}",
            text(&repair)
        );
        assert!(
            text(&repair).contains("damaged file is kept at"),
            "{}",
            text(&repair)
        );
        run_ok(&["run", "--plain", manifest]);
        assert_eq!(outputs(&m), expected, "outputs after repair at {offset}");
        run_ok(&["verify", "--store", &store_arg]);
        repaired += 1;
    }
    eprintln!(
        "{damaged_somewhere} of {} bursts hit live data; all repaired",
        clean.len().div_ceil(PAGE)
    );
    assert!(
        damaged_somewhere >= 5,
        "the bursts must reach live pages ({damaged_somewhere} did)"
    );
    assert_eq!(repaired, damaged_somewhere);
}

#[test]
fn records_that_do_not_decode_are_named_and_repair_then_run_restores_the_outputs() {
    let s = Scratch::new();
    let m = s.write("p.yaml", PIPELINE);
    let manifest = m.to_str().unwrap();
    run_ok(&["run", "--plain", manifest]);
    let expected = outputs(&m);
    let store = s.store();
    let store_arg = store.to_str().unwrap();
    // A control character inside the JSON of the records naming a stage (the "control
    // character found while parsing a string" that `ls` used to print with no record named).
    // Every copy: some lie on free pages (redb copies on write), which no command reads.
    let mut bytes = std::fs::read(&store).unwrap();
    let needle = b"\"stage\":\"";
    let hits: Vec<usize> = (0..bytes.len() - needle.len())
        .filter(|&i| &bytes[i..i + needle.len()] == needle)
        .collect();
    assert!(!hits.is_empty(), "records with a stage name");
    for at in hits {
        bytes[at + needle.len()] = 0x01;
    }
    std::fs::write(&store, &bytes).unwrap();

    let verify = deeprepair(&["verify", "--store", store_arg]);
    assert!(!verify.status.success());
    let report = text(&verify);
    assert!(report.contains("is unreadable"), "{report}");
    assert!(
        report.contains("action ")
            || report.contains("stage record")
            || report.contains("run record"),
        "the record is named: {report}"
    );
    let repair = deeprepair(&["verify", "--store", store_arg, "--repair"]);
    assert!(repair.status.success(), "{}", text(&repair));
    run_ok(&["verify", "--store", store_arg]);
    run_ok(&["run", "--plain", manifest]);
    assert_eq!(outputs(&m), expected);
}

#[test]
fn verify_on_a_sound_store_says_ok_and_repair_leaves_it_alone() {
    let s = Scratch::new();
    let m = s.write("p.yaml", PIPELINE);
    run_ok(&["run", "--plain", m.to_str().unwrap()]);
    let store = s.store();
    let before = std::fs::read(&store).unwrap();
    let out = run_ok(&["verify", "--store", store.to_str().unwrap(), "--repair"]);
    assert!(text(&out).starts_with("ok:"), "{}", text(&out));
    assert_eq!(
        std::fs::read_dir(store.parent().unwrap()).unwrap().count(),
        1,
        "no salvage file, no damaged copy"
    );
    assert_eq!(std::fs::read(&store).unwrap().len(), before.len());
}
