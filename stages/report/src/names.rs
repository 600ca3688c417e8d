//! Orders and short names of corruptions and methods.

use std::cmp::Ordering;

/// The 15 CIFAR-10-C corruptions in the paper's column order, with the paper's abbreviations.
pub const CORRUPTIONS: [(&str, &str); 15] = [
    ("gaussian_noise", "GN"),
    ("shot_noise", "SN"),
    ("impulse_noise", "IN"),
    ("defocus_blur", "DB"),
    ("glass_blur", "GB"),
    ("motion_blur", "MB"),
    ("zoom_blur", "ZM"),
    ("snow", "SW"),
    ("frost", "FT"),
    ("fog", "FG"),
    ("brightness", "BS"),
    ("contrast", "CT"),
    ("elastic_transform", "ET"),
    ("pixelate", "PIX"),
    ("jpeg_compression", "JPEG"),
];

/// Table rows come in this order; methods not listed follow alphabetically.
pub const METHOD_ORDER: [&str; 9] = [
    "base",
    "finetune",
    "cutout",
    "mixup",
    "cutmix",
    "augmix",
    "sensei",
    "fsgmix",
    "deeprepair",
];

fn canonical(name: &str) -> String {
    name.trim().to_ascii_lowercase().replace(['-', ' '], "_")
}

fn corruption_rank(name: &str) -> Option<usize> {
    let c = canonical(name);
    CORRUPTIONS.iter().position(|(n, _)| *n == c)
}

/// The paper's abbreviation of a CIFAR-10-C corruption ("gaussian_noise" → "GN"); other names
/// are returned unchanged.
pub fn corruption_abbrev(name: &str) -> String {
    match corruption_rank(name) {
        Some(i) => CORRUPTIONS[i].1.to_string(),
        None => name.to_string(),
    }
}

/// Paper order for known corruptions, then the others alphabetically.
pub(crate) fn cmp_corruption(a: &str, b: &str) -> Ordering {
    match (corruption_rank(a), corruption_rank(b)) {
        (Some(x), Some(y)) => x.cmp(&y).then_with(|| a.cmp(b)),
        (Some(_), None) => Ordering::Less,
        (None, Some(_)) => Ordering::Greater,
        (None, None) => a.cmp(b),
    }
}

pub(crate) fn sort_corruptions(v: &mut Vec<String>) {
    v.sort_by(|a, b| cmp_corruption(a, b));
    v.dedup();
}

fn method_rank(m: &str) -> usize {
    METHOD_ORDER
        .iter()
        .position(|x| *x == m)
        .unwrap_or(METHOD_ORDER.len())
}

/// A table row: a method and, when it has several, its variant.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub(crate) struct MethodKey {
    pub method: String,
    pub variant: Option<String>,
}

impl MethodKey {
    pub fn label(&self) -> String {
        method_label(&self.method, self.variant.as_deref())
    }

    /// Parses "method" or "method/variant".
    pub fn parse(spec: &str) -> MethodKey {
        match spec.split_once('/') {
            Some((m, v)) => MethodKey {
                method: m.to_string(),
                variant: Some(v.to_string()),
            },
            None => MethodKey {
                method: spec.to_string(),
                variant: None,
            },
        }
    }

    /// File-name friendly form: "method" or "method-variant".
    pub fn slug(&self) -> String {
        match &self.variant {
            Some(v) => slug(&format!("{}-{}", self.method, v)),
            None => slug(&self.method),
        }
    }
}

impl Ord for MethodKey {
    fn cmp(&self, other: &Self) -> Ordering {
        method_rank(&self.method)
            .cmp(&method_rank(&other.method))
            .then_with(|| self.method.cmp(&other.method))
            .then_with(|| self.variant.cmp(&other.variant))
    }
}

impl PartialOrd for MethodKey {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

/// "deeprepair" or "deeprepair (cluster)".
pub fn method_label(method: &str, variant: Option<&str>) -> String {
    match variant {
        Some(v) => format!("{method} ({v})"),
        None => method.to_string(),
    }
}

/// Keeps `[A-Za-z0-9._-]`, replaces everything else by `_`.
pub(crate) fn slug(s: &str) -> String {
    let out: String = s
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-') {
                c
            } else {
                '_'
            }
        })
        .collect();
    if out.is_empty() || out.chars().all(|c| c == '.') {
        "_".to_string()
    } else {
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn orders() {
        let mut v = vec![
            "zzz".to_string(),
            "fog".into(),
            "aaa".into(),
            "gaussian-noise".into(),
        ];
        sort_corruptions(&mut v);
        assert_eq!(v, ["gaussian-noise", "fog", "aaa", "zzz"]);
        assert_eq!(corruption_abbrev("jpeg_compression"), "JPEG");
        assert_eq!(corruption_abbrev("mine"), "mine");
        let mut m = [
            MethodKey::parse("deeprepair/uniform"),
            MethodKey::parse("zeta"),
            MethodKey::parse("alpha"),
            MethodKey::parse("deeprepair/cluster"),
            MethodKey::parse("base"),
            MethodKey::parse("augmix"),
        ];
        m.sort();
        let labels: Vec<String> = m.iter().map(MethodKey::label).collect();
        assert_eq!(
            labels,
            [
                "base",
                "augmix",
                "deeprepair (cluster)",
                "deeprepair (uniform)",
                "alpha",
                "zeta"
            ]
        );
        assert_eq!(slug("a/b c"), "a_b_c");
        assert_eq!(slug(".."), "_");
    }
}
