//! The ML subcommands (`models`, `corrupt`, `data fetch`, `bench train`) against the built
//! binary. Tests that need the real data in ../shared/data say so and skip when it is absent.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

const SHARED_DATA: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../shared/data");

fn deeprepair(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_deeprepair"))
        .args(args)
        .env_remove("DEEPREPAIR_STORE")
        .output()
        .expect("running the deeprepair binary")
}

/// `deeprepair corrupt --corruption C --severity S IN OUT`.
fn corrupt(corruption: &str, severity: &str, input: &Path, output: &Path) -> Output {
    deeprepair(&[
        "corrupt",
        "--corruption",
        corruption,
        "--severity",
        severity,
        input.to_str().unwrap(),
        output.to_str().unwrap(),
    ])
}

fn text(o: &Output) -> (String, String) {
    (
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

fn shared(rel: &str) -> Option<PathBuf> {
    let p = Path::new(SHARED_DATA).join(rel);
    if p.exists() {
        Some(p)
    } else {
        if std::env::var_os("DEEPREPAIR_REQUIRE_DATA").is_some() {
            panic!(
                "{} is absent, and DEEPREPAIR_REQUIRE_DATA is set: the real data must be there",
                p.display()
            );
        }
        eprintln!("skipping: {} is absent", p.display());
        None
    }
}

#[test]
fn models_lists_every_architecture_with_params() {
    let o = deeprepair(&["models"]);
    let (out, err) = text(&o);
    assert!(o.status.success(), "{err}");
    let wrn = out
        .lines()
        .find(|l| l.split_whitespace().next() == Some("wrn-40-2"))
        .unwrap_or_else(|| panic!("no wrn-40-2 row in:\n{out}"));
    assert!(wrn.contains("2,243,546"), "{wrn}");
    for name in ["tiny-cnn", "allconv", "densenet", "densenet-bc-100-12"] {
        assert!(
            out.lines()
                .any(|l| l.split_whitespace().next() == Some(name)),
            "{name} missing:\n{out}"
        );
    }
}

#[test]
fn corrupt_one_image() {
    let Some(input) = shared("cifar10-jpeg/test/cat/0000.jpg") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let out_png = dir.path().join("fog.png");
    let o = corrupt("fog", "3", &input, &out_png);
    let (_, err) = text(&o);
    assert!(o.status.success(), "{err}");
    let png = std::fs::read(&out_png).unwrap();
    assert!(png.starts_with(b"\x89PNG"));
    let (pixels, w, h) = deeprepair_data::decode_image(&png).unwrap();
    assert_eq!((w, h), (32, 32));
    let (clean, _, _) = deeprepair_data::decode_image(&std::fs::read(&input).unwrap()).unwrap();
    assert_ne!(pixels, clean, "the corrupted image equals the input");
}

#[test]
fn corrupt_unknown_name_is_a_usage_error() {
    let dir = tempfile::tempdir().unwrap();
    let o = deeprepair(&[
        "corrupt",
        "--corruption",
        "fogg",
        "--severity",
        "1",
        "in.png",
        dir.path().join("out.png").to_str().unwrap(),
    ]);
    let (_, err) = text(&o);
    assert_eq!(o.status.code(), Some(2), "{err}");
    assert!(err.contains("'fog'"), "{err}");
    assert!(err.contains("jpeg_compression"), "{err}");
}

#[test]
fn corrupt_missing_input_is_a_usage_error() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("nope.jpg");
    let o = deeprepair(&[
        "corrupt",
        "--corruption",
        "snow",
        "--severity",
        "2",
        missing.to_str().unwrap(),
        dir.path().join("out.png").to_str().unwrap(),
    ]);
    let (_, err) = text(&o);
    assert_eq!(o.status.code(), Some(2), "{err}");
    assert!(err.contains("nope.jpg"), "{err}");
}

#[test]
fn corrupt_contact_sheet() {
    let Some(data) = shared("cifar10-lossless-subset") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let sheet = dir.path().join("sheet.png");
    let o = deeprepair(&[
        "corrupt",
        "--sheet",
        sheet.to_str().unwrap(),
        "--data",
        data.to_str().unwrap(),
        "--index",
        "3",
    ]);
    let (_, err) = text(&o);
    assert!(o.status.success(), "{err}");
    assert!(err.contains("frost row skipped"), "{err}");
    let (_, w, h) = deeprepair_data::decode_image(&std::fs::read(&sheet).unwrap()).unwrap();
    // 6 columns and 14 rows of 128-pixel cells, plus gaps and labels.
    assert!(w > 6 * 128 && h > 14 * 128, "{w}x{h}");
}

/// A gzipped tar holding `cifar-10-batches-bin/` with all six `.bin` files, two records each.
fn tiny_cifar_tarball(path: &Path) {
    let gz = flate2::write::GzEncoder::new(
        std::fs::File::create(path).unwrap(),
        flate2::Compression::fast(),
    );
    let mut tar = tar::Builder::new(gz);
    let names = [
        "data_batch_1.bin",
        "data_batch_2.bin",
        "data_batch_3.bin",
        "data_batch_4.bin",
        "data_batch_5.bin",
        "test_batch.bin",
    ];
    for (i, name) in names.iter().enumerate() {
        let mut bytes = Vec::new();
        for r in 0..2u8 {
            bytes.push((i as u8 + r) % 10);
            bytes.extend((0..3072).map(|p| (p % 251) as u8 ^ r));
        }
        let mut header = tar::Header::new_gnu();
        header.set_size(bytes.len() as u64);
        header.set_mode(0o644);
        header.set_cksum();
        tar.append_data(
            &mut header,
            format!("cifar-10-batches-bin/{name}"),
            bytes.as_slice(),
        )
        .unwrap();
    }
    tar.into_inner().unwrap().finish().unwrap().flush().unwrap();
}

#[test]
fn data_fetch_from_a_file_url() {
    let dir = tempfile::tempdir().unwrap();
    let tarball = dir.path().join("cifar-10-binary.tar.gz");
    tiny_cifar_tarball(&tarball);
    let url = format!("file://{}", tarball.display());

    let dest = dir.path().join("data");
    let o = deeprepair(&[
        "data",
        "fetch",
        "cifar10",
        "--url",
        &url,
        "--dest",
        dest.to_str().unwrap(),
        "--no-progress",
    ]);
    let (out, err) = text(&o);
    assert!(o.status.success(), "{err}");
    let bins = PathBuf::from(out.trim());
    assert_eq!(bins, dest.join("cifar-10-batches-bin"));
    assert_eq!(
        std::fs::metadata(bins.join("test_batch.bin"))
            .unwrap()
            .len(),
        2 * 3073
    );

    let wrong = "0".repeat(64);
    let o = deeprepair(&[
        "data",
        "fetch",
        "cifar10",
        "--url",
        &url,
        "--dest",
        dir.path().join("other").to_str().unwrap(),
        "--sha256",
        &wrong,
        "--no-progress",
    ]);
    let (_, err) = text(&o);
    assert!(!o.status.success());
    assert!(err.contains(&wrong), "{err}");
    let got = err
        .split("got ")
        .nth(1)
        .unwrap_or_else(|| panic!("no actual digest in: {err}"));
    assert!(
        got.len() >= 64 && got[..64].bytes().all(|b| b.is_ascii_hexdigit()),
        "{err}"
    );

    let o = deeprepair(&["data", "fetch", "cifar10", "--url", &url, "--sha256", "abc"]);
    let (_, err) = text(&o);
    assert_eq!(o.status.code(), Some(2), "{err}");
    assert!(err.contains("--sha256"), "{err}");
}

#[test]
fn bench_train_prints_a_table() {
    let o = deeprepair(&["bench", "train", "--steps", "1", "--batch", "8"]);
    let (out, err) = text(&o);
    assert!(o.status.success(), "{err}");
    assert!(
        out.contains("train img/s") && out.contains("eval img/s"),
        "{out}"
    );
    let row = out
        .lines()
        .find(|l| l.starts_with("tiny-cnn"))
        .unwrap_or_else(|| panic!("no tiny-cnn row:\n{out}"));
    let cols: Vec<&str> = row.split_whitespace().collect();
    assert_eq!(cols[1], "8", "{row}");
    assert_eq!(cols[2], "false", "{row}");
    assert!(cols[4].parse::<f64>().unwrap() > 0.0, "{row}");
    // GPU utilization and memory columns: nothing to sample on the CPU.
    assert!(out.contains("GPU util") && out.contains("GPU MiB"), "{out}");
    assert_eq!(cols[cols.len() - 2..], ["-/-", "-"], "{row}");

    // The loop rows with two data-parallel ranks and synchronized BatchNorm.
    let o = deeprepair(&[
        "bench",
        "train",
        "--steps",
        "1",
        "--batch",
        "8",
        "--prefetch",
        "0",
        "--ranks",
        "2",
        "--sync-bn",
    ]);
    let (out, err) = text(&o);
    assert!(o.status.success(), "{err}");
    let loop_row = out
        .lines()
        .find(|l| l.contains("crop+flip"))
        .unwrap_or_else(|| panic!("no loop row:\n{out}"));
    let cols: Vec<&str> = loop_row.split_whitespace().collect();
    assert_eq!(cols[cols.len() - 3], "2+sync", "{loop_row}");
    assert!(cols[4].parse::<f64>().unwrap() > 0.0, "{loop_row}");
}

#[test]
fn report_rejects_a_bad_run_id() {
    let dir = tempfile::tempdir().unwrap();
    let o = deeprepair(&[
        "report",
        "yesterday",
        "--out",
        dir.path().join("r").to_str().unwrap(),
        "--store",
        dir.path().join("store.redb").to_str().unwrap(),
    ]);
    let (_, err) = text(&o);
    assert_eq!(o.status.code(), Some(2), "{err}");
    assert!(err.contains("latest"), "{err}");
}

#[test]
fn report_unpacks_the_report_artifact_of_a_run() {
    use deeprepair_pipeline::store::{RunState, StageRunRecord, StageState};
    use deeprepair_pipeline::{Artifact, ArtifactHeader, ArtifactKind, Digest, Store};

    let dir = tempfile::tempdir().unwrap();
    let store_path = dir.path().join("store.redb");
    let mut tar = tar::Builder::new(Vec::new());
    for (name, body) in [("report.md", "# Report\n"), ("table2.csv", "a,b\n1,2\n")] {
        let mut header = tar::Header::new_gnu();
        header.set_size(body.len() as u64);
        header.set_mode(0o644);
        header.set_cksum();
        tar.append_data(&mut header, name, body.as_bytes()).unwrap();
    }
    let bytes = tar.into_inner().unwrap();
    {
        let store = Store::open_writer(&store_path).unwrap();
        let report = Artifact {
            header: ArtifactHeader::new(ArtifactKind::Report, "application/x-tar", "tar"),
            bytes,
        };
        let digest = store.put_artifacts(&[report]).unwrap()[0];
        let mut stage = StageRunRecord::pending("report", "report");
        stage.state = StageState::Succeeded;
        stage.outputs.insert("report".into(), digest);
        let mut run = store
            .begin_run("m.yaml", Digest::of(b"m"), &[stage])
            .unwrap();
        run.state = RunState::Succeeded;
        run.ended_ms = Some(run.started_ms);
        store.update_run(&run).unwrap();
    }
    for which in ["latest", "1"] {
        let out = dir.path().join(format!("out-{which}"));
        let o = deeprepair(&[
            "report",
            which,
            "--out",
            out.to_str().unwrap(),
            "--store",
            store_path.to_str().unwrap(),
        ]);
        let (stdout, err) = text(&o);
        assert!(o.status.success(), "{err}");
        assert_eq!(
            std::fs::read_to_string(out.join("report.md")).unwrap(),
            "# Report\n"
        );
        assert!(out.join("table2.csv").is_file());
        assert_eq!(stdout.lines().count(), 2, "{stdout}");
    }
    let o = deeprepair(&[
        "report",
        "7",
        "--out",
        dir.path().join("x").to_str().unwrap(),
        "--store",
        store_path.to_str().unwrap(),
    ]);
    let (_, err) = text(&o);
    assert!(!o.status.success());
    assert!(err.contains("no run 7"), "{err}");
}

#[test]
fn import_model_stores_a_pytorch_checkpoint_and_names_every_misfit() {
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("store.redb");
    let file = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/stages/nn/tests/fixtures/tiny_cnn_torch.safetensors"
    );
    let ok = deeprepair(&[
        "import-model",
        "--arch",
        "tiny-cnn",
        file,
        "--store",
        store.to_str().unwrap(),
    ]);
    let (out, err) = text(&ok);
    assert!(ok.status.success(), "{err}");
    let digest = out.split_whitespace().next().unwrap();
    assert_eq!(digest.len(), 64, "{out}");
    // The stored model is listed as a model artifact.
    let ls = deeprepair(&["ls", "--store", store.to_str().unwrap()]);
    assert!(text(&ls).0.contains(&digest[..12]), "{}", text(&ls).0);

    let bad = deeprepair(&[
        "import-model",
        "--arch",
        "wrn-40-2",
        file,
        "--store",
        store.to_str().unwrap(),
    ]);
    let (_, err) = text(&bad);
    assert_eq!(bad.status.code(), Some(2), "{err}");
    assert!(
        err.contains("do not fit wrn-40-2")
            && err.contains("tiny_cnn_torch.safetensors")
            && err.contains("missing")
            && err.contains("conv1.weight"),
        "{err}"
    );
    assert!(
        err.contains("unexpected"),
        "extra tensors are listed too: {err}"
    );
}

/// The fixture's tensors with `edit` applied, written as safetensors to `path`.
fn edited_weights(
    path: &Path,
    edit: impl Fn(&str, safetensors::Dtype, Vec<u8>) -> (safetensors::Dtype, Vec<u8>),
) {
    let bytes = std::fs::read(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/stages/nn/tests/fixtures/tiny_cnn_torch.safetensors"
    ))
    .unwrap();
    let tensors = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let edited: Vec<(String, safetensors::Dtype, Vec<usize>, Vec<u8>)> = tensors
        .tensors()
        .into_iter()
        .map(|(name, view)| {
            let (dtype, data) = edit(&name, view.dtype(), view.data().to_vec());
            (name, dtype, view.shape().to_vec(), data)
        })
        .collect();
    let views: Vec<(String, safetensors::tensor::TensorView)> = edited
        .iter()
        .map(|(n, d, s, b)| {
            (
                n.clone(),
                safetensors::tensor::TensorView::new(*d, s.clone(), b).unwrap(),
            )
        })
        .collect();
    std::fs::write(path, safetensors::serialize(views, None).unwrap()).unwrap();
}

fn f32s(bytes: &[u8]) -> Vec<f32> {
    bytes
        .chunks(4)
        .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
        .collect()
}

fn f32_bytes(values: &[f32]) -> Vec<u8> {
    values.iter().flat_map(|v| v.to_le_bytes()).collect()
}

#[test]
fn import_model_refuses_suspect_weights_naming_each_tensor() {
    use safetensors::Dtype;
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("store.redb");
    let import = |file: &Path| {
        let o = deeprepair(&[
            "import-model",
            "--arch",
            "tiny-cnn",
            file.to_str().unwrap(),
            "--store",
            store.to_str().unwrap(),
        ]);
        (o.status.code(), text(&o).1)
    };
    let refused = |file: &Path, expected: &[&str]| {
        let (code, err) = import(file);
        assert_eq!(code, Some(2), "{err}");
        for e in expected {
            assert!(err.contains(e), "expected {e:?} in: {err}");
        }
    };

    // Integer weights: a cast would invent a model.
    let ints = dir.path().join("ints.safetensors");
    edited_weights(&ints, |name, dtype, data| {
        if name == "features.conv1.weight" {
            let ints: Vec<u8> = f32s(&data)
                .iter()
                .flat_map(|v| (*v as i64).to_le_bytes())
                .collect();
            (Dtype::I64, ints)
        } else {
            (dtype, data)
        }
    });
    refused(&ints, &["dtype", "conv1.weight", "I64"]);

    // NaN and Inf, and a negative running variance.
    let bad_values = dir.path().join("nan.safetensors");
    edited_weights(&bad_values, |name, dtype, data| {
        if dtype != Dtype::F32 {
            return (dtype, data);
        }
        let mut v = f32s(&data);
        if name == "features.conv1.weight" {
            v[0] = f32::NAN;
            v[1] = f32::INFINITY;
        }
        if name.ends_with("running_var") {
            v[0] = -1.0;
        }
        (dtype, f32_bytes(&v))
    });
    refused(
        &bad_values,
        &[
            "conv1.weight: 2 NaN or infinite",
            "running_var: 1 negative variance",
        ],
    );

    // A tensor listed twice in the header (the parser would keep one silently).
    let fixture = std::fs::read(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/stages/nn/tests/fixtures/tiny_cnn_torch.safetensors"
    ))
    .unwrap();
    let header_len = u64::from_le_bytes(fixture[..8].try_into().unwrap()) as usize;
    let header = std::str::from_utf8(&fixture[8..8 + header_len]).unwrap();
    let first = header
        .find("\"features.conv1.weight\"")
        .expect("conv1.weight in the header");
    let entry_end = first + header[first..].find('}').unwrap() + 1;
    let twice = format!("{{{},{}", &header[first..entry_end], &header[1..]);
    let mut duplicated = (twice.len() as u64).to_le_bytes().to_vec();
    duplicated.extend_from_slice(twice.as_bytes());
    duplicated.extend_from_slice(&fixture[8 + header_len..]);
    let dup = dir.path().join("dup.safetensors");
    std::fs::write(&dup, duplicated).unwrap();
    refused(
        &dup,
        &["dup.safetensors", "'features.conv1.weight' is listed twice"],
    );

    // Truncated: the byte counts are named; nothing is said twice.
    let short = dir.path().join("short.safetensors");
    std::fs::write(&short, &fixture[..100]).unwrap();
    let (code, err) = import(&short);
    assert_eq!(code, Some(2), "{err}");
    assert!(
        err.contains("short.safetensors") && err.contains("92"),
        "{err}"
    );

    // f64 weights are harmless: converted, imported.
    let doubles = dir.path().join("f64.safetensors");
    edited_weights(&doubles, |_, dtype, data| {
        if dtype != Dtype::F32 {
            return (dtype, data);
        }
        (
            Dtype::F64,
            f32s(&data)
                .iter()
                .flat_map(|v| (*v as f64).to_le_bytes())
                .collect(),
        )
    });
    let (code, err) = import(&doubles);
    assert_eq!(code, Some(0), "{err}");
}

#[test]
fn import_model_flags_are_checked_as_flags_and_class_names_are_taken_literally() {
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("store.redb");
    let file = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/stages/nn/tests/fixtures/tiny_cnn_torch.safetensors"
    );
    let run = |args: &[&str]| {
        let mut all = vec!["import-model", file, "--store", store.to_str().unwrap()];
        all.extend_from_slice(args);
        let o = deeprepair(&all);
        (o.status.code(), text(&o).0, text(&o).1)
    };
    let (code, _, err) = run(&["--arch", "nope"]);
    assert_eq!(code, Some(2), "{err}");
    assert!(
        err.contains("--arch nope: expected one of tiny-cnn"),
        "{err}"
    );
    assert!(
        !err.contains(".yaml"),
        "no generated file in the message: {err}"
    );

    let ten = |tenth: &str| {
        let mut c: Vec<String> = (0..9).map(|i| format!("c{i}")).collect();
        c.push(tenth.into());
        c.join(",")
    };
    let (code, _, err) = run(&["--arch", "tiny-cnn", "--classes", &ten("c3")]);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("'c3' is given twice"), "{err}");

    // A class named like a variable, or like YAML, stays what it is.
    let (code, out, err) = run(&["--arch", "tiny-cnn", "--classes", &ten("${model}")]);
    assert_eq!(code, Some(0), "{err}");
    let digest = out.split_whitespace().next().unwrap();
    let inspect = deeprepair(&["inspect", &digest[..12], "--store", store.to_str().unwrap()]);
    let (shown, err) = text(&inspect);
    assert!(inspect.status.success(), "{err}");
    assert!(shown.contains("${model}"), "{shown}");
    assert!(
        !shown.contains("tiny_cnn_torch.safetensors\", \"c"),
        "{shown}"
    );
}

/// `stylize` with the wavelet transfer: a cat in the style of its own Gaussian-noise version
/// gains high-frequency energy; a different-size reference, a missing file and WCT2 without
/// weights are usage errors naming what is wrong.
#[test]
fn stylize_carries_the_reference_style_and_refuses_bad_input() {
    let Some(cat) = shared("cifar10-jpeg/test/cat/0000.jpg") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let noisy = dir.path().join("noisy.png");
    let o = corrupt("gaussian_noise", "5", &cat, &noisy);
    assert!(o.status.success(), "{}", text(&o).1);
    let out = dir.path().join("stylized.png");
    let o = deeprepair(&[
        "stylize",
        cat.to_str().unwrap(),
        noisy.to_str().unwrap(),
        out.to_str().unwrap(),
    ]);
    let (stdout, err) = text(&o);
    assert!(o.status.success(), "{err}");
    assert!(stdout.contains("stylized.png"), "{stdout}");
    let decode = |p: &Path| deeprepair_data::decode_image(&std::fs::read(p).unwrap()).unwrap();
    let (content, w, h) = decode(&cat);
    let (stylized, sw, sh) = decode(&out);
    assert_eq!((sw, sh), (w, h));
    // Mean absolute difference between horizontal neighbours: noise raises it.
    let roughness = |px: &[u8]| -> f64 {
        let mut total = 0.0;
        for y in 0..h {
            for x in 1..w {
                for c in 0..3 {
                    let a = px[(y * w + x) * 3 + c] as f64;
                    let b = px[(y * w + x - 1) * 3 + c] as f64;
                    total += (a - b).abs();
                }
            }
        }
        total / (h * (w - 1) * 3) as f64
    };
    assert!(
        roughness(&stylized) > 1.5 * roughness(&content),
        "stylized {} vs content {}",
        roughness(&stylized),
        roughness(&content)
    );
    // alpha 0 returns the content.
    let same = dir.path().join("same.png");
    let o = deeprepair(&[
        "stylize",
        "--alpha",
        "0",
        cat.to_str().unwrap(),
        noisy.to_str().unwrap(),
        same.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", text(&o).1);
    assert_eq!(decode(&same).0, content);

    let sheet = dir.path().join("sheet.png");
    let Some(data) = shared("cifar10-jpeg") else {
        return;
    };
    let o = deeprepair(&[
        "corrupt",
        "--sheet",
        sheet.to_str().unwrap(),
        "--data",
        data.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", text(&o).1);
    let bad = [
        (
            vec![cat.to_str().unwrap(), sheet.to_str().unwrap()],
            "is 32×32 and the reference",
        ),
        (vec![cat.to_str().unwrap(), "nope.png"], "nope.png"),
        (
            vec![
                "--style",
                "wct2",
                cat.to_str().unwrap(),
                noisy.to_str().unwrap(),
            ],
            "--weights",
        ),
        (
            vec![
                "--alpha",
                "1.5",
                cat.to_str().unwrap(),
                noisy.to_str().unwrap(),
            ],
            "--alpha",
        ),
    ];
    for (args, expected) in bad {
        let mut all = vec!["stylize"];
        all.extend(args);
        all.push(out.to_str().unwrap());
        let o = deeprepair(&all);
        let (_, err) = text(&o);
        assert_eq!(o.status.code(), Some(2), "{all:?}: {err}");
        assert!(err.contains(expected), "{all:?}: {err}");
    }
}

/// `stylize --style wct2` loads the official checkpoint names from --weights and names every
/// misfit tensor with its file (fixtures: partial checkpoints in both PyTorch file formats).
#[test]
fn stylize_wct2_names_every_misfit_tensor_of_the_checkpoints() {
    let dir = tempfile::tempdir().unwrap();
    let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("stages/nn/tests/fixtures");
    let weights = dir.path().join("wct2");
    std::fs::create_dir(&weights).unwrap();
    let img = dir.path().join("img.png");
    let pixels: Vec<u8> = (0..32 * 32 * 3).map(|i| (i % 256) as u8).collect();
    std::fs::write(&img, deeprepair_data::encode_png(&pixels, 32, 32).unwrap()).unwrap();
    let out = dir.path().join("out.png");
    let stylize = || {
        deeprepair(&[
            "stylize",
            "--style",
            "wct2",
            "--weights",
            weights.to_str().unwrap(),
            img.to_str().unwrap(),
            img.to_str().unwrap(),
            out.to_str().unwrap(),
        ])
    };
    let o = stylize();
    let (_, err) = text(&o);
    assert!(!o.status.success());
    assert!(
        err.contains("wave_encoder_cat5_l4.pth") && err.contains("wave_decoder_cat5_l4.pth"),
        "{err}"
    );
    std::fs::copy(
        fixtures.join("wct2_encoder_partial_legacy.pth"),
        weights.join("wave_encoder_cat5_l4.pth"),
    )
    .unwrap();
    std::fs::copy(
        fixtures.join("wct2_decoder_partial_zip.pth"),
        weights.join("wave_decoder_cat5_l4.pth"),
    )
    .unwrap();
    let o = stylize();
    let (_, err) = text(&o);
    assert!(!o.status.success());
    for expected in [
        "conv1_1.weight",
        "extra.weight",
        "conv1_1.bias",
        "wave_decoder_cat5_l4.pth",
    ] {
        assert!(err.contains(expected), "{expected} not named: {err}");
    }
    assert!(!out.exists(), "no output on failure");
}

/// Image outputs are PNG files: a folder or a `.jpg` name is a usage error that leaves nothing
/// behind (no `OUT.partial`, no PNG bytes under a JPEG name); `--var` without `=` is one too.
#[test]
fn bad_output_paths_and_vars_are_usage_errors() {
    let Some(cat) = shared("cifar10-jpeg/test/cat/0000.jpg") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let folder = dir.path().join("out.png");
    std::fs::create_dir(&folder).unwrap();
    let jpg = dir.path().join("out.jpg");
    for (out, expected) in [(&folder, "is a folder"), (&jpg, "ending in .png")] {
        let o = corrupt("fog", "2", &cat, out);
        let (_, err) = text(&o);
        assert_eq!(o.status.code(), Some(2), "{err}");
        assert!(err.contains(expected), "{err}");
    }
    let left: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    assert_eq!(
        left,
        ["out.png"],
        "nothing written beside the refused outputs"
    );
    assert!(std::fs::read_dir(&folder).unwrap().next().is_none());

    let o = deeprepair(&["plan", "manifests/smoke.yaml", "--var", "noequals"]);
    let (_, err) = text(&o);
    assert_eq!(o.status.code(), Some(2), "{err}");
    assert!(err.contains("expected NAME=VALUE"), "{err}");
}
