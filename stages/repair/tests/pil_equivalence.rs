//! AugMix ops against Pillow's outputs on synthetic images (fixtures generated once with
//! Pillow 13 from the same formula as `synth` below; CIFAR pixels cannot be committed).

use deeprepair_repair::augmix_ops::{apply, augment_and_mix, Op, AUGMIX_OPERATIONS};
use deeprepair_repair::ImageRef;
use rand::SeedableRng;

fn synth(i: i64) -> Vec<u8> {
    let mut out = Vec::with_capacity(3072);
    for y in 0..32i64 {
        for x in 0..32i64 {
            for c in 0..3i64 {
                let mut v =
                    (x * (3 + i) + y * (5 + 2 * i) + c * 71 + ((x * y + 7 * i) % 23) * 3) % 256;
                if i == 2 {
                    v = 60 + v % 120;
                }
                if i == 3 {
                    v = if (x / 8 + y / 8) % 2 == 0 {
                        30 + c * 10
                    } else {
                        200 - c * 5
                    };
                }
                out.push(v as u8);
            }
        }
    }
    out
}

fn op_of(name: &str, p: f64) -> Op {
    match name {
        "autocontrast" => Op::AutoContrast,
        "equalize" => Op::Equalize,
        "posterize" => Op::Posterize(p as u8),
        "solarize" => Op::Solarize(p as u16),
        "rotate" => Op::Rotate(p),
        "shear_x" => Op::ShearX(p),
        "shear_y" => Op::ShearY(p),
        "translate_x" => Op::TranslateX(p),
        "translate_y" => Op::TranslateY(p),
        other => panic!("unknown op {other} in fixture"),
    }
}

#[test]
fn every_op_matches_pillow_byte_for_byte() {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/");
    let index: serde_json::Value =
        serde_json::from_slice(&std::fs::read(format!("{dir}pil_augmix_ops.json")).unwrap())
            .unwrap();
    let blob = std::fs::read(format!("{dir}pil_augmix_ops.bin")).unwrap();
    let images: Vec<Vec<u8>> = (0..4).map(synth).collect();
    let mut report = vec![];
    let cases = index["cases"].as_array().unwrap();
    for (k, case) in cases.iter().enumerate() {
        let name = case["op"].as_str().unwrap();
        let param = case["param"].as_f64().unwrap();
        let i = case["image"].as_u64().unwrap() as usize;
        let want = &blob[k * 3072..(k + 1) * 3072];
        let got = apply(
            op_of(name, param),
            &ImageRef {
                pixels: &images[i],
                width: 32,
                height: 32,
            },
        );
        let diff = got.iter().zip(want).filter(|(a, b)| a != b).count();
        if diff > 0 {
            let max = got
                .iter()
                .zip(want)
                .map(|(a, b)| (*a as i32 - *b as i32).abs())
                .max()
                .unwrap();
            report.push(format!(
                "{name}({param}) on image {i}: {diff} bytes differ, max {max}"
            ));
        }
    }
    assert_eq!(cases.len(), 136);
    assert!(
        report.is_empty(),
        "{} of {} cases differ:\n{}",
        report.len(),
        cases.len(),
        report.join("\n")
    );
}

#[test]
fn augment_and_mix_is_seeded_bounded_and_mixes() {
    let img = synth(0);
    let r = ImageRef {
        pixels: &img,
        width: 32,
        height: 32,
    };
    let run = |seed| {
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        augment_and_mix(&r, &AUGMIX_OPERATIONS, 3.0, 3, None, 1.0, &mut rng)
    };
    let a = run(1);
    assert_eq!(a, run(1));
    assert_ne!(a, run(2));
    assert!(a.iter().all(|v| (0.0..=1.0).contains(v)));
    let clean: Vec<f32> = img.iter().map(|&v| v as f32 / 255.0).collect();
    assert_ne!(a, clean, "some augmentation happened");
}
