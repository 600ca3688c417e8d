//! Grouping records into cells: mean (and sample std) over seeds.

use std::collections::{BTreeMap, BTreeSet};

use crate::names::{sort_corruptions, MethodKey};
use crate::Record;

/// One table cell.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) struct Stat {
    /// Mean over seeds of the per-seed mean accuracy, in [0, 1].
    pub mean: f64,
    /// Sample standard deviation over seeds; `None` with one seed.
    pub std: Option<f64>,
    pub seeds: usize,
    /// Images evaluated, summed over the records.
    pub images: usize,
}

/// Each seed's mean accuracy (records of one seed averaged) and the images evaluated, summed.
/// Non-finite accuracies are skipped.
pub(crate) fn per_seed<'a>(
    records: impl Iterator<Item = &'a Record>,
) -> (BTreeMap<u64, f64>, usize) {
    let mut by_seed: BTreeMap<u64, (f64, usize)> = BTreeMap::new();
    let mut images = 0usize;
    for r in records {
        if !r.accuracy.is_finite() {
            continue;
        }
        let e = by_seed.entry(r.seed).or_insert((0.0, 0));
        e.0 += r.accuracy;
        e.1 += 1;
        images = images.saturating_add(r.n);
    }
    let means = by_seed
        .into_iter()
        .map(|(seed, (sum, count))| (seed, sum / count as f64))
        .collect();
    (means, images)
}

/// Mean over seeds; records of one seed are averaged first. Non-finite accuracies are skipped.
pub(crate) fn stat<'a>(records: impl Iterator<Item = &'a Record>) -> Option<Stat> {
    let (by_seed, images) = per_seed(records);
    if by_seed.is_empty() {
        return None;
    }
    let per_seed: Vec<f64> = by_seed.values().copied().collect();
    let k = per_seed.len() as f64;
    let mean = per_seed.iter().sum::<f64>() / k;
    let std = (per_seed.len() > 1).then(|| {
        let var = per_seed.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (k - 1.0);
        var.sqrt()
    });
    Some(Stat {
        mean,
        std,
        seeds: per_seed.len(),
        images,
    })
}

pub(crate) fn is_base(r: &Record) -> bool {
    r.method == "base"
}

/// The unrepaired model of `arch` on `eval_set`.
pub(crate) fn base_cell(records: &[Record], arch: &str, eval_set: &str) -> Option<Stat> {
    stat(
        records
            .iter()
            .filter(|r| is_base(r) && r.arch == arch && r.eval_set == eval_set),
    )
}

/// The model of `arch` repaired by `key` for `repaired_for`, on `eval_set`.
pub(crate) fn repaired_cell(
    records: &[Record],
    arch: &str,
    key: &MethodKey,
    repaired_for: &str,
    eval_set: &str,
) -> Option<Stat> {
    stat(repaired_records(records, arch, key, repaired_for, eval_set))
}

/// The records of the model of `arch` repaired by `key` for `repaired_for`, on `eval_set`.
pub(crate) fn repaired_records<'a>(
    records: &'a [Record],
    arch: &'a str,
    key: &'a MethodKey,
    repaired_for: &'a str,
    eval_set: &'a str,
) -> impl Iterator<Item = &'a Record> {
    records.iter().filter(move |r| {
        r.arch == arch
            && r.method == key.method
            && r.variant == key.variant
            && r.repaired_for.as_deref() == Some(repaired_for)
            && r.eval_set == eval_set
    })
}

/// Architectures, sorted.
pub(crate) fn archs(records: &[Record]) -> Vec<String> {
    let s: BTreeSet<&str> = records.iter().map(|r| r.arch.as_str()).collect();
    s.into_iter().map(str::to_string).collect()
}

/// Repaired (non-base) method rows of `arch`, in table order.
pub(crate) fn method_keys(records: &[Record], arch: &str) -> Vec<MethodKey> {
    let mut v: Vec<MethodKey> = records
        .iter()
        .filter(|r| r.arch == arch && !is_base(r))
        .map(|r| MethodKey {
            method: r.method.clone(),
            variant: r.variant.clone(),
        })
        .collect();
    v.sort();
    v.dedup();
    v
}

/// Corruption of an evaluation set that is neither "clean" nor "failures:…".
pub(crate) fn corrupted_set(eval_set: &str) -> Option<&str> {
    (eval_set != "clean" && !eval_set.starts_with("failures:") && !eval_set.is_empty())
        .then_some(eval_set)
}

/// Corruption of a "failures:<c>" evaluation set.
pub(crate) fn failures_of(eval_set: &str) -> Option<&str> {
    eval_set.strip_prefix("failures:").filter(|c| !c.is_empty())
}

/// Corruptions named by records of `arch` that pass `f`, in paper order.
pub(crate) fn corruptions_where(
    records: &[Record],
    arch: &str,
    f: impl Fn(&Record) -> Option<String>,
) -> Vec<String> {
    let mut v: Vec<String> = records
        .iter()
        .filter(|r| r.arch == arch)
        .filter_map(f)
        .collect();
    sort_corruptions(&mut v);
    v
}

/// Percent with two decimals.
pub(crate) fn pct(x: f64) -> String {
    format!("{:.2}", x * 100.0)
}

/// "55.19" or "55.19 ± 1.20" (`pm` is the ± symbol of the target format).
pub(crate) fn fmt_stat(s: &Stat, pm: &str) -> String {
    match s.std {
        Some(sd) => format!("{}{pm}{}", pct(s.mean), pct(sd)),
        None => pct(s.mean),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(seed: u64, acc: f64) -> Record {
        Record {
            arch: "a".into(),
            method: "base".into(),
            variant: None,
            repaired_for: None,
            eval_set: "clean".into(),
            seed,
            accuracy: acc,
            n: 10,
        }
    }

    #[test]
    fn mean_and_std_over_seeds() {
        // Seed 0 has two records (averaged first: 0.5), seed 1 one (0.7).
        let rs = [rec(0, 0.4), rec(0, 0.6), rec(1, 0.7), rec(2, f64::NAN)];
        let s = stat(rs.iter()).unwrap();
        assert_eq!(s.seeds, 2);
        assert!((s.mean - 0.6).abs() < 1e-12);
        assert!((s.std.unwrap() - (0.02f64).sqrt()).abs() < 1e-12);
        assert_eq!(s.images, 30);
        assert_eq!(fmt_stat(&s, " ± "), "60.00 ± 14.14");
        assert!(stat([rec(0, f64::NAN)].iter()).is_none());
        assert_eq!(
            fmt_stat(&stat([rec(3, 0.12345)].iter()).unwrap(), "±"),
            "12.35"
        );
    }
}
