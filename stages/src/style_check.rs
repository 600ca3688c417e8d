//! `style-check`: does the style operation carry the failures' corruption? The base model is
//! evaluated on clean images, on the corrupted set Dv_k, and on the clean images stylized with
//! references from the collected failures Dc_k (sampled as the `deeprepair` stage samples
//! them: k-means over all of Dc by default, or the image's class with `reference_class: same`;
//! the same `style*` params). A faithful style transfer brings the stylized accuracy down toward Dv_k's; one that
//! does nothing leaves it at the clean accuracy. Also a contact sheet of (content, reference,
//! stylized) triples for a person to look at.

use crate::artifacts::{ensure_same_classes, read_dataset};
use crate::stage_training::{input_model, InputModel};
use crate::style::{style_params, StyleChoice};
use deeprepair_pipeline::{
    Artifact, ArtifactHeader, ArtifactKind, InputSpec, ParamSpec, ParamType, StageCtx, StageError,
    StageKind,
};
use deeprepair_repair::reference_sampling::{ClassReferenceSampler, Sampling};
use deeprepair_repair::ImageRef;
use deeprepair_train::evaluate;
use deeprepair_train::trainer::item_rng;
use rayon::prelude::*;
use serde_json::json;

pub struct StyleCheckKind;

impl StageKind for StyleCheckKind {
    fn name(&self) -> &'static str {
        "style-check"
    }
    fn version(&self) -> &'static str {
        // 3: issue 13's CPU kernels (GEMM convolutions) change the floats.
        // 4: stride-1 convolutions as shifted GEMMs (taps) sum in another order.
        "4"
    }
    fn description(&self) -> &'static str {
        "base-model accuracy on clean images stylized with collected failures vs on Dv_k, and a contact sheet"
    }
    fn params(&self) -> Vec<ParamSpec> {
        let mut p = vec![
            ParamSpec::optional(
                "clusters",
                ParamType::Int,
                json!(5),
                "k-means clusters for reference sampling",
            ),
            ParamSpec::optional(
                "reference_class",
                ParamType::Choice(&["any", "same"]),
                json!("any"),
                "references from all of Dc, or from the image's own class",
            ),
            ParamSpec::optional("seed", ParamType::Int, json!(0), "reference sampling seed"),
            ParamSpec::optional(
                "sheet_rows",
                ParamType::Int,
                json!(8),
                "triples on the contact sheet",
            ),
        ];
        p.extend(style_params());
        p
    }
    fn validate(&self, params: &serde_json::Value) -> Result<(), (String, String)> {
        StyleChoice::validate(params)
    }
    fn fingerprint(&self, params: &serde_json::Value) -> anyhow::Result<Option<String>> {
        StyleChoice::fingerprint(params)
    }
    fn inputs(&self) -> Vec<InputSpec> {
        vec![
            InputSpec {
                name: "model",
                many: false,
                optional: false,
                help: "the base model",
            },
            InputSpec {
                name: "failures",
                many: false,
                optional: false,
                help: "collected failures Dc_k (style references)",
            },
            InputSpec {
                name: "clean",
                many: false,
                optional: false,
                help: "clean images to stylize",
            },
            InputSpec {
                name: "corrupted",
                many: false,
                optional: false,
                help: "Dv_k, for comparison",
            },
        ]
    }
    fn outputs(&self) -> Vec<&'static str> {
        vec!["metrics", "sheet"]
    }
    fn run(&self, ctx: &mut StageCtx) -> Result<Vec<Artifact>, StageError> {
        let clusters: usize = ctx.param("clusters")?;
        let seed: u64 = ctx.param("seed")?;
        let rows: usize = ctx.param("sheet_rows")?;
        let InputModel {
            info,
            model,
            device,
            ..
        } = input_model(ctx, "model")?;
        let (failures, finfo) = read_dataset(&ctx.input("failures")?)?;
        let (clean, _) = read_dataset(&ctx.input("clean")?)?;
        let (corrupted, _) = read_dataset(&ctx.input("corrupted")?)?;
        ensure_same_classes(&info, &failures, "input `failures`")?;
        ensure_same_classes(&info, &clean, "input `clean`")?;
        ensure_same_classes(&info, &corrupted, "input `corrupted`")?;
        let sampler = ClassReferenceSampler::new(
            &failures.images,
            &failures.labels,
            failures.image_len(),
            Sampling::Cluster { clusters },
            crate::methods::reference_class_param(ctx)?,
            seed,
        )?;
        let choice = StyleChoice::from_ctx(ctx)?;
        let transfer = choice.build()?;
        let (w, h) = (clean.width, clean.height);
        let per = clean.image_len();
        let stylized: Vec<(usize, Vec<u8>)> = (0..clean.len())
            .into_par_iter()
            .map(|i| -> anyhow::Result<(usize, Vec<u8>)> {
                let r = sampler.sample(clean.labels[i], &mut item_rng(seed, i as u64));
                let out = transfer.stylize(
                    &ImageRef {
                        pixels: clean.image(i),
                        width: w,
                        height: h,
                    },
                    &ImageRef {
                        pixels: failures.image(r),
                        width: w,
                        height: h,
                    },
                )?;
                Ok((r, out))
            })
            .collect::<anyhow::Result<_>>()?;
        let pixels: Vec<u8> = stylized
            .iter()
            .flat_map(|(_, p)| p.iter().copied())
            .collect();
        let acc = |images: &[u8], labels: &[u8], n: usize| -> anyhow::Result<f64> {
            Ok(evaluate(
                &*model,
                images,
                labels,
                (n, h, w),
                clean.num_classes(),
                256,
                &device,
            )?
            .accuracy)
        };
        let acc_clean = acc(&clean.images, &clean.labels, clean.len())?;
        let acc_stylized = acc(&pixels, &clean.labels, clean.len())?;
        let acc_corrupted = acc(&corrupted.images, &corrupted.labels, corrupted.len())?;
        let name = finfo.corruption.unwrap_or_else(|| "failures".into());
        ctx.log(format!(
            "{name}: base accuracy clean {:.2}%, stylized with Dc_k {:.2}%, Dv_k {:.2}%",
            acc_clean * 100.0,
            acc_stylized * 100.0,
            acc_corrupted * 100.0
        ));
        let n = rows.min(clean.len());
        let mut cells: Vec<&[u8]> = Vec::with_capacity(3 * n);
        for (i, (r, s)) in stylized.iter().enumerate().take(n) {
            cells.push(&clean.images[i * per..(i + 1) * per]);
            cells.push(failures.image(*r));
            cells.push(s);
        }
        let col_labels = vec![
            "content".to_string(),
            "reference".to_string(),
            "stylized".to_string(),
        ];
        let png = deeprepair_report::contact_sheet(&cells, w, h, 3, 4, &[], &col_labels)
            .map_err(anyhow::Error::from)?;
        let metrics = Artifact::json(
            ArtifactKind::Metrics,
            &json!({
                "corruption": name,
                "accuracy_clean": acc_clean,
                "accuracy_stylized": acc_stylized,
                "accuracy_corrupted": acc_corrupted,
                "style": transfer.name(),
                "style_alpha": choice.alpha,
                "style_levels": choice.levels,
                "images": clean.len(),
            }),
        );
        let sheet = Artifact {
            header: ArtifactHeader::new(ArtifactKind::Image, "image/png", "png")
                .with_meta(json!({ "triples": n })),
            bytes: png,
        };
        Ok(vec![metrics, sheet])
    }
}
