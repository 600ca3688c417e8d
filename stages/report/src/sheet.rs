//! Contact sheets: grids of RGB images, upscaled by nearest neighbour, with optional labels.

use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, VPos};

use crate::plots::{draw_err, encode_png, text, text_width};
use crate::ReportError;

const LABEL_SIZE: f64 = 12.0;
/// Largest sheet, in pixels.
const MAX_PIXELS: usize = 1 << 27;

/// Where [`contact_sheet`] puts things. Image `k` goes to row `k / cols`, column `k % cols`, its
/// top-left pixel at [`SheetLayout::origin`]; the sheet is white elsewhere.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SheetLayout {
    /// Whole sheet, pixels.
    pub width: usize,
    pub height: usize,
    /// Row-label margin on the left (0 without row labels).
    pub left: usize,
    /// Column-label margin on top (0 without column labels).
    pub top: usize,
    /// White pixels around and between cells.
    pub gap: usize,
    /// One upscaled image.
    pub cell_width: usize,
    pub cell_height: usize,
    pub cols: usize,
    pub rows: usize,
}

impl SheetLayout {
    /// The layout of `n` images of `width`×`height` in `cols` columns, upscaled by `scale`.
    pub fn new(
        n: usize,
        width: usize,
        height: usize,
        cols: usize,
        scale: usize,
        row_labels: &[String],
        col_labels: &[String],
    ) -> Result<SheetLayout, ReportError> {
        if n == 0 {
            return Err(ReportError::NoData(
                "no images for the contact sheet".into(),
            ));
        }
        if width == 0 || height == 0 || cols == 0 || scale == 0 {
            return Err(ReportError::InvalidInput(format!(
                "contact sheet: width {width}, height {height}, cols {cols}, scale {scale} must be > 0"
            )));
        }
        let cols = cols.min(n);
        let rows = n.div_ceil(cols);
        let too_big = || ReportError::InvalidInput("contact sheet too large".into());
        let cell_width = width.checked_mul(scale).ok_or_else(too_big)?;
        let cell_height = height.checked_mul(scale).ok_or_else(too_big)?;
        let gap = 2;
        let left = if row_labels.iter().take(rows).any(|s| !s.is_empty()) {
            let w = row_labels
                .iter()
                .take(rows)
                .map(|s| text_width(s, LABEL_SIZE) as usize)
                .max()
                .unwrap_or(0);
            w.min(300) + 12
        } else {
            0
        };
        let top = if col_labels.iter().take(cols).any(|s| !s.is_empty()) {
            20
        } else {
            0
        };
        let span = |count: usize, cell: usize| {
            cell.checked_add(gap)
                .and_then(|c| c.checked_mul(count))
                .and_then(|s| s.checked_add(gap))
        };
        let w = span(cols, cell_width)
            .and_then(|s| s.checked_add(left))
            .ok_or_else(too_big)?;
        let h = span(rows, cell_height)
            .and_then(|s| s.checked_add(top))
            .ok_or_else(too_big)?;
        if w.checked_mul(h).is_none_or(|p| p > MAX_PIXELS) {
            return Err(too_big());
        }
        Ok(SheetLayout {
            width: w,
            height: h,
            left,
            top,
            gap,
            cell_width,
            cell_height,
            cols,
            rows,
        })
    }

    /// Top-left pixel (x, y) of image `k`.
    pub fn origin(&self, k: usize) -> (usize, usize) {
        let (r, c) = (k / self.cols, k % self.cols);
        (
            self.left + self.gap + c * (self.cell_width + self.gap),
            self.top + self.gap + r * (self.cell_height + self.gap),
        )
    }
}

/// Shortens `s` with "…" until it fits in `max` pixels.
fn fit(s: &str, max: usize) -> String {
    if text_width(s, LABEL_SIZE) as usize <= max {
        return s.to_string();
    }
    let mut chars: Vec<char> = s.chars().collect();
    while !chars.is_empty() {
        chars.pop();
        let t: String = chars.iter().collect::<String>() + "…";
        if text_width(&t, LABEL_SIZE) as usize <= max {
            return t;
        }
    }
    String::new()
}

/// PNG grid of RGB HWC u8 images, all `width`×`height`, in `cols` columns, each upscaled by
/// `scale` (nearest neighbour) and placed as [`SheetLayout`] says; `row_labels[r]` left of row
/// `r`, `col_labels[c]` above column `c` (missing labels are blank; labels never overlap images).
pub fn contact_sheet(
    images: &[&[u8]],
    width: usize,
    height: usize,
    cols: usize,
    scale: usize,
    row_labels: &[String],
    col_labels: &[String],
) -> Result<Vec<u8>, ReportError> {
    let layout = SheetLayout::new(
        images.len(),
        width,
        height,
        cols,
        scale,
        row_labels,
        col_labels,
    )?;
    let expect = width * height * 3;
    if let Some((k, img)) = images.iter().enumerate().find(|(_, i)| i.len() != expect) {
        return Err(ReportError::InvalidInput(format!(
            "image {k} has {} bytes, expected {width}×{height}×3 = {expect}",
            img.len()
        )));
    }
    let (sw, sh) = (layout.width, layout.height);
    let mut buf = vec![255u8; sw * sh * 3];
    if layout.left > 0 || layout.top > 0 {
        let root = BitMapBackend::with_buffer(&mut buf, (sw as u32, sh as u32)).into_drawing_area();
        let black = RGBColor(0, 0, 0);
        for (r, label) in row_labels.iter().take(layout.rows).enumerate() {
            let (_, y) = layout.origin(r * layout.cols);
            let s = fit(label, layout.left.saturating_sub(8));
            let pos = (
                (layout.left - 4) as i32,
                (y + layout.cell_height / 2) as i32,
            );
            text(
                &root,
                &s,
                pos,
                LABEL_SIZE,
                black,
                (HPos::Right, VPos::Center),
            );
        }
        for (c, label) in col_labels.iter().take(layout.cols).enumerate() {
            let (x, _) = layout.origin(c);
            let s = fit(label, layout.cell_width + layout.gap);
            let pos = (
                (x + layout.cell_width / 2) as i32,
                (layout.top as i32 + layout.gap as i32) / 2,
            );
            text(
                &root,
                &s,
                pos,
                LABEL_SIZE,
                black,
                (HPos::Center, VPos::Center),
            );
        }
        root.present().map_err(draw_err)?;
    }
    // Images last, so that nothing drawn above can touch their pixels.
    for (k, img) in images.iter().enumerate() {
        let (ox, oy) = layout.origin(k);
        for y in 0..layout.cell_height {
            let src_row = &img[(y / scale) * width * 3..(y / scale + 1) * width * 3];
            let dst = ((oy + y) * sw + ox) * 3;
            let dst_row = &mut buf[dst..dst + layout.cell_width * 3];
            if scale == 1 {
                dst_row.copy_from_slice(src_row);
            } else {
                for (x, px) in dst_row.chunks_exact_mut(3).enumerate() {
                    let s = (x / scale) * 3;
                    px.copy_from_slice(&src_row[s..s + 3]);
                }
            }
        }
    }
    encode_png(sw as u32, sh as u32, &buf)
}
