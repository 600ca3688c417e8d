//! Which style transfer DeepRepair's style operations use, from stage params: the weight-free
//! wavelet transfer (the default; no pretrained weights exist here) or WCT2, the paper's [70],
//! with the official checkpoints a user supplies. Shared by `deeprepair`, `style-check` and
//! `deeprepair stylize`.

use anyhow::Context;
use deeprepair_pipeline::{ParamSpec, ParamType, StageCtx, StageError};
use deeprepair_repair::style_transfer::{StyleTransfer, WaveletStyle};
use serde_json::{json, Value};
use std::path::Path;

/// How a style op stylizes (shared by `deeprepair`, `style-check` and `deeprepair stylize`).
pub fn style_params() -> Vec<ParamSpec> {
    vec![
        ParamSpec::optional(
            "style",
            ParamType::Choice(&["wavelet", "wct2"]),
            json!("wavelet"),
            "style transfer: the weight-free wavelet transfer, or WCT2 (the paper's [70]) with \
             the official checkpoints from `style_weights`",
        ),
        ParamSpec::optional(
            "style_weights",
            ParamType::Str,
            json!(""),
            "with style: wct2, the folder holding wave_encoder_cat5_l4.pth and \
             wave_decoder_cat5_l4.pth",
        ),
        ParamSpec::optional(
            "style_alpha",
            ParamType::Float,
            json!(1.0),
            "style strength: 1 full transfer, 0 the content unchanged",
        ),
        ParamSpec::optional(
            "style_levels",
            ParamType::Int,
            json!(2),
            "with style: wavelet, the Haar decomposition depth (image sides divisible by 2^levels)",
        ),
    ]
}

/// The style backend and its strength, as the `style*` params give them.
#[derive(Clone, Debug, PartialEq)]
pub struct StyleChoice {
    /// "wavelet" or "wct2".
    pub style: String,
    /// The WCT2 checkpoint folder (`style: wct2`).
    pub weights: Option<String>,
    pub alpha: f64,
    /// The wavelet transfer's Haar depth.
    pub levels: usize,
}

impl StyleChoice {
    pub fn from_ctx(ctx: &StageCtx) -> anyhow::Result<StyleChoice> {
        let weights: String = ctx.param("style_weights")?;
        Ok(StyleChoice {
            style: ctx.param("style")?,
            weights: (!weights.is_empty()).then_some(weights),
            alpha: ctx.param("style_alpha")?,
            levels: ctx.param("style_levels")?,
        })
    }

    /// Checks the params before anything runs (`StageKind::validate`): `(field, problem)`.
    pub fn validate(params: &Value) -> Result<(), (String, String)> {
        let alpha = params["style_alpha"].as_f64().unwrap_or(1.0);
        if !(0.0..=1.0).contains(&alpha) {
            return Err((
                "style_alpha".into(),
                format!("{alpha} is outside 0 to 1 (0: the content unchanged, 1: full transfer)"),
            ));
        }
        let levels = params["style_levels"].as_i64().unwrap_or(2);
        if !(1..=5).contains(&levels) {
            return Err((
                "style_levels".into(),
                format!("{levels} wavelet levels; expected 1 to 5"),
            ));
        }
        let weights = params["style_weights"].as_str().unwrap_or_default();
        if params["style"].as_str() == Some("wct2") && weights.is_empty() {
            return Err((
                "style_weights".into(),
                "style: wct2 needs the folder of the official WCT2 checkpoints \
                 (wave_encoder_cat5_l4.pth, wave_decoder_cat5_l4.pth)"
                    .into(),
            ));
        }
        Ok(())
    }

    /// A fingerprint of the WCT2 weights folder, so replaced checkpoints re-run the stage.
    pub fn fingerprint(params: &Value) -> anyhow::Result<Option<String>> {
        match (params["style"].as_str(), params["style_weights"].as_str()) {
            (Some("wct2"), Some(dir)) if !dir.is_empty() => Ok(Some(
                deeprepair_pipeline::kind::fingerprint_path(Path::new(dir))?,
            )),
            _ => Ok(None),
        }
    }

    /// The transfer itself (WCT2 loads its checkpoints here; every missing or mis-shaped
    /// tensor is named).
    pub fn build(&self) -> anyhow::Result<Box<dyn StyleTransfer>> {
        match self.style.as_str() {
            "wavelet" => Ok(Box::new(WaveletStyle {
                levels: self.levels,
                alpha: self.alpha as f32,
            })),
            "wct2" => {
                let dir = self
                    .weights
                    .as_deref()
                    .context("style: wct2 needs `style_weights`, the checkpoint folder")?;
                Ok(Box::new(wct2::Wct2Style::load(Path::new(dir), self.alpha)?))
            }
            other => anyhow::bail!("unknown style transfer {other:?}; expected wavelet or wct2"),
        }
    }
}

/// [`StyleChoice::from_ctx`] then [`StyleChoice::build`], as a stage error.
pub fn style_transfer_from_params(ctx: &StageCtx) -> Result<Box<dyn StyleTransfer>, StageError> {
    let choice = StyleChoice::from_ctx(ctx)?;
    choice.build().map_err(StageError::Fatal)
}

mod wct2 {
    //! WCT2 (`deeprepair_nn::wct2`, checked against a PyTorch twin) behind [`StyleTransfer`],
    //! on the CPU: batches are built on CPU threads, one stylization at a time per thread.
    use anyhow::Result;
    use deeprepair_repair::style_transfer::StyleTransfer;
    use deeprepair_repair::ImageRef;
    use std::path::Path;

    pub struct Wct2Style {
        model: deeprepair_nn::wct2::Wct2,
        alpha: f64,
    }

    impl Wct2Style {
        pub fn load(dir: &Path, alpha: f64) -> Result<Wct2Style> {
            let model = deeprepair_nn::wct2::Wct2::load(dir, &candle_core::Device::Cpu)
                .map_err(|e| anyhow::anyhow!("WCT2 weights in {}: {e}", dir.display()))?;
            Ok(Wct2Style { model, alpha })
        }
    }

    impl StyleTransfer for Wct2Style {
        fn name(&self) -> &'static str {
            "wct2"
        }
        fn stylize(&self, content: &ImageRef, reference: &ImageRef) -> Result<Vec<u8>> {
            anyhow::ensure!(
                content.width == reference.width && content.height == reference.height,
                "content {}×{} and reference {}×{} differ in size",
                content.width,
                content.height,
                reference.width,
                reference.height
            );
            Ok(self.model.stylize_u8(
                content.pixels,
                reference.pixels,
                content.width,
                content.height,
                self.alpha,
            )?)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn validate_names_the_field_and_what_was_expected() {
        let ok =
            json!({"style": "wavelet", "style_weights": "", "style_alpha": 0.5, "style_levels": 2});
        assert!(StyleChoice::validate(&ok).is_ok());
        let cases = [
            (json!({"style_alpha": 1.5}), "style_alpha", "outside 0 to 1"),
            (
                json!({"style_levels": 0}),
                "style_levels",
                "expected 1 to 5",
            ),
            (
                json!({"style": "wct2", "style_weights": ""}),
                "style_weights",
                "wave_encoder_cat5_l4.pth",
            ),
        ];
        for (params, field, problem) in cases {
            let (f, p) = StyleChoice::validate(&params).unwrap_err();
            assert_eq!(f, field);
            assert!(p.contains(problem), "{p}");
        }
    }

    #[test]
    fn wavelet_builds_with_the_given_strength_and_wct2_names_a_missing_folder() {
        let choice = StyleChoice {
            style: "wavelet".into(),
            weights: None,
            alpha: 0.0,
            levels: 3,
        };
        let t = choice.build().unwrap();
        assert_eq!(t.name(), "wavelet");
        let px: Vec<u8> = (0..8 * 8 * 3).map(|i| (i * 7 % 256) as u8).collect();
        let reference: Vec<u8> = px.iter().map(|v| 255 - v).collect();
        let img = |p: &'static [u8]| deeprepair_repair::ImageRef {
            pixels: p,
            width: 8,
            height: 8,
        };
        let px: &'static [u8] = Box::leak(px.into_boxed_slice());
        let reference: &'static [u8] = Box::leak(reference.into_boxed_slice());
        // alpha 0: the content unchanged.
        assert_eq!(t.stylize(&img(px), &img(reference)).unwrap(), px);
        let missing = StyleChoice {
            style: "wct2".into(),
            weights: Some("/nonexistent/wct2".into()),
            ..choice
        };
        let err = format!("{:#}", missing.build().err().unwrap());
        assert!(err.contains("/nonexistent/wct2"), "{err}");
        // No fingerprint for the wavelet transfer; a missing WCT2 folder is an error at plan.
        assert_eq!(
            StyleChoice::fingerprint(&json!({"style": "wavelet"})).unwrap(),
            None
        );
        assert!(StyleChoice::fingerprint(
            &json!({"style": "wct2", "style_weights": "/nonexistent"})
        )
        .is_err());
    }
}
