//! Forward passes against logits computed once with the PyTorch reference definitions
//! (AugMix's `allconv.py`, `densenet.py`, `wideresnet.py`, and a PyTorch twin of tiny-cnn),
//! PyTorch 2.15, float64, stored in `fixtures/reference_logits.json` (10 classes, batch 2).
//!
//! Weights are not stored (WRN-40-2 alone is ~9 MB): both sides generate them from one rule.
//! State-dict names (less `num_batches_tracked`) sorted bytewise get indices t = 0, 1, …; element
//! i (row-major) of tensor t is, with u = sin((i + 1)·0.7071 + (t + 1)·1.618) in f64:
//! running_var 1 + 0.5u; running_mean 0.1u; 2-D weight 0.5u/sqrt(in); ≥3-D weight
//! u/sqrt(fan_in); other 1-D `.weight` 1 + 0.2u; 1-D `.bias` 0.1u; then cast to f32.
//! The input is x[i] = sin(0.37 i + 0.5), shape [2, 3, 32, 32].
//! Train-mode fixtures (all but AllConvNet, whose dropout draws random masks) hold the logits
//! with batch statistics and one BatchNorm's running stats after that single step.
//! resnet18's fixture comes from a PyTorch ResNet-18 written with torchvision's layout and
//! names (torchvision itself was not installable here), eval mode only.
//! `fixtures/tiny_cnn_torch.safetensors` is tiny-cnn's state_dict as PyTorch saved it (with
//! `num_batches_tracked`), weights from the same rule.

use candle_core::{DType, Device, Tensor};
use candle_nn::VarMap;
use deeprepair_nn::{
    expected_tensors, load_weights, param_count, save_weights, Arch, LoadError, TensorProblem,
};
use serde_json::Value;
use std::collections::HashMap;
use std::path::{Path, PathBuf};

const TOL: f64 = 1e-4;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

fn reference() -> Value {
    let text = std::fs::read_to_string(fixtures().join("reference_logits.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

// 0.7071 is a literal of the rule, not 1/sqrt(2).
#[allow(clippy::approx_constant)]
fn rule_value(name: &str, t: usize, i: usize, shape: &[usize]) -> f32 {
    let u = ((i as f64 + 1.0) * 0.7071 + (t as f64 + 1.0) * 1.618).sin();
    let v = if name.ends_with("running_var") {
        1.0 + 0.5 * u
    } else if name.ends_with("running_mean") {
        0.1 * u
    } else if shape.len() == 2 {
        u * 0.5 * (1.0 / shape[1] as f64).sqrt()
    } else if shape.len() > 2 {
        u * (1.0 / shape[1..].iter().product::<usize>() as f64).sqrt()
    } else if name.ends_with(".weight") {
        1.0 + 0.2 * u
    } else {
        0.1 * u
    };
    v as f32
}

/// Writes the rule's weights for `arch` to `path`.
fn write_rule_weights(arch: Arch, num_classes: usize, path: &Path) {
    let mut expected = expected_tensors(arch, num_classes).unwrap();
    expected.sort_by(|a, b| a.0.cmp(&b.0));
    let mut tensors = HashMap::new();
    for (t, (name, shape)) in expected.iter().enumerate() {
        let n: usize = shape.iter().product();
        let data: Vec<f32> = (0..n).map(|i| rule_value(name, t, i, shape)).collect();
        tensors.insert(
            name.clone(),
            Tensor::from_vec(data, shape.as_slice(), &Device::Cpu).unwrap(),
        );
    }
    candle_core::safetensors::save(&tensors, path).unwrap();
}

fn input() -> Tensor {
    let data: Vec<f32> = (0..2 * 3 * 32 * 32)
        .map(|i| (i as f64 * 0.37 + 0.5).sin() as f32)
        .collect();
    Tensor::from_vec(data, (2, 3, 32, 32), &Device::Cpu).unwrap()
}

fn max_abs_diff(ours: &Tensor, theirs: &Value) -> f64 {
    let ours: Vec<Vec<f32>> = ours.to_vec2().unwrap();
    let theirs = theirs.as_array().unwrap();
    assert_eq!(ours.len(), theirs.len());
    let mut worst = 0f64;
    for (row, trow) in ours.iter().zip(theirs) {
        let trow = trow.as_array().unwrap();
        assert_eq!(row.len(), trow.len());
        for (a, b) in row.iter().zip(trow) {
            worst = worst.max((*a as f64 - b.as_f64().unwrap()).abs());
        }
    }
    worst
}

fn max_abs_diff_vec(ours: &Tensor, theirs: &Value) -> f64 {
    let ours: Vec<f32> = ours.to_vec1().unwrap();
    let theirs = theirs.as_array().unwrap();
    assert_eq!(ours.len(), theirs.len());
    ours.iter()
        .zip(theirs)
        .map(|(a, b)| (*a as f64 - b.as_f64().unwrap()).abs())
        .fold(0., f64::max)
}

fn var(varmap: &VarMap, name: &str) -> Tensor {
    varmap.data().lock().unwrap()[name].as_tensor().clone()
}

/// Loads `weights` for `arch`, checks eval logits, then (if the fixture has them) train-mode
/// logits and the running stats after that step.
fn check_against_reference(arch: Arch, weights: &Path) {
    let reference = reference();
    let entry = &reference["archs"][arch.name()];
    let nc = reference["num_classes"].as_u64().unwrap() as usize;
    assert_eq!(
        param_count(arch, nc) as u64,
        entry["params"].as_u64().unwrap(),
        "{}",
        arch.name()
    );

    let (varmap, model) = load_weights(arch, nc, weights, &Device::Cpu).unwrap();
    let x = input();
    let eval = model.forward_t(&x, false).unwrap();
    assert_eq!(eval.dims(), &[2, nc]);
    let err = max_abs_diff(&eval, &entry["eval_logits"]);
    println!("{}: eval max abs error {err:.3e}", arch.name());
    assert!(err <= TOL, "{}: eval logits off by {err}", arch.name());

    if let Some(train_logits) = entry.get("train_logits") {
        let train = model.forward_t(&x, true).unwrap();
        let err = max_abs_diff(&train, train_logits);
        println!("{}: train max abs error {err:.3e}", arch.name());
        assert!(err <= TOL, "{}: train logits off by {err}", arch.name());
        let bn = &entry["train_bn"];
        let bn_name = bn["name"].as_str().unwrap();
        for stat in ["running_mean", "running_var"] {
            let ours = var(&varmap, &format!("{bn_name}.{stat}"));
            let err = max_abs_diff_vec(&ours, &bn[stat]);
            assert!(err <= TOL, "{}: {bn_name}.{stat} off by {err}", arch.name());
        }
    }
}

fn check_rule(arch: Arch) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("w.safetensors");
    write_rule_weights(arch, 10, &path);
    check_against_reference(arch, &path);
}

#[test]
fn tiny_cnn_matches_pytorch() {
    check_rule(Arch::TinyCnn);
}

#[test]
fn tiny_cnn_loads_pytorch_state_dict_file() {
    // Written by safetensors.torch.save_file(model.state_dict()): has num_batches_tracked (i64).
    check_against_reference(
        Arch::TinyCnn,
        &fixtures().join("tiny_cnn_torch.safetensors"),
    );
}

#[test]
fn allconv_matches_pytorch() {
    check_rule(Arch::AllConvNet);
}

#[test]
fn densenet_40_12_matches_pytorch() {
    check_rule(Arch::DenseNet40_12);
}

#[test]
fn densenet_bc_100_12_matches_pytorch() {
    check_rule(Arch::DenseNetBc100_12);
}

#[test]
fn wrn_40_2_matches_pytorch() {
    check_rule(Arch::Wrn40_2);
}

/// candle-transformers' resnet18 against a PyTorch ResNet-18 with torchvision's layout and
/// state_dict names (eval only: these models keep BatchNorm frozen).
#[test]
fn resnet18_matches_pytorch() {
    check_rule(Arch::ResNet18);
}

#[test]
fn save_load_round_trip() {
    let dir = tempfile::tempdir().unwrap();
    let x = input();
    for &arch in Arch::ALL {
        let varmap = VarMap::new();
        let vb = candle_nn::VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
        let model = deeprepair_nn::build(arch, 10, vb).unwrap();
        let before = model.forward_t(&x, false).unwrap();
        let path = dir.path().join(format!("{}.safetensors", arch.name()));
        save_weights(&varmap, &path).unwrap();
        let saved = candle_core::safetensors::load(&path, &Device::Cpu).unwrap();
        let mut names: Vec<_> = saved.keys().cloned().collect();
        names.sort();
        let mut want: Vec<_> = expected_tensors(arch, 10)
            .unwrap()
            .into_iter()
            .map(|(n, _)| n)
            .collect();
        want.sort();
        assert_eq!(names, want, "{}", arch.name());
        let (loaded, model2) = load_weights(arch, 10, &path, &Device::Cpu).unwrap();
        let after = model2.forward_t(&x, false).unwrap();
        let detached = deeprepair_nn::build_detached(arch, 10, &loaded, &Device::Cpu).unwrap();
        let after_detached = detached.forward_t(&x, false).unwrap();
        assert!(!after_detached.track_op());
        let diff = (&after - after_detached)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap();
        assert_eq!(diff.to_scalar::<f32>().unwrap(), 0.0, "{}", arch.name());
        let diff = (before - after)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert_eq!(diff, 0.0, "{}", arch.name());
        assert_eq!(loaded.all_vars().len(), want.len());
    }
}

#[test]
fn load_reports_every_problem() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.safetensors");
    let mut tensors = HashMap::new();
    for (name, shape) in expected_tensors(Arch::TinyCnn, 10).unwrap() {
        let shape = match name.as_str() {
            "features.conv0.weight" | "features.bn1.running_var" => continue, // missing
            "fc.weight" => vec![5, 128],                                      // wrong classes
            _ => shape,
        };
        tensors.insert(
            name,
            Tensor::zeros(shape.as_slice(), DType::F32, &Device::Cpu).unwrap(),
        );
    }
    tensors.insert(
        "head.weight".into(),
        Tensor::zeros((2, 2), DType::F32, &Device::Cpu).unwrap(),
    );
    tensors.insert(
        "features.bn0.num_batches_tracked".into(),
        Tensor::zeros((), DType::I64, &Device::Cpu).unwrap(),
    );
    candle_core::safetensors::save(&tensors, &path).unwrap();
    let err = match load_weights(Arch::TinyCnn, 10, &path, &Device::Cpu) {
        Err(e) => e,
        Ok(_) => panic!("bad weights loaded"),
    };
    let LoadError::Mismatch { problems, .. } = &err else {
        panic!("unexpected error {err}")
    };
    assert_eq!(
        problems,
        &vec![
            TensorProblem::Missing {
                name: "features.conv0.weight".into(),
                expected: vec![32, 3, 3, 3]
            },
            TensorProblem::Missing {
                name: "features.bn1.running_var".into(),
                expected: vec![64]
            },
            TensorProblem::Shape {
                name: "fc.weight".into(),
                expected: vec![10, 128],
                found: vec![5, 128]
            },
            TensorProblem::Unexpected {
                name: "head.weight".into(),
                found: vec![2, 2]
            },
        ]
    );
    let text = err.to_string();
    assert!(text.contains("4 problem(s)"), "{text}");
    assert!(
        text.contains("fc.weight: expected [10, 128], found [5, 128]"),
        "{text}"
    );

    let missing = dir.path().join("none.safetensors");
    assert!(matches!(
        load_weights(Arch::TinyCnn, 10, &missing, &Device::Cpu),
        Err(LoadError::Read { .. })
    ));
}

/// Our ResNets and candle-transformers' `models::resnet` read the same weights file to the
/// same eval logits (theirs cannot train: no BatchNorm training mode, no max-pool backward).
#[test]
fn resnets_match_candle_transformers() {
    use candle_transformers::models::resnet;
    let dir = tempfile::tempdir().unwrap();
    let x = input();
    for arch in [Arch::ResNet18, Arch::ResNet34, Arch::ResNet50] {
        let path = dir.path().join(format!("{}.safetensors", arch.name()));
        write_rule_weights(arch, 10, &path);
        let (_, ours) = load_weights(arch, 10, &path, &Device::Cpu).unwrap();
        let ours = ours.forward_t(&x, false).unwrap();
        let vb = unsafe {
            candle_nn::VarBuilder::from_mmaped_safetensors(&[&path], DType::F32, &Device::Cpu)
        }
        .unwrap();
        let reference = match arch {
            Arch::ResNet18 => resnet::resnet18(10, vb),
            Arch::ResNet34 => resnet::resnet34(10, vb),
            _ => resnet::resnet50(10, vb),
        }
        .unwrap();
        let theirs = candle_core::Module::forward(&reference, &x).unwrap();
        let err: f32 = (ours - theirs)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar()
            .unwrap();
        println!("{}: max abs difference {err:.3e}", arch.name());
        assert!(err < 1e-4, "{}: {err}", arch.name());
    }
}
