//! Paired differences to a baseline method over seeds: the evidence that a repair beats AugMix.
//!
//! For each architecture, corruption k and method M, seed s pairs M's model repaired for k with
//! the baseline's repaired for k with the same seed (same base model, same failures; only the
//! repair differs). The difference d_s = acc_M,s − acc_base,s is taken on the unseen failures
//! De_k and on the clean test set; the table gives its mean over the n paired seeds, the sample
//! std, and the 95 % confidence interval of the mean, mean ± t(0.975, n − 1)·sd/√n. An interval
//! that excludes 0 is a difference this many seeds can see.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use crate::names::{corruption_abbrev, sort_corruptions, MethodKey};
use crate::stats::{archs, failures_of, method_keys, repaired_records};
use crate::{Record, Tables};

/// The method every other is compared with.
pub const BASELINE: &str = "augmix";

/// Two-sided 95 % critical values of Student's t for 1..=30 degrees of freedom (standard
/// table values; a 30-entry table instead of a statistics crate).
const T_975: [f64; 30] = [
    12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160,
    2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056,
    2.052, 2.048, 2.045, 2.042,
];

/// t(0.975, df); the normal 1.96 past the table.
pub fn t_975(df: usize) -> f64 {
    match df {
        0 => f64::NAN,
        d if d <= 30 => T_975[d - 1],
        _ => 1.96,
    }
}

/// A paired difference over seeds, in accuracy fractions.
#[derive(Clone, Debug, PartialEq)]
pub struct Paired {
    pub n: usize,
    pub mean: f64,
    /// Sample std of the differences; `None` with one pair.
    pub std: Option<f64>,
    /// Half-width of the 95 % interval of the mean; `None` with one pair.
    pub half_width: Option<f64>,
    /// Seeds where the method beat the baseline.
    pub wins: usize,
}

/// Summarizes paired differences.
pub fn paired(diffs: &[f64]) -> Option<Paired> {
    let n = diffs.len();
    if n == 0 {
        return None;
    }
    let mean = diffs.iter().sum::<f64>() / n as f64;
    let std = (n > 1)
        .then(|| (diffs.iter().map(|d| (d - mean).powi(2)).sum::<f64>() / (n - 1) as f64).sqrt());
    Some(Paired {
        n,
        mean,
        std,
        half_width: std.map(|sd| t_975(n - 1) * sd / (n as f64).sqrt()),
        wins: diffs.iter().filter(|&&d| d > 0.0).count(),
    })
}

/// Per-seed accuracy of `key` repaired for `corruption` on `eval_set` (records of one seed
/// averaged).
fn per_seed(
    records: &[Record],
    arch: &str,
    key: &MethodKey,
    corruption: &str,
    eval_set: &str,
) -> BTreeMap<u64, f64> {
    crate::stats::per_seed(repaired_records(records, arch, key, corruption, eval_set)).0
}

fn differences(a: &BTreeMap<u64, f64>, b: &BTreeMap<u64, f64>) -> Vec<f64> {
    a.iter()
        .filter_map(|(s, x)| b.get(s).map(|y| x - y))
        .collect()
}

const TITLE: &str = "Paired differences to AugMix over seeds";
const CSV_HEADER: &str =
    "arch,method,variant,corruption,eval_set,pairs,mean_diff,std_diff,ci95_low,ci95_high,wins\n";

fn fmt_points(p: &Paired) -> String {
    match p.half_width {
        Some(h) => format!(
            "{:+.2} [{:+.2}, {:+.2}]",
            p.mean * 100.0,
            (p.mean - h) * 100.0,
            (p.mean + h) * 100.0
        ),
        None => format!("{:+.2}", p.mean * 100.0),
    }
}

/// The table: per architecture, one row per (method, corruption) with the paired difference to
/// AugMix on De_k and on the clean test set, the number of pairs and the seeds won.
pub fn paired_table(records: &[Record]) -> Tables {
    let baseline = MethodKey::parse(BASELINE);
    let mut md = format!(
        "## {TITLE}\n\nMethod − AugMix in accuracy points, paired by seed (same base model and \
         failures, only the repair differs): mean over the pairs and, with two or more, the 95 % \
         interval of the mean (t distribution). `n` is the number of paired seeds; `wins`, the \
         seeds where the method beat AugMix on De_k. An interval that excludes 0 is a \
         difference these seeds can see.\n"
    );
    let mut csv = CSV_HEADER.to_string();
    let mut tex = format!("% {TITLE}\n");
    let mut any = false;
    for arch in archs(records) {
        let mut corruptions: Vec<String> = records
            .iter()
            .filter(|r| r.arch == arch && r.method == BASELINE)
            .filter_map(|r| failures_of(&r.eval_set).map(str::to_string))
            .collect();
        sort_corruptions(&mut corruptions);
        corruptions.dedup();
        let keys: Vec<MethodKey> = method_keys(records, &arch)
            .into_iter()
            .filter(|k| *k != baseline)
            .collect();
        let mut rows = Vec::new();
        for key in &keys {
            for c in &corruptions {
                let fail = crate::failures_set(c);
                let unseen = paired(&differences(
                    &per_seed(records, &arch, key, c, &fail),
                    &per_seed(records, &arch, &baseline, c, &fail),
                ));
                let clean = paired(&differences(
                    &per_seed(records, &arch, key, c, "clean"),
                    &per_seed(records, &arch, &baseline, c, "clean"),
                ));
                if let Some(u) = unseen {
                    rows.push((key.clone(), c.clone(), u, clean));
                }
            }
        }
        if rows.is_empty() {
            continue;
        }
        any = true;
        let _ = write!(
            md,
            "\n### {arch}\n\n| method | corruption | n | De_k: method − AugMix | wins | clean: method − AugMix |\n| --- | --- | ---: | ---: | ---: | ---: |\n"
        );
        let _ = writeln!(
            tex,
            "\\begin{{tabular}}{{llrrrr}}\n\\toprule\nMethod & Corruption & $n$ & $\\Delta$ De & wins & $\\Delta$ clean \\\\\n\\midrule"
        );
        for (key, c, u, clean) in &rows {
            let clean_s = clean.as_ref().map_or("–".to_string(), fmt_points);
            let _ = writeln!(
                md,
                "| {} | {} | {} | {} | {}/{} | {} |",
                key.label(),
                corruption_abbrev(c),
                u.n,
                fmt_points(u),
                u.wins,
                u.n,
                clean_s
            );
            let _ = writeln!(
                tex,
                "{} & {} & {} & {} & {}/{} & {} \\\\",
                crate::tables::latex_escape(&key.label()),
                crate::tables::latex_escape(&corruption_abbrev(c)),
                u.n,
                fmt_points(u),
                u.wins,
                u.n,
                clean_s.replace('–', "--")
            );
            for (set, p) in [("failures", Some(u)), ("clean", clean.as_ref())] {
                if let Some(p) = p {
                    let (lo, hi) = p.half_width.map_or((String::new(), String::new()), |h| {
                        (format!("{:.6}", p.mean - h), format!("{:.6}", p.mean + h))
                    });
                    let _ = writeln!(
                        csv,
                        "{},{},{},{},{},{},{:.6},{},{},{},{}",
                        arch,
                        key.method,
                        key.variant.as_deref().unwrap_or(""),
                        c,
                        set,
                        p.n,
                        p.mean,
                        p.std.map(|v| format!("{v:.6}")).unwrap_or_default(),
                        lo,
                        hi,
                        p.wins
                    );
                }
            }
        }
        tex.push_str("\\bottomrule\n\\end{tabular}\n");
    }
    if !any {
        md.push_str("\n_No data: no AugMix repair to pair with (or no seed in common)._\n");
        tex.push_str("% No data.\n");
    }
    Tables {
        markdown: md,
        csv,
        latex: tex,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(method: &str, seed: u64, set: &str, acc: f64) -> Record {
        Record {
            arch: "tiny-cnn".into(),
            method: method.into(),
            variant: None,
            repaired_for: Some("fog".into()),
            eval_set: set.into(),
            seed,
            accuracy: acc,
            n: 100,
        }
    }

    #[test]
    fn t_table_and_interval() {
        assert_eq!(t_975(2), 4.303);
        assert_eq!(t_975(100), 1.96);
        assert!(t_975(0).is_nan());
        // d = 1, 2, 3: mean 2, sd 1, half-width 4.303/√3.
        let p = paired(&[0.01, 0.02, 0.03]).unwrap();
        assert!((p.mean - 0.02).abs() < 1e-12);
        assert!((p.std.unwrap() - 0.01).abs() < 1e-12);
        assert!((p.half_width.unwrap() - 0.01 * 4.303 / 3f64.sqrt()).abs() < 1e-12);
        assert_eq!(p.wins, 3);
        assert!(paired(&[0.5]).unwrap().half_width.is_none());
        assert!(paired(&[]).is_none());
    }

    #[test]
    fn pairs_by_seed_and_skips_unpaired_seeds() {
        let records = vec![
            rec("augmix", 0, "failures:fog", 0.30),
            rec("augmix", 1, "failures:fog", 0.32),
            rec("augmix", 0, "clean", 0.80),
            rec("augmix", 1, "clean", 0.80),
            rec("deeprepair", 0, "failures:fog", 0.35),
            rec("deeprepair", 1, "failures:fog", 0.33),
            // no AugMix seed 2 to pair with
            rec("deeprepair", 2, "failures:fog", 0.90),
            rec("deeprepair", 0, "clean", 0.79),
            rec("deeprepair", 1, "clean", 0.81),
        ];
        let t = paired_table(&records);
        // Diffs on De: +5 and +1 points → mean +3, sd 2.828, half-width 12.706·2.828/√2.
        let hw = 12.706 * (8f64).sqrt() / 2f64.sqrt();
        let expected = format!("+3.00 [{:+.2}, {:+.2}]", 3.0 - hw, 3.0 + hw);
        assert!(t.markdown.contains(&expected), "{}", t.markdown);
        assert!(
            t.markdown.contains("| deeprepair | FG | 2 |"),
            "{}",
            t.markdown
        );
        assert!(t.markdown.contains("2/2"), "{}", t.markdown);
        assert!(
            t.csv
                .contains("tiny-cnn,deeprepair,,fog,failures,2,0.030000"),
            "{}",
            t.csv
        );
        assert!(
            t.csv.contains("tiny-cnn,deeprepair,,fog,clean,2,0.000000"),
            "{}",
            t.csv
        );
        assert!(
            !t.markdown.contains("| augmix |"),
            "the baseline is not paired with itself"
        );
        let none = paired_table(&records[4..]);
        assert!(none.markdown.contains("No data"), "{}", none.markdown);
    }
}
