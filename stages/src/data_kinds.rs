//! `dataset` (real images from a path, seeded subset) and `corrupt` (Dv_k: a dataset under one
//! CIFAR-10-C corruption at severities 1–5).

use crate::artifacts::{dataset_artifact, read_dataset, DatasetInfo};
use deeprepair_corrupt::{Assets as CorruptionAssets, Corruption, FrostTextures};
use deeprepair_data::{select_subset, Dataset, Split};
use deeprepair_pipeline::kind::fingerprint_path;
use deeprepair_pipeline::{
    Artifact, InputSpec, ParamSpec, ParamType, Resources, StageCtx, StageError, StageKind,
};
use serde_json::{json, Value};
use std::path::Path;

/// `dataset`: loads CIFAR-10 binary files, an image folder (`root/<split>/<class>/*`) or a
/// stored dataset file; keeps a seeded subset.
pub struct DatasetKind;

impl StageKind for DatasetKind {
    fn name(&self) -> &'static str {
        "dataset"
    }
    fn version(&self) -> &'static str {
        "1"
    }
    fn description(&self) -> &'static str {
        "real images from a path (CIFAR-10 binary or image folder), optionally a seeded subset"
    }
    fn params(&self) -> Vec<ParamSpec> {
        vec![
            ParamSpec::required(
                "path",
                ParamType::Str,
                "CIFAR-10 binary dir, image-folder root, or dataset file",
            ),
            ParamSpec::optional(
                "split",
                ParamType::Choice(&["train", "test"]),
                json!("train"),
                "which split",
            ),
            ParamSpec::optional(
                "per_class",
                ParamType::Int,
                json!(0),
                "keep at most this many per class (0: all)",
            ),
            ParamSpec::optional(
                "limit",
                ParamType::Int,
                json!(0),
                "keep at most this many overall (0: all)",
            ),
            ParamSpec::optional(
                "offset_per_class",
                ParamType::Int,
                json!(0),
                "skip this many seeded draws per class first (disjoint subsets from one split)",
            ),
            ParamSpec::optional("seed", ParamType::Int, json!(0), "subset seed"),
            ParamSpec::optional(
                "eval_set",
                ParamType::Str,
                json!(""),
                "label for evaluation records, e.g. 'clean' (empty: training data)",
            ),

            ParamSpec::optional(
                "layout",
                ParamType::Choice(&["auto", "failures"]),
                json!("auto"),
                "auto: CIFAR-10 binary or root/<split>/<class>/*; failures: a collected-failure folder root/<class>/*",
            ),
            ParamSpec::optional(
                "class_names",
                ParamType::List(Box::new(ParamType::Str)),
                json!(deeprepair_data::CIFAR10_CLASSES),
                "class names in label order: an image folder must have exactly one folder per \
                 class (layout: failures, a subset of them); CIFAR-10 binary files, 10 names",
            ),
            ParamSpec::optional("holdout", ParamType::Float, json!(0.0), "fraction per class held out (seeded) for evaluating on unseen images"),
            ParamSpec::optional("part", ParamType::Choice(&["kept", "held-out"]), json!("kept"), "which side of the holdout split this stage emits"),
            ParamSpec::optional("pattern", ParamType::Str, json!(""), "failure pattern name (recorded as the corruption the failures show)"),
        ]
    }
    fn inputs(&self) -> Vec<InputSpec> {
        vec![]
    }
    fn outputs(&self) -> Vec<&'static str> {
        vec!["images"]
    }
    fn resources(&self, _params: &Value) -> Resources {
        Resources {
            cpus: 2,
            gpus: 0,
            mem_mb: 2048,
            ranks: 1,
        }
    }
    fn fingerprint(&self, params: &Value) -> anyhow::Result<Option<String>> {
        let path = params["path"].as_str().unwrap_or_default();
        if !Path::new(path).exists() {
            anyhow::bail!(
                "{path} does not exist; pass --data with CIFAR-10 (an image folder with train/ and test/, or the binary data_batch_*.bin files), or download it with `deeprepair data fetch cifar10 --dest DIR` (needs internet) and pass --data DIR/cifar-10-batches-bin"
            );
        }
        Ok(Some(fingerprint_path(Path::new(path))?))
    }
    fn run(&self, ctx: &mut StageCtx) -> Result<Vec<Artifact>, StageError> {
        let path: String = ctx.param("path")?;
        let split = Split::from_name(&ctx.param::<String>("split")?).unwrap_or(Split::Train);
        let per_class: usize = ctx.param("per_class")?;
        let limit: usize = ctx.param("limit")?;
        let offset: usize = ctx.param("offset_per_class")?;
        let seed: u64 = ctx.param("seed")?;
        let eval_set: String = ctx.param("eval_set")?;
        let layout: String = ctx.param("layout")?;
        let names: Vec<String> = ctx.param("class_names")?;
        let ds = if layout == "failures" {
            deeprepair_data::load_images_dir_with_classes(Path::new(&path), &names)
        } else {
            deeprepair_data::load_dataset_with_classes(Path::new(&path), split, &names)
        }
        .map_err(anyhow::Error::from)?;
        let holdout: f64 = ctx.param("holdout")?;
        let ds = if holdout > 0.0 {
            let held = held_out(&ds, holdout, seed);
            let keep: Vec<usize> = if ctx.param::<String>("part")? == "held-out" {
                (0..ds.len()).filter(|i| held.contains(i)).collect()
            } else {
                (0..ds.len()).filter(|i| !held.contains(i)).collect()
            };
            ds.subset(&keep)
        } else {
            ds
        };
        let keep = if per_class == 0 && limit == 0 && offset == 0 {
            (0..ds.len()).collect()
        } else {
            let take = if per_class == 0 {
                None
            } else {
                Some(per_class + offset)
            };
            let drawn = select_subset(&ds.labels, ds.num_classes(), take, None, seed);
            // Drop the first `offset` draws of each class (in draw order, which select_subset
            // sorts away: redo the per-class draw order from the same seed).
            let mut kept = if offset == 0 {
                drawn
            } else {
                skip_first_per_class(&ds, &drawn, offset, seed)
            };
            if limit > 0 && kept.len() > limit {
                kept = select_subset(
                    &ds.subset(&kept).labels,
                    ds.num_classes(),
                    None,
                    Some(limit),
                    seed,
                )
                .into_iter()
                .map(|i| kept[i])
                .collect();
            }
            kept
        };
        let ds = ds.subset(&keep);
        ctx.log(format!(
            "{} images from {path} ({}), {} classes",
            ds.len(),
            split.name(),
            ds.num_classes()
        ));
        let pattern: String = ctx.param("pattern")?;
        let info = DatasetInfo {
            eval_set: (!eval_set.is_empty()).then_some(eval_set),
            corruption: (!pattern.is_empty()).then_some(pattern),
            ..Default::default()
        };
        Ok(vec![dataset_artifact(&ds, &info)])
    }
}

/// A seeded `fraction` of each class (at least one image when the class has two or more).
fn held_out(ds: &Dataset, fraction: f64, seed: u64) -> std::collections::HashSet<usize> {
    let counts = ds.class_counts();
    let mut held = std::collections::HashSet::new();
    for (class, &count) in counts.iter().enumerate() {
        let k = ((count as f64 * fraction).round() as usize).clamp(
            usize::from(count >= 2),
            count.saturating_sub(1).max(usize::from(count >= 2)),
        );
        let members: Vec<usize> = (0..ds.len())
            .filter(|&i| ds.labels[i] as usize == class)
            .collect();
        let member_labels = vec![0u8; members.len()];
        for pos in select_subset(
            &member_labels,
            1,
            Some(k),
            None,
            seed ^ 0x401D ^ class as u64,
        ) {
            held.insert(members[pos]);
        }
    }
    held
}

/// From the per-class seeded selection `drawn` (sorted), drop `offset` images per class,
/// chosen by a second seeded draw so the two parts are disjoint and reproducible.
fn skip_first_per_class(ds: &Dataset, drawn: &[usize], offset: usize, seed: u64) -> Vec<usize> {
    let labels: Vec<u8> = drawn.iter().map(|&i| ds.labels[i]).collect();
    let first = select_subset(&labels, ds.num_classes(), Some(offset), None, seed ^ 0x5EED);
    let skip: std::collections::HashSet<usize> = first.into_iter().collect();
    drawn
        .iter()
        .enumerate()
        .filter(|(k, _)| !skip.contains(k))
        .map(|(_, &i)| i)
        .collect()
}

/// `corrupt`: Dv_k — every image at each severity (blocks of N per severity, as CIFAR-10-C).
pub struct CorruptKind;

impl StageKind for CorruptKind {
    fn name(&self) -> &'static str {
        "corrupt"
    }
    fn version(&self) -> &'static str {
        "1"
    }
    fn description(&self) -> &'static str {
        "applies one CIFAR-10-C corruption at severities 1-5 to every image (Dv_k)"
    }
    fn params(&self) -> Vec<ParamSpec> {
        vec![
            ParamSpec::required(
                "corruption",
                ParamType::Choice(&deeprepair_corrupt::Corruption::NAMES),
                "the corruption",
            ),
            ParamSpec::optional(
                "severities",
                ParamType::List(Box::new(ParamType::Int)),
                json!([1, 2, 3, 4, 5]),
                "severities, each a block of N images",
            ),
            ParamSpec::optional(
                "seed",
                ParamType::Int,
                json!(0),
                "noise seed (per image, corruption, severity)",
            ),
            ParamSpec::optional(
                "frost",
                ParamType::Str,
                json!(""),
                "folder with the frost photographs (frost only)",
            ),
        ]
    }
    fn inputs(&self) -> Vec<InputSpec> {
        vec![InputSpec {
            name: "images",
            many: false,
            optional: false,
            help: "the clean images (Dv)",
        }]
    }
    fn outputs(&self) -> Vec<&'static str> {
        vec!["images"]
    }
    fn resources(&self, _params: &Value) -> Resources {
        Resources {
            cpus: 2,
            gpus: 0,
            mem_mb: 2048,
            ranks: 1,
        }
    }
    fn validate(&self, params: &Value) -> Result<(), (String, String)> {
        if params["corruption"] == "frost" && params["frost"].as_str().is_none_or(str::is_empty) {
            return Err(("frost".into(), "frost needs a folder of frost photographs (frost1.png … frost6.jpg from hendrycks/robustness)".into()));
        }
        if let Some(list) = params["severities"].as_array() {
            if list.is_empty()
                || list
                    .iter()
                    .any(|s| !(1..=5).contains(&s.as_i64().unwrap_or(0)))
            {
                return Err(("severities".into(), "severities between 1 and 5".into()));
            }
        }
        Ok(())
    }
    fn fingerprint(&self, params: &Value) -> anyhow::Result<Option<String>> {
        match params["frost"].as_str() {
            Some(p) if !p.is_empty() && params["corruption"] == "frost" => {
                Ok(Some(fingerprint_path(Path::new(p))?))
            }
            _ => Ok(None),
        }
    }
    fn run(&self, ctx: &mut StageCtx) -> Result<Vec<Artifact>, StageError> {
        let name: String = ctx.param("corruption")?;
        let corruption = Corruption::from_name(&name)
            .ok_or_else(|| anyhow::anyhow!("unknown corruption {name}"))?;
        let severities: Vec<u8> = ctx.param("severities")?;
        let seed: u64 = ctx.param("seed")?;
        let frost: String = ctx.param("frost")?;
        let res = CorruptionAssets {
            frost: if corruption == Corruption::Frost {
                Some(FrostTextures::load(Path::new(&frost)).map_err(anyhow::Error::from)?)
            } else {
                None
            },
        };
        let (clean, _) = read_dataset(&ctx.input("images")?)?;
        let n = clean.len();
        let mut images = Vec::with_capacity(n * clean.image_len() * severities.len());
        let mut labels = Vec::with_capacity(n * severities.len());
        let mut ids = Vec::with_capacity(n * severities.len());
        for (k, &s) in severities.iter().enumerate() {
            ctx.check_cancelled()?;
            let out = deeprepair_corrupt::corrupt_batch(
                &clean.images,
                n,
                clean.width,
                clean.height,
                corruption,
                s,
                seed,
                &res,
            )
            .map_err(anyhow::Error::from)?;
            images.extend_from_slice(&out);
            labels.extend_from_slice(&clean.labels);
            for i in 0..n {
                let src = clean
                    .source_ids
                    .as_ref()
                    .map_or_else(|| i.to_string(), |ids| ids[i].clone());
                ids.push(format!("{name}/{s}/{src}"));
            }
            ctx.progress((k + 1) as u64, severities.len() as u64, "severities");
        }
        let ds = Dataset {
            height: clean.height,
            width: clean.width,
            images,
            labels,
            class_names: clean.class_names.clone(),
            source_ids: Some(ids),
        };
        let info = DatasetInfo {
            eval_set: Some(name.clone()),
            corruption: Some(name),
            severities,
        };
        Ok(vec![dataset_artifact(&ds, &info)])
    }
}

/// `degrade`: FSGMix's test-set degradation (§IV-A): every image becomes Σ w_deg,i · O_i(I) over
/// its seven operations, with one random weight vector w_deg per `seed`. The paper does not
/// normalize w_deg; drawn uniformly in [0, 1]^7 its entries sum to ~3.5 and the mixture
/// saturates to white, so we normalize it to sum 1 (documented divergence).
pub struct DegradeKind;

impl StageKind for DegradeKind {
    fn name(&self) -> &'static str {
        "degrade"
    }
    fn version(&self) -> &'static str {
        "1"
    }
    fn description(&self) -> &'static str {
        "FSGMix's degradation: a fixed random mix w_deg of its seven operations (one failure pattern per seed)"
    }
    fn params(&self) -> Vec<ParamSpec> {
        vec![
            ParamSpec::optional(
                "seed",
                ParamType::Int,
                json!(0),
                "draws w_deg (and per-image op parameters)",
            ),
            ParamSpec::optional("severity", ParamType::Int, json!(3), "operation severity"),
        ]
    }
    fn inputs(&self) -> Vec<InputSpec> {
        vec![InputSpec {
            name: "images",
            many: false,
            optional: false,
            help: "the clean images",
        }]
    }
    fn outputs(&self) -> Vec<&'static str> {
        vec!["images"]
    }
    fn run(&self, ctx: &mut StageCtx) -> Result<Vec<Artifact>, StageError> {
        use rand::Rng;
        use rayon::prelude::*;
        let seed: u64 = ctx.param("seed")?;
        let severity: i64 = ctx.param("severity")?;
        let (clean, _) = read_dataset(&ctx.input("images")?)?;
        let mut rng = deeprepair_train::trainer::item_rng(seed, u64::MAX);
        let raw: Vec<f64> = (0..7).map(|_| rng.random::<f64>()).collect();
        let total: f64 = raw.iter().sum();
        let w_deg: Vec<f64> = raw.iter().map(|w| w / total).collect();
        let per = clean.image_len();
        let images: Vec<u8> = (0..clean.len())
            .into_par_iter()
            .map(|i| -> anyhow::Result<Vec<u8>> {
                let mut rng = deeprepair_train::trainer::item_rng(seed, i as u64);
                let img = deeprepair_repair::ImageRef {
                    pixels: &clean.images[i * per..(i + 1) * per],
                    width: clean.width,
                    height: clean.height,
                };
                let views = deeprepair_repair::fsgmix_ops::views(&img, severity as f64, &mut rng);
                let mixed = deeprepair_repair::fsgmix_ops::mix(&views, &w_deg)?;
                Ok(mixed.iter().map(|v| (v * 255.0).round() as u8).collect())
            })
            .collect::<anyhow::Result<Vec<_>>>()?
            .concat();
        let name = format!("wdeg-{seed}");
        ctx.log(format!("w_deg = {w_deg:.3?}"));
        let ds = Dataset {
            images,
            source_ids: clean.source_ids.clone(),
            ..clean
        };
        let info = DatasetInfo {
            eval_set: Some(name.clone()),
            corruption: Some(name),
            severities: vec![severity as u8],
        };
        Ok(vec![dataset_artifact(&ds, &info)])
    }
}

/// `cifar10c`: the released CIFAR-10-C (`<corruption>.npy`, `labels.npy`: severities 1–5 in
/// blocks of N) as Dv_k, for users who have it, in place of generating it with `corrupt`.
pub struct Cifar10cKind;

impl StageKind for Cifar10cKind {
    fn name(&self) -> &'static str {
        "cifar10c"
    }
    fn version(&self) -> &'static str {
        "1"
    }
    fn description(&self) -> &'static str {
        "imports one corruption of the released CIFAR-10-C .npy files as Dv_k"
    }
    fn params(&self) -> Vec<ParamSpec> {
        vec![
            ParamSpec::required(
                "path",
                ParamType::Str,
                "folder with <corruption>.npy and labels.npy",
            ),
            ParamSpec::required(
                "corruption",
                ParamType::Choice(&deeprepair_corrupt::Corruption::NAMES),
                "which corruption",
            ),
            ParamSpec::optional(
                "severities",
                ParamType::List(Box::new(ParamType::Int)),
                json!([1, 2, 3, 4, 5]),
                "severity blocks to keep",
            ),
        ]
    }
    fn inputs(&self) -> Vec<InputSpec> {
        vec![]
    }
    fn outputs(&self) -> Vec<&'static str> {
        vec!["images"]
    }
    fn fingerprint(&self, params: &Value) -> anyhow::Result<Option<String>> {
        let dir = Path::new(params["path"].as_str().unwrap_or_default());
        let c = params["corruption"].as_str().unwrap_or_default();
        let a = fingerprint_path(&dir.join(format!("{c}.npy")))?;
        let b = fingerprint_path(&dir.join("labels.npy"))?;
        Ok(Some(format!("{a}/{b}")))
    }
    fn run(&self, ctx: &mut StageCtx) -> Result<Vec<Artifact>, StageError> {
        let path: String = ctx.param("path")?;
        let name: String = ctx.param("corruption")?;
        let severities: Vec<u8> = ctx.param("severities")?;
        let (images, labels) = deeprepair_data::read_cifar_c_npy(Path::new(&path), &name)
            .map_err(anyhow::Error::from)?;
        let n = labels.len();
        if n % 5 != 0 {
            return Err(StageError::Fatal(anyhow::anyhow!(
                "{path}/{name}.npy: {n} images is not 5 severity blocks"
            )));
        }
        let block = n / 5;
        let per = 32 * 32 * 3;
        let (mut out, mut out_labels, mut ids) = (Vec::new(), Vec::new(), Vec::new());
        for &s in &severities {
            if !(1..=5).contains(&s) {
                return Err(StageError::Fatal(anyhow::anyhow!(
                    "severity {s} is not in 1..=5"
                )));
            }
            let range = (s as usize - 1) * block..s as usize * block;
            out.extend_from_slice(&images[range.start * per..range.end * per]);
            out_labels.extend_from_slice(&labels[range.clone()]);
            ids.extend(range.map(|i| format!("{name}.npy#{i}")));
        }
        let ds = Dataset {
            height: 32,
            width: 32,
            images: out,
            labels: out_labels,
            class_names: deeprepair_data::CIFAR10_CLASSES
                .iter()
                .map(|s| s.to_string())
                .collect(),
            source_ids: Some(ids),
        };
        ds.validate().map_err(anyhow::Error::from)?;
        let info = DatasetInfo {
            eval_set: Some(name.clone()),
            corruption: Some(name),
            severities,
        };
        Ok(vec![dataset_artifact(&ds, &info)])
    }
}
