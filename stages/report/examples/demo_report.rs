//! Writes a report from synthetic records: `cargo run -p deeprepair-report --example demo_report -- OUT_DIR`.

use deeprepair_report::{contact_sheet, plot_curve, write_report, Record};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let dir = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "report-demo".into());
    let dir = std::path::Path::new(&dir);
    let cs = ["gaussian_noise", "fog", "jpeg_compression", "my_corruption"];
    let methods: [(&str, Option<&str>); 4] = [
        ("augmix", None),
        ("deeprepair", Some("uniform")),
        ("deeprepair", Some("cluster")),
        ("fsgmix", Some("gmm")),
    ];
    let mut records = Vec::new();
    let mut push = |method: &str,
                    variant: Option<&str>,
                    rf: Option<&str>,
                    eval: String,
                    seed: u64,
                    acc: f64| {
        records.push(Record {
            arch: "tiny-cnn".into(),
            method: method.into(),
            variant: variant.map(Into::into),
            repaired_for: rf.map(Into::into),
            eval_set: eval,
            seed,
            accuracy: acc.clamp(0.0, 1.0),
            n: 1000,
        })
    };
    for seed in 0..2u64 {
        let j = seed as f64 * 0.01;
        push("base", None, None, "clean".into(), seed, 0.9 + j);
        for (i, c) in cs.iter().enumerate() {
            push(
                "base",
                None,
                None,
                c.to_string(),
                seed,
                0.5 + 0.1 * i as f64 + j,
            );
            push("base", None, None, format!("failures:{c}"), seed, 0.0);
            for (m, (method, variant)) in methods.iter().enumerate() {
                let q = 0.4 + 0.1 * m as f64 + j;
                push(
                    method,
                    *variant,
                    Some(c),
                    "clean".into(),
                    seed,
                    0.88 + 0.01 * m as f64,
                );
                push(method, *variant, Some(c), c.to_string(), seed, q + 0.2);
                for (k, e) in cs.iter().enumerate() {
                    let d = if k == i { 0.0 } else { 0.1 };
                    push(
                        method,
                        *variant,
                        Some(c),
                        format!("failures:{e}"),
                        seed,
                        q - d,
                    );
                }
            }
        }
    }
    let paths = write_report(&records, dir)?;
    for p in &paths {
        println!("{}", p.display());
    }
    let curve = plot_curve(
        &[
            (
                "train loss".into(),
                (0..20)
                    .map(|e| (e as f64, 2.0 / (1.0 + e as f64)))
                    .collect(),
            ),
            (
                "val loss".into(),
                (0..20)
                    .map(|e| (e as f64, 2.2 / (1.0 + 0.8 * e as f64)))
                    .collect(),
            ),
        ],
        "epoch",
        "loss",
    )?;
    std::fs::write(dir.join("curve.png"), curve)?;
    let imgs: Vec<Vec<u8>> = (0..6)
        .map(|k| {
            (0..8 * 8)
                .flat_map(|p| [(p * 4) as u8, (k * 40) as u8, 255 - (p * 4) as u8])
                .collect()
        })
        .collect();
    let refs: Vec<&[u8]> = imgs.iter().map(|v| v.as_slice()).collect();
    let sheet = contact_sheet(
        &refs,
        8,
        8,
        3,
        4,
        &["gaussian_noise".into(), "fog".into()],
        &["s1".into(), "s2".into(), "s3".into()],
    )?;
    std::fs::write(dir.join("sheet.png"), sheet)?;
    Ok(())
}
