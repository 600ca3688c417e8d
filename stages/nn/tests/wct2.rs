//! WCT2 (src/wct2.rs) against its PyTorch twin, and the checkpoint loader.
//!
//! `fixtures/wct2_reference.json` holds the twin's transfer outputs (float64) for weights made
//! by a rule on both sides (see `fixtures/wct2_twin.py` for the rule and the inputs), and
//! `fixtures/wct2_encoder_partial_legacy.pth` / `wct2_decoder_partial_zip.pth` a few tensors,
//! some wrong, saved by PyTorch in its legacy (the official checkpoints') and zip formats.
//! Regenerate them all, from the repository root (PyTorch from PyPI, a few minutes):
//!
//! ```text
//! python3 -m venv /tmp/torchvenv && /tmp/torchvenv/bin/pip install torch numpy
//! /tmp/torchvenv/bin/python stages/nn/tests/fixtures/wct2_twin.py
//! ```

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use deeprepair_nn::wct2::{feature_wct, read_pth, Wct2, Wct2LoadError, DECODER_FILE, ENCODER_FILE};
use deeprepair_nn::TensorProblem;
use serde_json::Value;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

/// Our float64 run against the float64 twin.
const TOL: f64 = 1e-4;
/// Our float32 run (as the official code and `Wct2::load`) against the float64 twin. The
/// transfer amplifies rounding (whitening divides by the square roots of small covariance
/// eigenvalues): the twin itself run in float32 differs from its float64 run by 2.1e-4 (2.6e-4
/// with the WCT in float64, as ours), outputs spanning ±2.4.
const F32_TOL: f64 = 1e-3;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

fn reference() -> Value {
    let text = std::fs::read_to_string(fixtures().join("wct2_reference.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

/// The 2×2 Haar filter of a band (`LL`, `LH`, `HL`, `HH`), as the official `get_wav` makes it.
fn haar(band: &str) -> [f32; 4] {
    let s = std::f64::consts::FRAC_1_SQRT_2;
    let low = [s, s];
    let high = [-s, s];
    let rows = if band.starts_with('L') { low } else { high };
    let cols = if band.ends_with('L') { low } else { high };
    [
        (rows[0] * cols[0]) as f32,
        (rows[0] * cols[1]) as f32,
        (rows[1] * cols[0]) as f32,
        (rows[1] * cols[1]) as f32,
    ]
}

/// The rule of `wct2_twin.py` for one state_dict: `(name, shape, values)` sorted by name.
// 0.7071 is a literal of the rule, not 1/sqrt(2).
#[allow(clippy::approx_constant)]
fn rule_weights(
    expected: &[(String, Vec<usize>)],
    encoder: bool,
) -> Vec<(String, Vec<usize>, Vec<f32>)> {
    let mut expected = expected.to_vec();
    expected.sort_by(|a, b| a.0.cmp(&b.0));
    expected
        .into_iter()
        .enumerate()
        .map(|(t, (name, shape))| {
            let n: usize = shape.iter().product();
            let band = name.rsplit('.').nth(1).unwrap_or("");
            let values: Vec<f32> = if ["LL", "LH", "HL", "HH"].contains(&band) {
                let f = haar(band);
                (0..n).map(|i| f[i % 4]).collect()
            } else {
                let gain = if encoder && name == "conv0.weight" {
                    100.0
                } else {
                    1.0
                };
                let fan_in: usize = shape[1..].iter().product();
                (0..n)
                    .map(|i| {
                        let u = ((i as f64 + 1.0) * 0.7071 + (t as f64 + 1.0) * 1.618).sin();
                        let v = if name.ends_with(".weight") {
                            gain * 2.0 * u / (fan_in as f64).sqrt()
                        } else {
                            0.1 * u
                        };
                        v as f32
                    })
                    .collect()
            };
            (name, shape, values)
        })
        .collect()
}

fn to_map(weights: &[(String, Vec<usize>, Vec<f32>)], dtype: DType) -> HashMap<String, Tensor> {
    weights
        .iter()
        .map(|(name, shape, values)| {
            let t = Tensor::from_slice(values, shape.as_slice(), &Device::Cpu).unwrap();
            let t = t.to_dtype(dtype).unwrap();
            (name.clone(), t)
        })
        .collect()
}

/// The rule's model in `dtype` (the f32 weights, widened for f64).
fn rule_model(dtype: DType) -> Wct2 {
    let (enc, dec) = Wct2::expected_tensors();
    let enc = VarBuilder::from_tensors(
        to_map(&rule_weights(&enc, true), dtype),
        dtype,
        &Device::Cpu,
    );
    let dec = VarBuilder::from_tensors(
        to_map(&rule_weights(&dec, false), dtype),
        dtype,
        &Device::Cpu,
    );
    Wct2::from_varbuilders(enc, dec).unwrap()
}

/// The twin's inputs: `[1, 3, 32, 32]`, element i (row-major).
fn image(f: impl Fn(f64) -> f64) -> Tensor {
    let data: Vec<f32> = (0..3 * 32 * 32).map(|i| f(i as f64) as f32).collect();
    Tensor::from_vec(data, (1, 3, 32, 32), &Device::Cpu).unwrap()
}

fn content() -> Tensor {
    image(|i| 0.5 + 0.4 * (0.37 * i + 0.5).sin())
}

fn style() -> Tensor {
    image(|i| 0.5 + 0.45 * (0.113 * i + 1.3).sin() * (0.0271 * i).cos())
}

fn max_abs_diff(ours: &Tensor, theirs: &Value) -> f64 {
    let ours: Vec<f64> = ours
        .to_dtype(DType::F64)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    let theirs = theirs.as_array().unwrap();
    assert_eq!(ours.len(), theirs.len());
    ours.iter()
        .zip(theirs)
        .map(|(a, b)| (a - b.as_f64().unwrap()).abs())
        .fold(0., f64::max)
}

#[test]
fn transfer_matches_the_pytorch_twin() {
    let reference = reference();
    let (content, style) = (content(), style());
    for (dtype, tol) in [(DType::F64, TOL), (DType::F32, F32_TOL)] {
        let model = rule_model(dtype);
        for (alpha, key) in [(1.0, "alpha_1"), (0.5, "alpha_0.5"), (0.0, "alpha_0")] {
            let start = Instant::now();
            let out = model.transfer(&content, &style, alpha).unwrap();
            let elapsed = start.elapsed();
            assert_eq!(out.dims(), [1, 3, 32, 32]);
            assert_eq!(out.dtype(), dtype);
            let d = max_abs_diff(&out, &reference[key]);
            println!(
                "{dtype:?} alpha {alpha}: max |ours - twin| = {d:.3e}, {elapsed:.2?} per 32×32 transfer"
            );
            assert!(
                d <= tol,
                "{dtype:?} alpha {alpha}: max abs diff {d} to the twin"
            );
        }
    }
    // The transfer does something: at alpha 1 the output is far from the plain
    // encode/decode (alpha 0), so returning the content features would not match the twin.
    let far: f64 = {
        let r = &reference;
        let a: Vec<f64> = r["alpha_1"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_f64().unwrap())
            .collect();
        let b: Vec<f64> = r["alpha_0"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_f64().unwrap())
            .collect();
        a.iter()
            .zip(&b)
            .map(|(x, y)| (x - y).abs())
            .fold(0., f64::max)
    };
    assert!(far > 0.5, "alpha 1 and alpha 0 differ by only {far}");
}

/// Features as `[1, C, H, W]` from a formula of (channel, pixel).
fn feature(c: usize, h: usize, w: usize, f: impl Fn(usize, usize) -> f64) -> Tensor {
    let data: Vec<f64> = (0..c * h * w)
        .map(|i| f(i / (h * w), i % (h * w)))
        .collect();
    Tensor::from_vec(data, (1, c, h, w), &Device::Cpu).unwrap()
}

/// Channel means and covariance (÷ N − 1) of `[1, C, H, W]`.
fn moments(x: &Tensor) -> (Vec<f64>, Vec<Vec<f64>>) {
    let x: Vec<Vec<f64>> = x
        .squeeze(0)
        .unwrap()
        .flatten_from(1)
        .unwrap()
        .to_vec2()
        .unwrap();
    let n = x[0].len() as f64;
    let means: Vec<f64> = x.iter().map(|r| r.iter().sum::<f64>() / n).collect();
    let cov = (0..x.len())
        .map(|a| {
            (0..x.len())
                .map(|b| {
                    x[a].iter()
                        .zip(&x[b])
                        .map(|(p, q)| (p - means[a]) * (q - means[b]))
                        .sum::<f64>()
                        / (n - 1.0)
                })
                .collect()
        })
        .collect();
    (means, cov)
}

#[test]
fn wct_gives_the_content_the_style_statistics() {
    // Large features (variances ≫ the identity WCT adds), 6 channels, more pixels than
    // channels; content spread wider than the result so the clamp stays idle.
    let content = feature(6, 8, 8, |c, i| {
        900.0 * ((0.37 + 0.11 * c as f64) * i as f64 + c as f64).sin() + 40.0 * c as f64
    });
    let style = feature(6, 10, 10, |c, i| {
        let mix = (0.21 * i as f64 + 0.5).sin();
        60.0 * ((0.29 + 0.07 * c as f64) * i as f64 + 2.0 * c as f64).cos()
            + 30.0 * mix
            + 15.0 * c as f64
            - 20.0
    });
    let out = feature_wct(&content, &style, 1.0).unwrap();
    assert_eq!(out.dims(), content.dims());
    let (mo, co) = moments(&out);
    let (ms, cs) = moments(&style);
    let (mc, _) = moments(&content);
    for c in 0..6 {
        assert!(
            (mo[c] - ms[c]).abs() < 1e-6,
            "channel {c}: mean {} vs style {}",
            mo[c],
            ms[c]
        );
        assert!(
            (mc[c] - ms[c]).abs() > 10.0,
            "test data: content mean already the style's"
        );
    }
    // cov(out) = (Cs + I)^½·Cc(Cc + I)⁻¹·(Cs + I)^½ ≈ Cs + I when Cc ≫ I.
    let scale = cs.iter().flatten().fold(0f64, |m, v| m.max(v.abs()));
    for a in 0..6 {
        for b in 0..6 {
            let want = cs[a][b] + if a == b { 1.0 } else { 0.0 };
            assert!(
                (co[a][b] - want).abs() < 1e-3 * scale,
                "cov[{a}][{b}] {} vs style {want}",
                co[a][b]
            );
        }
    }
    // alpha blends with the content features.
    let zero = feature_wct(&content, &style, 0.0).unwrap();
    assert_eq!(
        zero.to_dtype(DType::F32)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap(),
        content
            .to_dtype(DType::F32)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap()
    );
    let half = feature_wct(&content, &style, 0.5).unwrap();
    let mid = ((&out + &content).unwrap() * 0.5).unwrap();
    let d = (half - mid)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f64>()
        .unwrap();
    assert!(d < 1e-9, "alpha 0.5 is not the midpoint ({d})");
}

#[test]
fn stylize_u8_rounds_the_transfer_and_checks_sizes() {
    let model = rule_model(DType::F32);
    let to_u8 = |t: &Tensor| -> Vec<u8> {
        let v: Vec<f32> = t
            .squeeze(0)
            .unwrap()
            .permute((1, 2, 0))
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        v.iter().map(|x| (x * 255.0).round() as u8).collect()
    };
    let (c, s) = (to_u8(&content()), to_u8(&style()));
    let out = model.stylize_u8(&c, &s, 32, 32, 1.0).unwrap();
    // Same as transfer on the quantized inputs, clamped and rounded.
    let from_u8 = |v: &[u8]| {
        let f: Vec<f32> = v.iter().map(|&b| b as f32 / 255.0).collect();
        Tensor::from_vec(f, (32, 32, 3), &Device::Cpu)
            .unwrap()
            .permute((2, 0, 1))
            .unwrap()
            .unsqueeze(0)
            .unwrap()
    };
    let t = model.transfer(&from_u8(&c), &from_u8(&s), 1.0).unwrap();
    let want: Vec<u8> = t
        .squeeze(0)
        .unwrap()
        .permute((1, 2, 0))
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap()
        .iter()
        .map(|x| (x.clamp(0.0, 1.0) * 255.0 + 0.5).floor() as u8)
        .collect();
    assert_eq!(out.len(), 32 * 32 * 3);
    let worst = out
        .iter()
        .zip(&want)
        .map(|(a, b)| a.abs_diff(*b))
        .max()
        .unwrap();
    assert!(worst <= 1, "stylize_u8 differs from transfer by {worst}");
    assert!(out.iter().zip(&c).any(|(a, b)| a != b));

    let err = model
        .stylize_u8(&c[..24 * 20 * 3], &s[..24 * 20 * 3], 24, 20, 1.0)
        .unwrap_err();
    assert!(err.to_string().contains("multiples of 8"), "{err}");
    let err = model.stylize_u8(&c, &s, 32, 31, 1.0).unwrap_err();
    assert!(err.to_string().contains("bytes"), "{err}");
    let small = Tensor::zeros((1, 3, 8, 8), DType::F32, &Device::Cpu).unwrap();
    let err = model.transfer(&small, &small, 1.0).unwrap_err();
    assert!(err.to_string().contains("at least 16"), "{err}");
}

fn values(t: &Tensor) -> Vec<f32> {
    t.to_dtype(DType::F32)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap()
}

fn rule_of(weights: &[(String, Vec<usize>, Vec<f32>)], name: &str) -> Vec<f32> {
    weights.iter().find(|w| w.0 == name).unwrap().2.clone()
}

#[test]
fn reads_pytorch_files_in_both_formats_following_strides() {
    let (enc, dec) = Wct2::expected_tensors();
    let (enc_rule, dec_rule) = (rule_weights(&enc, true), rule_weights(&dec, false));

    // Legacy format (PyTorch < 1.6, as the official checkpoints).
    let t = read_pth(&fixtures().join("wct2_encoder_partial_legacy.pth")).unwrap();
    let mut names: Vec<_> = t.keys().cloned().collect();
    names.sort();
    assert_eq!(
        names,
        [
            "conv0.bias",
            "conv0.weight",
            "conv1_1.weight",
            "extra.weight",
            "pool1.LL.weight"
        ]
    );
    // Stored transposed: strides (1, 3, ·, ·).
    assert_eq!(
        values(&t["conv0.weight"]),
        rule_of(&enc_rule, "conv0.weight")
    );
    assert_eq!(values(&t["conv0.bias"]), rule_of(&enc_rule, "conv0.bias"));
    // Expanded over the channels (stride 0), as the official get_wav leaves it.
    assert_eq!(t["pool1.LL.weight"].dims(), [64, 1, 2, 2]);
    assert_eq!(values(&t["pool1.LL.weight"]), vec![0.5; 256]);
    assert_eq!(t["conv1_1.weight"].dims(), [64, 3, 1, 1]);

    // Zip format.
    let t = read_pth(&fixtures().join("wct2_decoder_partial_zip.pth")).unwrap();
    assert_eq!(
        values(&t["conv1_1.weight"]),
        rule_of(&dec_rule, "conv1_1.weight")
    );
    assert_eq!(t["conv2_1.bias"].dtype(), DType::F64);
    assert_eq!(
        values(&t["conv2_1.bias"]),
        rule_of(&dec_rule, "conv2_1.bias")
    );
    let hh: Vec<f32> = haar("HH").repeat(64);
    assert_eq!(values(&t["recon_block1.HH.weight"]), hh);
    assert_eq!(t["conv1_1.bias"].dims(), [4]);
}

#[test]
fn load_names_every_missing_and_misshaped_tensor_and_missing_files() {
    let dir = tempfile::tempdir().unwrap();
    let err = Wct2::load(dir.path(), &Device::Cpu).err().unwrap();
    let (enc_path, dec_path) = (dir.path().join(ENCODER_FILE), dir.path().join(DECODER_FILE));
    match &err {
        Wct2LoadError::MissingFiles(paths) => {
            assert_eq!(paths, &[enc_path.clone(), dec_path.clone()])
        }
        other => panic!("{other}"),
    }
    assert!(err.to_string().contains(&enc_path.display().to_string()));

    std::fs::copy(
        fixtures().join("wct2_encoder_partial_legacy.pth"),
        &enc_path,
    )
    .unwrap();
    match Wct2::load(dir.path(), &Device::Cpu).err().unwrap() {
        Wct2LoadError::MissingFiles(paths) => assert_eq!(paths, std::slice::from_ref(&dec_path)),
        other => panic!("{other}"),
    }

    std::fs::copy(fixtures().join("wct2_decoder_partial_zip.pth"), &dec_path).unwrap();
    let err = Wct2::load(dir.path(), &Device::Cpu).err().unwrap();
    let message = err.to_string();
    let Wct2LoadError::Mismatch { problems } = err else {
        panic!("{message}")
    };
    let (enc, dec) = Wct2::expected_tensors();
    let has = |path: &Path, p: TensorProblem| problems.contains(&(path.to_path_buf(), p));
    assert!(has(
        &enc_path,
        TensorProblem::Shape {
            name: "conv1_1.weight".into(),
            expected: vec![64, 3, 3, 3],
            found: vec![64, 3, 1, 1]
        }
    ));
    assert!(has(
        &enc_path,
        TensorProblem::Unexpected {
            name: "extra.weight".into(),
            found: vec![2]
        }
    ));
    assert!(has(
        &dec_path,
        TensorProblem::Shape {
            name: "conv1_1.bias".into(),
            expected: vec![3],
            found: vec![4]
        }
    ));
    // Everything absent is named, in both files.
    for (path, expected, present) in [
        (
            &enc_path,
            &enc,
            &[
                "conv0.weight",
                "conv0.bias",
                "pool1.LL.weight",
                "conv1_1.weight",
            ][..],
        ),
        (
            &dec_path,
            &dec,
            &[
                "conv1_1.weight",
                "conv1_1.bias",
                "recon_block1.HH.weight",
                "conv2_1.bias",
            ][..],
        ),
    ] {
        for (name, shape) in expected.iter() {
            if !present.contains(&name.as_str()) {
                assert!(
                    has(
                        path,
                        TensorProblem::Missing {
                            name: name.clone(),
                            expected: shape.clone()
                        }
                    ),
                    "{name} not reported missing"
                );
            }
        }
    }
    // 32 encoder tensors less 3 good ones, plus 1 unexpected; 30 decoder tensors less 3 good.
    assert_eq!(problems.len(), (32 - 3 + 1) + (30 - 3), "{message}");
    assert!(message.contains(&format!(
        "{}: shape      conv1_1.weight: expected [64, 3, 3, 3], found [64, 3, 1, 1]",
        enc_path.display()
    )));
    assert!(message.contains(&format!(
        "{}: missing    conv4_1.weight: expected [256, 512, 3, 3]",
        dec_path.display()
    )));

    // A file that is no checkpoint is named.
    std::fs::write(&dec_path, b"not a checkpoint").unwrap();
    let err = Wct2::load(dir.path(), &Device::Cpu).err().unwrap();
    assert!(
        matches!(err, Wct2LoadError::Read { ref path, .. } if path == &dec_path),
        "{err}"
    );
    assert!(
        err.to_string().contains(&dec_path.display().to_string()),
        "{err}"
    );
}

/// Writes `tensors` as PyTorch's legacy `torch.save` does (f32, contiguous).
fn write_legacy_pth(path: &Path, tensors: &[(String, Vec<usize>, Vec<f32>)]) {
    fn unicode(out: &mut Vec<u8>, s: &str) {
        out.push(b'X');
        out.extend((s.len() as u32).to_le_bytes());
        out.extend(s.as_bytes());
    }
    fn int(out: &mut Vec<u8>, v: usize) {
        out.push(b'J');
        out.extend((v as i32).to_le_bytes());
    }
    let mut out = vec![
        0x80, 0x02, 0x8a, 0x0a, 0x6c, 0xfc, 0x9c, 0x46, 0xf9, 0x20, 0x6a, 0xa8, 0x50, 0x19, b'.',
    ];
    out.extend([0x80, 0x02, b'M', 0xe9, 0x03, b'.']); // protocol version 1001
    out.extend([0x80, 0x02, b'}', b'.']); // system info
    out.extend([0x80, 0x02]);
    out.extend(b"ccollections\nOrderedDict\n)R");
    for (key, (name, shape, values)) in tensors.iter().enumerate() {
        unicode(&mut out, name);
        out.extend(b"ctorch._utils\n_rebuild_tensor_v2\n((");
        unicode(&mut out, "storage");
        out.extend(b"ctorch\nFloatStorage\n");
        unicode(&mut out, &key.to_string());
        unicode(&mut out, "cpu");
        int(&mut out, values.len());
        out.extend(b"NtQ");
        int(&mut out, 0);
        out.push(b'(');
        for &d in shape {
            int(&mut out, d);
        }
        out.extend(b"t(");
        for k in 0..shape.len() {
            int(&mut out, shape[k + 1..].iter().product());
        }
        out.extend(b"t\x89ccollections\nOrderedDict\n)RtRs");
    }
    out.push(b'.');
    out.extend([0x80, 0x02, b']', b'(']);
    for key in 0..tensors.len() {
        unicode(&mut out, &key.to_string());
    }
    out.extend(b"e.");
    for (_, _, values) in tensors {
        out.extend((values.len() as i64).to_le_bytes());
        for v in values {
            out.extend(v.to_le_bytes());
        }
    }
    std::fs::write(path, out).unwrap();
}

#[test]
fn loads_full_checkpoints_and_matches_the_twin() {
    let dir = tempfile::tempdir().unwrap();
    let (enc, dec) = Wct2::expected_tensors();
    write_legacy_pth(&dir.path().join(ENCODER_FILE), &rule_weights(&enc, true));
    write_legacy_pth(&dir.path().join(DECODER_FILE), &rule_weights(&dec, false));
    let model = Wct2::load(dir.path(), &Device::Cpu).unwrap();
    let out = model.transfer(&content(), &style(), 1.0).unwrap();
    assert_eq!(out.dtype(), DType::F32);
    let d = max_abs_diff(&out, &reference()["alpha_1"]);
    assert!(d <= F32_TOL, "loaded model: max abs diff {d} to the twin");
    // The same weights as built in memory: the same output, bit for bit.
    let built = rule_model(DType::F32)
        .transfer(&content(), &style(), 1.0)
        .unwrap();
    assert_eq!(values(&out), values(&built));
}
