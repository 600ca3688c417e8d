//! Building blocks of the repair methods that do not train anything themselves:
//! - [`augmix_ops`]: AugMix's nine operations (byte-identical to Pillow) and its mixing;
//! - [`cutout`], [`mix`] (Mixup, CutMix), [`sensei`] (SENSEI's GA over natural transforms):
//!   the baseline augmentations, model-free (SENSEI reaches the model through a callback);
//! - [`fsgmix_ops`]: FSGMix's seven operations and Augment(I, w);
//! - [`style_transfer`]: the style operations O^c behind a trait, with a weight-free default;
//! - [`reference_sampling`]: which collected failure image guides a style operation
//!   (DeepRepair Eq. 3–5: uniform, or k-means clusters with distance-based probabilities);
//! - [`weight_distribution`]: FSGMix's distributions over operation-mixing weights (a GMM fitted
//!   by EM, independent normals, or one fixed vector).

pub mod augmix_ops;
pub mod cutout;
pub mod fsgmix_ops;
pub mod image;
pub mod mix;
pub mod reference_sampling;
pub mod sensei;
pub mod style_transfer;
pub mod weight_distribution;

pub use image::ImageRef;
