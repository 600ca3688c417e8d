//! The image every augmentation takes: borrowed RGB pixels with their size.

/// An RGB image, HWC u8.
#[derive(Clone, Copy, Debug)]
pub struct ImageRef<'a> {
    pub pixels: &'a [u8],
    pub width: usize,
    pub height: usize,
}
