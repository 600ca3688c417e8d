//! A data set's classes are explicit and a model is only ever paired with data of its own
//! classes in its order: the same image folders read as [cat, dog] and as [dog, cat] give
//! opposite labels, and evaluating a [cat, dog] model on the [dog, cat] reading fails the stage
//! with both class lists named instead of reporting a wrong accuracy.

mod common;
use common::*;

fn png(path: &std::path::Path, seed: u8) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    let px: Vec<u8> = (0..16 * 16 * 3)
        .map(|i| (i as u8).wrapping_mul(seed).wrapping_add(seed))
        .collect();
    std::fs::write(path, deeprepair_data::encode_png(&px, 16, 16).unwrap()).unwrap();
}

#[test]
fn a_model_meets_only_data_of_its_own_classes() {
    let s = Scratch::new();
    for split in ["train", "test"] {
        for (class, seed) in [("cat", 3), ("dog", 7)] {
            for i in 0..4u8 {
                png(
                    &s.path().join(format!("data/{split}/{class}/{i}.png")),
                    seed + i,
                );
            }
        }
    }
    let data = s.path().join("data").display().to_string();
    let manifest = |eval_classes: &str| {
        format!(
            r#"
stages:
  train-data:
    kind: dataset
    params: {{path: "{data}", split: train, class_names: [cat, dog]}}
  test-data:
    kind: dataset
    params: {{path: "{data}", split: test, class_names: {eval_classes}, eval_set: clean}}
  base:
    kind: pretrain
    params: {{arch: tiny-cnn, epochs: 1, batch: 4}}
    inputs: {{train: train-data}}
  eval:
    kind: evaluate
    inputs: {{model: base.model, sets: [test-data]}}
"#
        )
    };
    let good = s.write("good.yaml", &manifest("[cat, dog]"));
    run_ok(&["run", "--plain", good.to_str().unwrap()]);

    let swapped = s.write("swapped.yaml", &manifest("[dog, cat]"));
    let out = bin()
        .args(["run", "--plain", swapped.to_str().unwrap()])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains(
            "has the classes [dog, cat] but the model (tiny-cnn, base) was trained on [cat, dog]"
        ),
        "{err}"
    );

    // A folder of a class the manifest does not list is named at the dataset stage.
    png(&s.path().join("data/test/dragon/0.png"), 9);
    let extra = s.write("extra.yaml", &manifest("[cat, dog]"));
    let out = bin()
        .args(["run", "--plain", extra.to_str().unwrap()])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("unexpected class folder \"dragon\""), "{err}");
}
