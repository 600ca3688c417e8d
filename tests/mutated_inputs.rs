//! A seeded mutator over everything a user hands us (#14, "make it stay fixed"): manifests,
//! .npy and CIFAR-10 binary files, safetensors weights and dataset artifacts, each mutated a few
//! hundred times (bytes flipped, ranges cut or repeated, YAML-meaningful text inserted). Every
//! mutant either works or is refused with an error naming its file; nothing panics. Sampled
//! manifests also go through the real binary: exit 0 or 2 with a located message.
//! Deterministic (fixed seeds) and bounded (a few seconds); `fuzz/` holds the open-ended
//! cargo-fuzz targets for the same inputs.

mod common;
use common::*;
use deeprepair_pipeline::manifest::Source;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::collections::BTreeMap;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};

/// Text a YAML mistake is made of.
const SNIPPETS: &[&str] = &[
    ":",
    " ",
    "\n",
    "- ",
    "{",
    "}",
    "[",
    "]",
    "\"",
    "'",
    "${",
    "${x}",
    "!tag ",
    "&a ",
    "*a",
    "<<: *a\n",
    "99999999999999999999",
    "-1",
    "0.5",
    "null",
    "~",
    "true",
    "#",
    "\t",
    "é",
    "\u{0}",
    "over: [seed]\n",
    "inputs: {x: y}\n",
    "kind: util.work\n",
];

/// One random edit of `bytes`.
fn mutate(bytes: &[u8], rng: &mut StdRng) -> Vec<u8> {
    let mut out = bytes.to_vec();
    let len = out.len().max(1);
    match rng.random_range(0..6) {
        0 => {
            let at = rng.random_range(0..len).min(out.len().saturating_sub(1));
            if let Some(b) = out.get_mut(at) {
                *b ^= 1 << rng.random_range(0..8);
            }
        }
        1 => {
            let at = rng.random_range(0..len);
            let n = rng.random_range(1..=len.min(64));
            out.drain(at.min(out.len())..(at + n).min(out.len()));
        }
        2 => {
            let at = rng.random_range(0..=out.len());
            let s = SNIPPETS[rng.random_range(0..SNIPPETS.len())];
            out.splice(at..at, s.bytes());
        }
        3 => {
            let at = rng.random_range(0..len).min(out.len());
            let n = rng.random_range(1..=len.min(200));
            let piece: Vec<u8> = out[at..(at + n).min(out.len())].to_vec();
            out.splice(at..at, piece);
        }
        4 => out.truncate(rng.random_range(0..len)),
        _ => {
            let at = rng.random_range(0..len).min(out.len().saturating_sub(1));
            if let Some(b) = out.get_mut(at) {
                *b = rng.random();
            }
        }
    }
    out
}

/// Runs `f`, failing the test with `what` if it panics.
fn no_panic<T>(what: &str, f: impl FnOnce() -> T) -> T {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(v) => v,
        Err(_) => panic!("{what} panicked"),
    }
}

fn repo(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(path)
}

#[test]
fn mutated_manifests_plan_or_give_located_errors() {
    let mut registry = deeprepair_pipeline::Registry::new();
    deeprepair_pipeline::builtin::register(&mut registry);
    deeprepair_stages::register(&mut registry);
    let seeds = [
        "manifests/smoke.yaml",
        "manifests/fidelity-cpu.yaml",
        "manifests/paper-cifar10.yaml",
    ];
    let s = Scratch::new();
    let mut rng = StdRng::seed_from_u64(14);
    let (mut planned, mut refused, mut through_binary) = (0, 0, 0);
    for seed in seeds {
        let original = std::fs::read(repo(seed)).unwrap();
        for i in 0..60 {
            let mut bytes = original.clone();
            for _ in 0..rng.random_range(1..=3) {
                bytes = mutate(&bytes, &mut rng);
            }
            let text = String::from_utf8_lossy(&bytes).to_string();
            let path = s.path().join("mutant.yaml");
            let source = Source {
                path: path.clone(),
                text: text.clone(),
            };
            let what = format!("planning mutant {i} of {seed}");
            match no_panic(&what, || {
                deeprepair_pipeline::plan::plan_source(&source, &registry, &BTreeMap::new())
            }) {
                Ok(_) => planned += 1,
                Err(e) => {
                    refused += 1;
                    let shown = e.to_string();
                    assert!(
                        shown.starts_with(&format!("{}:", path.display())) && !e.message.is_empty(),
                        "{what}: error not located: {shown}"
                    );
                }
            }
            if i % 20 == 0 {
                // The binary: exit 0 or 2, the file named, never a panic.
                std::fs::write(&path, &text).unwrap();
                let out = bin()
                    .args(["plan", path.to_str().unwrap()])
                    .output()
                    .unwrap();
                let err = String::from_utf8_lossy(&out.stderr);
                match out.status.code() {
                    Some(0) => {}
                    Some(2) => assert!(err.contains("mutant.yaml"), "{what}: {err}"),
                    other => panic!("{what}: `plan` exited {other:?}: {err}"),
                }
                assert!(!err.contains("panicked"), "{what}: {err}");
                through_binary += 1;
            }
        }
    }
    eprintln!("{planned} mutants planned, {refused} refused, {through_binary} through the binary");
    assert!(refused > 100 && planned > 10, "mutants reach both outcomes");
}

#[test]
fn mutated_data_files_load_or_are_refused_naming_the_file() {
    let s = Scratch::new();
    let mut rng = StdRng::seed_from_u64(7);
    let n = 6;
    let images: Vec<u8> = (0..n * 3072).map(|i| (i * 31 % 251) as u8).collect();
    let labels: Vec<u8> = (0..n).map(|i| (i % 10) as u8).collect();

    // .npy (CIFAR-10-C layout): the image file's header and the labels file.
    let npy_dir = s.path().join("c");
    deeprepair_data::write_cifar_c_npy(&npy_dir, "fog", &images, n, &labels).unwrap();
    let fog = std::fs::read(npy_dir.join("fog.npy")).unwrap();
    let label_file = std::fs::read(npy_dir.join("labels.npy")).unwrap();
    for i in 0..200 {
        let (target, original) = if i % 2 == 0 {
            ("fog.npy", &fog)
        } else {
            ("labels.npy", &label_file)
        };
        // Mostly the header (the first 128 bytes), where the parser's decisions are.
        let mut bytes = original.clone();
        let header = bytes.len().min(128);
        let mut head = mutate(&bytes[..header], &mut rng);
        if i % 5 == 0 {
            head = mutate(&bytes, &mut rng);
            bytes.clear();
        } else {
            bytes.drain(..header);
        }
        head.extend_from_slice(&bytes);
        std::fs::write(npy_dir.join(target), &head).unwrap();
        let other = if target == "fog.npy" {
            "labels.npy"
        } else {
            "fog.npy"
        };
        let restore = if other == "fog.npy" {
            &fog
        } else {
            &label_file
        };
        std::fs::write(npy_dir.join(other), restore).unwrap();
        let result = no_panic(&format!("reading mutated {target} #{i}"), || {
            deeprepair_data::read_cifar_c_npy(&npy_dir, "fog")
        });
        if let Err(e) = result {
            let shown = e.to_string();
            assert!(
                shown.contains(".npy"),
                "{target} #{i}: file not named: {shown}"
            );
        }
    }

    // CIFAR-10 binary batches.
    let ds = deeprepair_data::Dataset {
        height: 32,
        width: 32,
        images: images.clone(),
        labels: labels.clone(),
        class_names: deeprepair_data::CIFAR10_CLASSES
            .iter()
            .map(|c| c.to_string())
            .collect(),
        source_ids: None,
    };
    let batch = deeprepair_data::to_cifar_binary(&ds).unwrap();
    let batch_path = s.path().join("test_batch.bin");
    for i in 0..200 {
        std::fs::write(&batch_path, mutate(&batch, &mut rng)).unwrap();
        let result = no_panic(&format!("reading mutated CIFAR batch #{i}"), || {
            deeprepair_data::load_cifar_binary_files(std::slice::from_ref(&batch_path))
        });
        if let Err(e) = result {
            let shown = e.to_string();
            assert!(
                shown.contains("test_batch.bin"),
                "#{i}: file not named: {shown}"
            );
        }
    }

    // Dataset artifacts (what crosses the wire and sits in the store).
    let frame = ds.to_bytes();
    for i in 0..300 {
        let bytes = mutate(&frame, &mut rng);
        let result = no_panic(&format!("decoding mutated dataset #{i}"), || {
            deeprepair_data::Dataset::from_bytes(&bytes)
        });
        if bytes != frame {
            assert!(
                result.is_err(),
                "#{i}: a changed dataset frame was accepted"
            );
        }
    }
}

#[test]
fn mutated_weights_files_load_or_are_refused_naming_the_file() {
    let fixture =
        std::fs::read(repo("stages/nn/tests/fixtures/tiny_cnn_torch.safetensors")).unwrap();
    let header_end = 8 + u64::from_le_bytes(fixture[..8].try_into().unwrap()) as usize;
    let mut rng = StdRng::seed_from_u64(3);
    let source = Path::new("user.safetensors");
    let mut refused = 0;
    for i in 0..300 {
        // The header, where names, dtypes, shapes and offsets are.
        let mut bytes = mutate(&fixture[..header_end], &mut rng);
        bytes.extend_from_slice(&fixture[header_end..]);
        let result = no_panic(&format!("loading mutated weights #{i}"), || {
            deeprepair_nn::load_weights_from_buffer(
                deeprepair_nn::Arch::TinyCnn,
                10,
                &bytes,
                source,
                &candle_core::Device::Cpu,
            )
            .map(|_| ())
            .map_err(|e| e.to_string())
        });
        if let Err(e) = result {
            refused += 1;
            let shown = e.to_string();
            assert!(
                shown.contains("user.safetensors"),
                "#{i}: file not named: {shown}"
            );
        }
    }
    assert!(refused > 100, "{refused} of 300 mutants refused");
}
