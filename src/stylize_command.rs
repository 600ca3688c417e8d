//! `deeprepair stylize`: one style operation on two image files, so a person can see what
//! DeepRepair's style ops do to a training image with a failure image as reference.

use crate::commands::write_atomically;
use crate::ml_commands::{emit, read_image, UsageError};
use clap::Args;
use deeprepair_data::encode_png;
use deeprepair_repair::ImageRef;
use deeprepair_stages::style::StyleChoice;
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Args)]
pub struct StylizeArgs {
    /// The style transfer: the weight-free `wavelet` (the default of the `deeprepair` stage) or
    /// `wct2` (needs --weights).
    #[arg(long, default_value = "wavelet", value_parser = ["wavelet", "wct2"])]
    style: String,
    /// With --style wct2: the folder holding wave_encoder_cat5_l4.pth and
    /// wave_decoder_cat5_l4.pth (WCT2's official checkpoints).
    #[arg(long, value_name = "DIR")]
    weights: Option<PathBuf>,
    /// Style strength: 1 full transfer, 0 the content unchanged.
    #[arg(long, default_value_t = 1.0)]
    alpha: f64,
    /// With --style wavelet: the Haar decomposition depth.
    #[arg(long, default_value_t = 2)]
    levels: usize,
    /// The image to stylize (PNG or JPEG).
    #[arg(value_name = "CONTENT")]
    content: PathBuf,
    /// The image whose style is carried over (a collected failure), the same size.
    #[arg(value_name = "REFERENCE")]
    reference: PathBuf,
    /// Where to write the stylized image (PNG).
    #[arg(value_name = "OUT.png")]
    output: PathBuf,
}

pub fn stylize(args: StylizeArgs) -> anyhow::Result<ExitCode> {
    let params = serde_json::json!({
        "style": args.style,
        "style_weights": args.weights.as_ref().map(|p| p.display().to_string()).unwrap_or_default(),
        "style_alpha": args.alpha,
        "style_levels": args.levels,
    });
    StyleChoice::validate(&params).map_err(|(field, problem)| {
        let flag = match field.as_str() {
            "style_weights" => "--weights",
            "style_alpha" => "--alpha",
            "style_levels" => "--levels",
            _ => "--style",
        };
        UsageError(format!("{flag}: {problem}"))
    })?;
    crate::ml_commands::require_png(&args.output)?;
    let (content, w, h) = read_image(&args.content, "content")?;
    let (reference, rw, rh) = read_image(&args.reference, "reference")?;
    if (w, h) != (rw, rh) {
        return Err(UsageError(format!(
            "the content {} is {w}×{h} and the reference {} is {rw}×{rh}: give two images of one \
             size (as the style ops see them: a training image and a collected failure)",
            args.content.display(),
            args.reference.display()
        ))
        .into());
    }
    let transfer = StyleChoice {
        style: args.style.clone(),
        weights: args.weights.as_ref().map(|p| p.display().to_string()),
        alpha: args.alpha,
        levels: args.levels,
    }
    .build()?;
    let image = |pixels| ImageRef {
        pixels,
        width: w,
        height: h,
    };
    let out = transfer.stylize(&image(&content), &image(&reference))?;
    write_atomically(&args.output, &encode_png(&out, w, h)?)?;
    emit(&format!("{}\n", args.output.display()))?;
    Ok(ExitCode::SUCCESS)
}
