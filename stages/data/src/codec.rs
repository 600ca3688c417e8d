//! PNG encoding and PNG/JPEG decoding to RGB8.

use image::ImageEncoder;

use crate::DataError;

/// Encodes `height x width` RGB8 pixels (row-major HWC) as PNG bytes.
pub fn encode_png(pixels: &[u8], width: usize, height: usize) -> Result<Vec<u8>, DataError> {
    let expected = width
        .checked_mul(height)
        .and_then(|p| p.checked_mul(3))
        .ok_or_else(|| DataError::Image(format!("image size {width}x{height} overflows")))?;
    if width == 0 || height == 0 {
        return Err(DataError::Image(format!(
            "cannot encode an empty {width}x{height} image"
        )));
    }
    if pixels.len() != expected {
        return Err(DataError::Image(format!(
            "{} pixel bytes, expected {expected} for a {width}x{height} RGB image",
            pixels.len()
        )));
    }
    let (w, h) = match (u32::try_from(width), u32::try_from(height)) {
        (Ok(w), Ok(h)) => (w, h),
        _ => {
            return Err(DataError::Image(format!(
                "image size {width}x{height} is too large for PNG"
            )))
        }
    };
    let mut out = Vec::new();
    image::codecs::png::PngEncoder::new(&mut out)
        .write_image(pixels, w, h, image::ExtendedColorType::Rgb8)
        .map_err(|e| DataError::Image(format!("PNG encoding failed: {e}")))?;
    Ok(out)
}

/// Decodes PNG or JPEG bytes (format detected from the content) to RGB8 pixels.
/// Returns `(pixels, width, height)`; grey or alpha images are converted to RGB.
pub fn decode_image(bytes: &[u8]) -> Result<(Vec<u8>, usize, usize), DataError> {
    let format = image::guess_format(bytes).map_err(|_| {
        DataError::Image("not a PNG or JPEG image (unrecognized header bytes)".into())
    })?;
    if !matches!(format, image::ImageFormat::Png | image::ImageFormat::Jpeg) {
        return Err(DataError::Image(format!(
            "unsupported image format {format:?}, expected PNG or JPEG"
        )));
    }
    let img = image::load_from_memory_with_format(bytes, format)
        .map_err(|e| DataError::Image(format!("cannot decode {format:?} image: {e}")))?;
    let rgb = img.to_rgb8();
    let (w, h) = (rgb.width() as usize, rgb.height() as usize);
    Ok((rgb.into_raw(), w, h))
}
