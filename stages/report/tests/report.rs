//! Figures decode as PNGs of the expected size, the contact sheet puts pixels exactly where it
//! says, and `write_report` writes the promised files.

use deeprepair_report::{
    contact_sheet, plot_clean_vs_corrupted, plot_clean_vs_corrupted_for, plot_cross_corruption,
    plot_curve, write_report, Record, ReportError, SheetLayout,
};

fn decode(bytes: &[u8]) -> (usize, usize, Vec<u8>) {
    let mut reader = png::Decoder::new(std::io::Cursor::new(bytes))
        .read_info()
        .expect("PNG header");
    let mut buf = vec![0; reader.output_buffer_size()];
    let info = reader.next_frame(&mut buf).expect("PNG data");
    assert_eq!(info.color_type, png::ColorType::Rgb);
    assert_eq!(info.bit_depth, png::BitDepth::Eight);
    buf.truncate(info.buffer_size());
    (info.width as usize, info.height as usize, buf)
}

fn non_white(rgb: &[u8]) -> usize {
    rgb.chunks_exact(3)
        .filter(|p| *p != [255, 255, 255])
        .count()
}

fn has_color(rgb: &[u8], c: [u8; 3]) -> bool {
    rgb.chunks_exact(3).any(|p| p == c)
}

fn rec(
    arch: &str,
    method: &str,
    variant: Option<&str>,
    rf: Option<&str>,
    eval: &str,
    seed: u64,
    acc: f64,
) -> Record {
    Record {
        arch: arch.into(),
        method: method.into(),
        variant: variant.map(Into::into),
        repaired_for: rf.map(Into::into),
        eval_set: eval.into(),
        seed,
        accuracy: acc,
        n: 50,
    }
}

/// Two architectures; `tiny-cnn` has base, deeprepair (cluster, uniform) and augmix results,
/// `wrn-40-2` only base results.
fn records() -> Vec<Record> {
    let cs = ["gaussian_noise", "fog", "snow"];
    let mut v = Vec::new();
    for seed in 0..2 {
        let j = seed as f64 * 0.02;
        v.push(rec("tiny-cnn", "base", None, None, "clean", seed, 0.9 + j));
        v.push(rec("wrn-40-2", "base", None, None, "clean", seed, 0.95));
        for (i, c) in cs.iter().enumerate() {
            v.push(rec(
                "tiny-cnn",
                "base",
                None,
                None,
                c,
                seed,
                0.5 + 0.1 * i as f64,
            ));
            v.push(rec("wrn-40-2", "base", None, None, c, seed, 0.6));
            v.push(rec(
                "tiny-cnn",
                "base",
                None,
                None,
                &format!("failures:{c}"),
                seed,
                0.0,
            ));
            for (m, variant) in [
                ("deeprepair", Some("cluster")),
                ("deeprepair", Some("uniform")),
                ("augmix", None),
            ] {
                v.push(rec(
                    "tiny-cnn",
                    m,
                    variant,
                    Some(c),
                    "clean",
                    seed,
                    0.88 + j,
                ));
                v.push(rec("tiny-cnn", m, variant, Some(c), c, seed, 0.7 + j));
                for e in cs {
                    let acc = if e == *c { 0.6 } else { 0.4 } + j;
                    v.push(rec(
                        "tiny-cnn",
                        m,
                        variant,
                        Some(c),
                        &format!("failures:{e}"),
                        seed,
                        acc,
                    ));
                }
            }
        }
    }
    v
}

#[test]
fn figures_decode_with_expected_size_and_content() {
    let rs = records();
    let (w, h, px) = decode(&plot_clean_vs_corrupted(&rs, "tiny-cnn").unwrap());
    // 3 corruptions: minimum width; the legend below takes one or two 22-px rows.
    assert_eq!(w, 640);
    assert!(h == 472 || h == 494, "{h}");
    assert!(non_white(&px) > 5_000);
    for bar in [[230, 184, 0], [64, 64, 64], [44, 160, 44], [214, 39, 40]] {
        assert!(has_color(&px, bar), "bar colour {bar:?} missing");
    }
    // Base only (Fig. 2): two bar colours.
    let (_, _, px) = decode(&plot_clean_vs_corrupted(&rs, "wrn-40-2").unwrap());
    assert!(has_color(&px, [64, 64, 64]) && !has_color(&px, [44, 160, 44]));
    decode(&plot_clean_vs_corrupted_for(&rs, "tiny-cnn", "deeprepair/uniform").unwrap());
    decode(&plot_clean_vs_corrupted_for(&rs, "tiny-cnn", "augmix").unwrap());

    let (w, h, px) = decode(&plot_cross_corruption(&rs, "tiny-cnn", "deeprepair").unwrap());
    assert!(w >= 300 && h >= 200, "{w}×{h}");
    assert!(non_white(&px) > 3_000);
    // Colour-scale ends (viridis 0 and 1) are drawn.
    assert!(has_color(&px, [68, 1, 84]) && has_color(&px, [253, 231, 37]));

    let series = vec![
        (
            "train".to_string(),
            vec![(0.0, 1.0), (1.0, 0.5), (2.0, 0.25)],
        ),
        (
            "val".to_string(),
            vec![(0.0, 1.2), (1.0, f64::NAN), (2.0, 0.4)],
        ),
    ];
    let (w, h, px) = decode(&plot_curve(&series, "epoch", "loss").unwrap());
    assert_eq!((w, h), (800, 500));
    assert!(has_color(&px, [31, 119, 180]) && has_color(&px, [255, 127, 14]));
    // One point, constant values: still a chart.
    decode(&plot_curve(&[("one".into(), vec![(3.0, 0.5)])], "x", "y").unwrap());
}

#[test]
fn missing_data_is_an_error_not_a_panic() {
    let rs = records();
    let no_data = |r: Result<Vec<u8>, ReportError>| matches!(r, Err(ReportError::NoData(_)));
    assert!(no_data(plot_clean_vs_corrupted(&rs, "resnet")));
    assert!(no_data(plot_clean_vs_corrupted(&[], "tiny-cnn")));
    assert!(no_data(plot_clean_vs_corrupted_for(
        &rs, "tiny-cnn", "mixup"
    )));
    assert!(no_data(plot_cross_corruption(&rs, "tiny-cnn", "mixup")));
    assert!(no_data(plot_cross_corruption(
        &rs,
        "tiny-cnn",
        "deeprepair/nope"
    )));
    assert!(no_data(plot_cross_corruption(&rs, "wrn-40-2", "base")));
    assert!(no_data(plot_curve(&[], "x", "y")));
    assert!(no_data(plot_curve(
        &[("nan".into(), vec![(f64::NAN, 1.0)])],
        "x",
        "y"
    )));
}

/// 2×3 images, pixel (x, y) of image k = [k, x, y] + 10.
fn tiny_images(n: usize) -> Vec<Vec<u8>> {
    (0..n)
        .map(|k| {
            (0..3)
                .flat_map(|y| (0..2).flat_map(move |x| [10 + k as u8, 10 + x as u8, 10 + y as u8]))
                .collect()
        })
        .collect()
}

fn check_sheet(sheet: &[u8], layout: &SheetLayout, images: &[Vec<u8>], scale: usize) {
    let (w, h, px) = decode(sheet);
    assert_eq!((w, h), (layout.width, layout.height));
    let at = |x: usize, y: usize| &px[(y * w + x) * 3..(y * w + x) * 3 + 3];
    for (k, img) in images.iter().enumerate() {
        let (ox, oy) = layout.origin(k);
        for y in 0..3 * scale {
            for x in 0..2 * scale {
                let s = ((y / scale) * 2 + x / scale) * 3;
                assert_eq!(
                    at(ox + x, oy + y),
                    &img[s..s + 3],
                    "image {k} at ({x}, {y})"
                );
            }
        }
        // White just outside the cell.
        assert_eq!(at(ox - 1, oy), [255, 255, 255]);
        assert_eq!(at(ox + 2 * scale, oy + 3 * scale), [255, 255, 255]);
    }
}

#[test]
fn contact_sheet_places_images_exactly() {
    let images = tiny_images(5);
    let refs: Vec<&[u8]> = images.iter().map(Vec::as_slice).collect();
    // Without labels the layout is fixed: 2 px gaps, cells of 6×9.
    let sheet = contact_sheet(&refs, 2, 3, 3, 3, &[], &[]).unwrap();
    let layout = SheetLayout::new(5, 2, 3, 3, 3, &[], &[]).unwrap();
    assert_eq!(
        (layout.width, layout.height),
        (2 + 3 * (6 + 2), 2 + 2 * (9 + 2))
    );
    assert_eq!(layout.origin(0), (2, 2));
    assert_eq!(layout.origin(2), (2 + 2 * 8, 2));
    assert_eq!(layout.origin(4), (2 + 8, 2 + 11));
    check_sheet(&sheet, &layout, &images, 3);
    // The missing sixth cell stays white.
    let (w, _, px) = decode(&sheet);
    let (x, y) = layout.origin(5);
    assert_eq!(&px[(y * w + x) * 3..(y * w + x) * 3 + 3], [255, 255, 255]);

    // With labels: margins, images still exact, labels drawn (non-white pixels in margins).
    let rows = vec!["gaussian_noise".to_string(), "fog".to_string()];
    let cols = vec!["s1".to_string(), "s2".to_string(), "s3".to_string()];
    let sheet = contact_sheet(&refs, 2, 3, 3, 4, &rows, &cols).unwrap();
    let layout = SheetLayout::new(5, 2, 3, 3, 4, &rows, &cols).unwrap();
    assert!(layout.left > 40 && layout.top == 20);
    check_sheet(&sheet, &layout, &images, 4);
    let (w, _, px) = decode(&sheet);
    let margin_ink = (0..layout.height)
        .flat_map(|y| (0..layout.left).map(move |x| (x, y)))
        .filter(|&(x, y)| px[(y * w + x) * 3] < 128)
        .count();
    assert!(margin_ink > 20, "row labels not drawn");

    // Bad input.
    assert!(matches!(
        contact_sheet(&[], 2, 3, 3, 1, &[], &[]),
        Err(ReportError::NoData(_))
    ));
    assert!(matches!(
        contact_sheet(&refs, 2, 3, 0, 1, &[], &[]),
        Err(ReportError::InvalidInput(_))
    ));
    assert!(matches!(
        contact_sheet(&refs, 2, 3, 2, 0, &[], &[]),
        Err(ReportError::InvalidInput(_))
    ));
    assert!(matches!(
        contact_sheet(&[&[0u8; 5][..]], 2, 3, 1, 1, &[], &[]),
        Err(ReportError::InvalidInput(_))
    ));
    assert!(matches!(
        contact_sheet(&refs[..1], 2, 3, 1, 1 << 40, &[], &[]),
        Err(ReportError::InvalidInput(_))
    ));
}

#[test]
fn write_report_writes_the_promised_files() {
    let rs = records();
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("report");
    let paths = write_report(&rs, &out).unwrap();
    let names: Vec<String> = paths
        .iter()
        .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
        .collect();
    assert_eq!(
        names,
        [
            "table2.md",
            "table2.csv",
            "table2.tex",
            "table3.md",
            "table3.csv",
            "table3.tex",
            "clean_vs_corrupted.md",
            "clean_vs_corrupted.csv",
            "clean_vs_corrupted.tex",
            "paired_vs_augmix.md",
            "paired_vs_augmix.csv",
            "paired_vs_augmix.tex",
            "fig_clean_vs_corrupted_tiny-cnn.png",
            "fig_cross_tiny-cnn_augmix.png",
            "fig_cross_tiny-cnn_deeprepair-cluster.png",
            "fig_cross_tiny-cnn_deeprepair-uniform.png",
            "fig_clean_vs_corrupted_wrn-40-2.png",
            "records.json",
            "report.md",
        ]
    );
    for p in &paths {
        assert!(p.starts_with(&out) && p.is_file(), "{}", p.display());
    }
    // Nothing but the report: the staging folder is gone.
    assert_eq!(std::fs::read_dir(&out).unwrap().count(), paths.len());
    let report = std::fs::read_to_string(out.join("report.md")).unwrap();
    for n in &names[..names.len() - 1] {
        assert!(
            report.contains(&format!("({n})")),
            "report.md does not link {n}"
        );
    }
    let back: Vec<Record> =
        serde_json::from_slice(&std::fs::read(out.join("records.json")).unwrap()).unwrap();
    // serde_json parses floats to within one ulp.
    assert_eq!(back.len(), rs.len());
    for (a, b) in back.iter().zip(&rs) {
        assert!((a.accuracy - b.accuracy).abs() < 1e-12);
        let a = Record {
            accuracy: b.accuracy,
            ..a.clone()
        };
        assert_eq!(&a, b);
    }
    decode(&std::fs::read(out.join("fig_cross_tiny-cnn_augmix.png")).unwrap());

    // Again into the same folder (overwrites), and with no records at all.
    assert_eq!(write_report(&rs, &out).unwrap(), paths);
    let empty = dir.path().join("empty");
    let paths = write_report(&[], &empty).unwrap();
    assert_eq!(paths.len(), 14);
    let report = std::fs::read_to_string(empty.join("report.md")).unwrap();
    assert!(report.contains("_No figures: nothing to plot._"));
    assert!(report.contains("_No data:"));
}
