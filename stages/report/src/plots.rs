//! PNG figures: Fig. 2/3 (grouped bars), Fig. 4 (heat map), training curves.

use std::sync::OnceLock;

use plotters::coord::Shift;
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};
use plotters::style::{register_font, FontStyle};

use crate::names::{corruption_abbrev, MethodKey};
use crate::stats::{
    base_cell, corrupted_set, corruptions_where, failures_of, is_base, method_keys, repaired_cell,
    Stat,
};
use crate::{Record, ReportError};

pub(crate) const FONT: &str = "sans-serif";

/// Registers DejaVu Sans (embedded by the `dejavu` crate) as "sans-serif" for `ab_glyph`; false
/// if the font was refused, in which case figures are drawn without text.
pub(crate) fn fonts_ready() -> bool {
    static READY: OnceLock<bool> = OnceLock::new();
    *READY.get_or_init(|| {
        register_font(FONT, FontStyle::Normal, dejavu::sans::regular()).is_ok()
            && register_font(FONT, FontStyle::Bold, dejavu::sans::bold()).is_ok()
    })
}

pub(crate) fn draw_err<E: std::fmt::Display>(e: E) -> ReportError {
    ReportError::Draw(e.to_string())
}

/// 8-bit RGB PNG.
pub(crate) fn encode_png(width: u32, height: u32, rgb: &[u8]) -> Result<Vec<u8>, ReportError> {
    let mut out = Vec::new();
    {
        let mut enc = png::Encoder::new(&mut out, width, height);
        enc.set_color(png::ColorType::Rgb);
        enc.set_depth(png::BitDepth::Eight);
        enc.set_compression(png::Compression::Default);
        let mut w = enc.write_header()?;
        w.write_image_data(rgb)?;
        w.finish()?;
    }
    Ok(out)
}

/// Draws text; failures (no font) are ignored, so figures degrade to no text.
pub(crate) fn text<DB: DrawingBackend>(
    area: &DrawingArea<DB, Shift>,
    s: &str,
    pos: (i32, i32),
    size: f64,
    color: RGBColor,
    anchor: (HPos, VPos),
) {
    if !fonts_ready() || s.is_empty() {
        return;
    }
    let style = TextStyle::from((FONT, size).into_font())
        .color(&color)
        .pos(Pos::new(anchor.0, anchor.1));
    let _ = area.draw_text(s, &style, pos);
}

/// Width in pixels of `s` at `size`, estimated when no font is available.
pub(crate) fn text_width(s: &str, size: f64) -> u32 {
    if fonts_ready() {
        if let Ok((w, _)) = (FONT, size).into_font().box_size(s) {
            return w;
        }
    }
    (s.chars().count() as f64 * size * 0.6).ceil() as u32
}

/// Renders into an RGB buffer of `w`×`h` and encodes it.
fn render(
    w: u32,
    h: u32,
    draw: impl FnOnce(&DrawingArea<BitMapBackend<'_>, Shift>) -> Result<(), ReportError>,
) -> Result<Vec<u8>, ReportError> {
    fonts_ready();
    let mut buf = vec![255u8; w as usize * h as usize * 3];
    {
        let root = BitMapBackend::with_buffer(&mut buf, (w, h)).into_drawing_area();
        root.fill(&WHITE).map_err(draw_err)?;
        draw(&root)?;
        root.present().map_err(draw_err)?;
    }
    encode_png(w, h, &buf)
}

/// Tableau 10.
const PALETTE: [RGBColor; 10] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
    RGBColor(227, 119, 194),
    RGBColor(127, 127, 127),
    RGBColor(188, 189, 34),
    RGBColor(23, 190, 207),
];

/// Picks the row of `spec` ("method" or "method/variant") for `arch`: the exact variant when one
/// is named, else no variant, "cluster", "gmm", or the first variant.
fn resolve_method(records: &[Record], arch: &str, spec: &str) -> Option<MethodKey> {
    let want = MethodKey::parse(spec);
    let keys: Vec<MethodKey> = method_keys(records, arch)
        .into_iter()
        .filter(|k| k.method == want.method)
        .collect();
    if want.variant.is_some() {
        return keys.into_iter().find(|k| *k == want);
    }
    for pref in [None, Some("cluster"), Some("gmm")] {
        if let Some(k) = keys.iter().find(|k| k.variant.as_deref() == pref) {
            return Some(k.clone());
        }
    }
    keys.into_iter().next()
}

/// Fig. 2/3 for `arch`, with `deeprepair` as the repaired model (or, without deeprepair records,
/// the first repaired method in table order; with none, the base model alone as in Fig. 2).
pub fn plot_clean_vs_corrupted(records: &[Record], arch: &str) -> Result<Vec<u8>, ReportError> {
    let key = resolve_method(records, arch, "deeprepair")
        .or_else(|| method_keys(records, arch).into_iter().next());
    clean_vs_corrupted(records, arch, key)
}

/// Fig. 2/3 for `arch` and the repaired model `method` ("method" or "method/variant"):
/// per corruption k, bars for the base model on clean and on Dv_k, and for the model repaired
/// for k on clean and on Dv_k. `NoData` when `arch` has no such method.
pub fn plot_clean_vs_corrupted_for(
    records: &[Record],
    arch: &str,
    method: &str,
) -> Result<Vec<u8>, ReportError> {
    let key = resolve_method(records, arch, method)
        .ok_or_else(|| ReportError::NoData(format!("no `{method}` records for `{arch}`")))?;
    clean_vs_corrupted(records, arch, Some(key))
}

fn clean_vs_corrupted(
    records: &[Record],
    arch: &str,
    key: Option<MethodKey>,
) -> Result<Vec<u8>, ReportError> {
    let cs = corruptions_where(records, arch, |r| {
        if is_base(r) {
            corrupted_set(&r.eval_set).map(str::to_string)
        } else if key
            .as_ref()
            .is_some_and(|k| k.method == r.method && k.variant == r.variant)
        {
            r.repaired_for.clone()
        } else {
            None
        }
    });
    let base_clean = base_cell(records, arch, "clean");
    let groups: Vec<[Option<Stat>; 4]> = cs
        .iter()
        .map(|c| {
            let (rc, rk) = match &key {
                Some(k) => (
                    repaired_cell(records, arch, k, c, "clean"),
                    repaired_cell(records, arch, k, c, c),
                ),
                None => (None, None),
            };
            [base_clean, base_cell(records, arch, c), rc, rk]
        })
        .collect();
    if groups.iter().flatten().all(Option::is_none) {
        return Err(ReportError::NoData(format!(
            "no clean/corrupted accuracies for `{arch}`"
        )));
    }
    let label = key
        .as_ref()
        .map_or("repaired".to_string(), MethodKey::label);
    let names = [
        "base, clean".to_string(),
        "base, corrupted (Dv_k)".to_string(),
        format!("{label}, clean"),
        format!("{label}, corrupted (Dv_k)"),
    ];
    let colors = [
        RGBColor(230, 184, 0),
        RGBColor(64, 64, 64),
        RGBColor(44, 160, 44),
        RGBColor(214, 39, 40),
    ];
    let n = cs.len();
    let w = (110 + 72 * n as u32).clamp(640, 4000);
    let abbrevs: Vec<String> = cs.iter().map(|c| corruption_abbrev(c)).collect();
    let caption = format!("{arch}: accuracy on clean and corrupted data, base vs {label}");
    let shown: Vec<usize> = (0..4)
        .filter(|&s| groups.iter().any(|g| g[s].is_some()))
        .collect();
    // Legend below the chart: one row when it fits, else two per row.
    let entry_w: Vec<i32> = shown
        .iter()
        .map(|&s| text_width(&names[s], 12.0) as i32 + 34)
        .collect();
    let per_row = if entry_w.iter().sum::<i32>() + 20 <= w as i32 {
        shown.len().max(1)
    } else {
        2
    };
    let legend_rows = shown.len().div_ceil(per_row) as i32;
    let h = 450 + 22 * legend_rows as u32;
    render(w, h, |root| {
        let (upper, lower) = root.split_vertically(450);
        text(
            &upper,
            &caption,
            (w as i32 / 2, 16),
            17.0,
            BLACK,
            (HPos::Center, VPos::Center),
        );
        let mut chart = ChartBuilder::on(&upper)
            .margin(12)
            .margin_top(52)
            .x_label_area_size(40)
            .y_label_area_size(40)
            .build_cartesian_2d(-0.5f64..(n as f64 - 0.5), 0f64..100f64)
            .map_err(draw_err)?;
        let fmt = |x: &f64| {
            let r = x.round();
            if (x - r).abs() < 1e-6 && r >= 0.0 && (r as usize) < abbrevs.len() {
                abbrevs[r as usize].clone()
            } else {
                String::new()
            }
        };
        chart
            .configure_mesh()
            .disable_x_mesh()
            .x_labels(n + 1)
            .x_label_formatter(&fmt)
            .y_labels(11)
            .y_label_formatter(&|y: &f64| format!("{y:.0}"))
            .x_desc("Corruption k")
            .label_style((FONT, 13))
            .draw()
            .map_err(draw_err)?;
        let (px, py) = chart.plotting_area().get_base_pixel();
        text(
            &upper,
            "Accuracy (%)",
            (px - 36, py - 16),
            13.0,
            BLACK,
            (HPos::Left, VPos::Center),
        );
        let bar_w = 0.8 / 4.0;
        for &s in &shown {
            let bars: Vec<Rectangle<(f64, f64)>> = groups
                .iter()
                .enumerate()
                .filter_map(|(i, g)| {
                    let v = (g[s]?.mean * 100.0).clamp(0.0, 100.0);
                    let x0 = i as f64 - 0.4 + s as f64 * bar_w;
                    Some(Rectangle::new(
                        [(x0, 0.0), (x0 + bar_w * 0.92, v)],
                        colors[s].filled(),
                    ))
                })
                .collect();
            chart.draw_series(bars).map_err(draw_err)?;
        }
        for (row, chunk) in shown.chunks(per_row).enumerate() {
            let ws = &entry_w[row * per_row..row * per_row + chunk.len()];
            let mut x = (w as i32 - ws.iter().sum::<i32>()) / 2;
            let y = 11 + 22 * row as i32;
            for (&s, &ew) in chunk.iter().zip(ws) {
                lower
                    .draw(&Rectangle::new(
                        [(x, y - 6), (x + 14, y + 6)],
                        colors[s].filled(),
                    ))
                    .map_err(draw_err)?;
                text(
                    &lower,
                    &names[s],
                    (x + 20, y),
                    12.0,
                    BLACK,
                    (HPos::Left, VPos::Center),
                );
                x += ew;
            }
        }
        Ok(())
    })
}

/// Viridis, linearly interpolated between five anchors; `t` in [0, 1].
pub(crate) fn viridis(t: f64) -> RGBColor {
    const A: [(f64, [f64; 3]); 5] = [
        (0.0, [68.0, 1.0, 84.0]),
        (0.25, [59.0, 82.0, 139.0]),
        (0.5, [33.0, 145.0, 140.0]),
        (0.75, [94.0, 201.0, 98.0]),
        (1.0, [253.0, 231.0, 37.0]),
    ];
    let t = if t.is_finite() {
        t.clamp(0.0, 1.0)
    } else {
        0.0
    };
    let i = ((t * 4.0).floor() as usize).min(3);
    let (t0, c0) = A[i];
    let (t1, c1) = A[i + 1];
    let f = (t - t0) / (t1 - t0);
    let m = |k: usize| (c0[k] + (c1[k] - c0[k]) * f).round() as u8;
    RGBColor(m(0), m(1), m(2))
}

/// Fig. 4 for `arch` and `method` ("method" or "method/variant"): rows = corruption the model was
/// repaired for, columns = evaluation corruption, colour = accuracy (fixed 0–100 % viridis scale,
/// values printed in the cells). Uses the unseen-failure sets `failures:<c>` (De_k) or, when
/// those cover fewer cells, the corrupted sets Dv_k; the title says which.
pub fn plot_cross_corruption(
    records: &[Record],
    arch: &str,
    method: &str,
) -> Result<Vec<u8>, ReportError> {
    let key = resolve_method(records, arch, method)
        .ok_or_else(|| ReportError::NoData(format!("no `{method}` records for `{arch}`")))?;
    let mine = |r: &Record| r.method == key.method && r.variant == key.variant;
    let rows = corruptions_where(records, arch, |r| {
        if mine(r) {
            r.repaired_for.clone()
        } else {
            None
        }
    });
    let grid = |failures: bool| -> (Vec<String>, Vec<Vec<Option<Stat>>>, usize) {
        let cols = corruptions_where(records, arch, |r| {
            if !mine(r) {
                return None;
            }
            if failures {
                failures_of(&r.eval_set).map(str::to_string)
            } else {
                corrupted_set(&r.eval_set).map(str::to_string)
            }
        });
        let cells: Vec<Vec<Option<Stat>>> = rows
            .iter()
            .map(|rf| {
                cols.iter()
                    .map(|c| {
                        let set = if failures {
                            crate::failures_set(c)
                        } else {
                            c.clone()
                        };
                        repaired_cell(records, arch, &key, rf, &set)
                    })
                    .collect()
            })
            .collect();
        let count = cells.iter().flatten().filter(|c| c.is_some()).count();
        (cols, cells, count)
    };
    let (fc, fcells, fcount) = grid(true);
    let (dc, dcells, dcount) = grid(false);
    let (cols, cells, on) = if fcount >= dcount {
        (fc, fcells, "unseen failures De_k")
    } else {
        (dc, dcells, "corrupted test sets Dv_k")
    };
    if fcount.max(dcount) == 0 {
        return Err(ReportError::NoData(format!(
            "no cross-corruption accuracies for `{arch}`, `{method}`"
        )));
    }
    let row_names: Vec<String> = rows.iter().map(|c| corruption_abbrev(c)).collect();
    let col_names: Vec<String> = cols.iter().map(|c| corruption_abbrev(c)).collect();
    let cw = col_names
        .iter()
        .map(|s| text_width(s, 13.0) as i32 + 10)
        .chain([48])
        .max()
        .unwrap_or(48);
    let ch = 30i32;
    let label_w = row_names
        .iter()
        .map(|s| text_width(s, 13.0))
        .chain([text_width("repaired for", 12.0)])
        .max()
        .unwrap_or(0) as i32;
    let gx = 14 + label_w + 8;
    let gy = 62;
    let (nr, nc) = (rows.len() as i32, cols.len() as i32);
    let grid_h = nr * ch;
    let bar_h = grid_h.max(120);
    let title = format!("{arch}, {}: accuracy (%) on {on}", key.label());
    let w = (gx + nc * cw + 100).max(text_width(&title, 16.0) as i32 + 60);
    let h = gy + bar_h + 56;
    render(w as u32, h as u32, |root| {
        let black = RGBColor(0, 0, 0);
        text(
            root,
            &title,
            (w / 2, 16),
            16.0,
            black,
            (HPos::Center, VPos::Center),
        );
        text(
            root,
            "repaired for",
            (gx - 8, gy - 24),
            12.0,
            black,
            (HPos::Right, VPos::Center),
        );
        for (i, rn) in row_names.iter().enumerate() {
            let y = gy + i as i32 * ch + ch / 2;
            text(
                root,
                rn,
                (gx - 8, y),
                13.0,
                black,
                (HPos::Right, VPos::Center),
            );
        }
        for (j, cn) in col_names.iter().enumerate() {
            let x = gx + j as i32 * cw + cw / 2;
            text(
                root,
                cn,
                (x, gy - 10),
                13.0,
                black,
                (HPos::Center, VPos::Center),
            );
        }
        text(
            root,
            "evaluated on",
            (gx + nc * cw / 2, gy + grid_h + 16),
            12.0,
            black,
            (HPos::Center, VPos::Center),
        );
        for (i, row) in cells.iter().enumerate() {
            for (j, cell) in row.iter().enumerate() {
                let (x0, y0) = (gx + j as i32 * cw, gy + i as i32 * ch);
                let rect = [(x0, y0), (x0 + cw - 1, y0 + ch - 1)];
                match cell {
                    Some(s) => {
                        let c = viridis(s.mean);
                        root.draw(&Rectangle::new(rect, c.filled()))
                            .map_err(draw_err)?;
                        let lum = 0.299 * c.0 as f64 + 0.587 * c.1 as f64 + 0.114 * c.2 as f64;
                        let tc = if lum < 128.0 {
                            RGBColor(255, 255, 255)
                        } else {
                            black
                        };
                        text(
                            root,
                            &format!("{:.1}", s.mean * 100.0),
                            (x0 + cw / 2, y0 + ch / 2),
                            11.0,
                            tc,
                            (HPos::Center, VPos::Center),
                        );
                    }
                    None => {
                        root.draw(&Rectangle::new(rect, RGBColor(221, 221, 221).filled()))
                            .map_err(draw_err)?;
                    }
                }
            }
        }
        // Colour scale.
        let bx = gx + nc * cw + 24;
        for k in 0..bar_h {
            let t = 1.0 - k as f64 / (bar_h - 1).max(1) as f64;
            root.draw(&Rectangle::new(
                [(bx, gy + k), (bx + 16, gy + k + 1)],
                viridis(t).filled(),
            ))
            .map_err(draw_err)?;
        }
        root.draw(&Rectangle::new(
            [(bx - 1, gy - 1), (bx + 16, gy + bar_h)],
            black.stroke_width(1),
        ))
        .map_err(draw_err)?;
        for p in [0, 25, 50, 75, 100] {
            let y = gy + ((100 - p) as f64 / 100.0 * (bar_h - 1) as f64).round() as i32;
            root.draw(&PathElement::new(vec![(bx + 16, y), (bx + 20, y)], black))
                .map_err(draw_err)?;
            text(
                root,
                &p.to_string(),
                (bx + 22, y),
                11.0,
                black,
                (HPos::Left, VPos::Center),
            );
        }
        text(
            root,
            "%",
            (bx + 8, gy - 10),
            12.0,
            black,
            (HPos::Center, VPos::Center),
        );
        Ok(())
    })
}

/// Line chart of named series of (x, y) points (e.g. loss or accuracy per epoch), with a legend.
/// Non-finite points are dropped; `NoData` when no point is left.
pub fn plot_curve(
    series: &[(String, Vec<(f64, f64)>)],
    x_label: &str,
    y_label: &str,
) -> Result<Vec<u8>, ReportError> {
    let clean: Vec<(&str, Vec<(f64, f64)>)> = series
        .iter()
        .map(|(n, pts)| {
            let p: Vec<(f64, f64)> = pts
                .iter()
                .copied()
                .filter(|(x, y)| x.is_finite() && y.is_finite())
                .collect();
            (n.as_str(), p)
        })
        .filter(|(_, p)| !p.is_empty())
        .collect();
    if clean.is_empty() {
        return Err(ReportError::NoData("no finite points to plot".into()));
    }
    let range = |f: fn(&(f64, f64)) -> f64| {
        let (lo, hi) = clean
            .iter()
            .flat_map(|(_, p)| p.iter().map(f))
            .fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), v| {
                (a.min(v), b.max(v))
            });
        if hi - lo < 1e-12 {
            let d = if lo.abs() > 1e-9 {
                lo.abs() * 0.05
            } else {
                1.0
            };
            (lo - d, hi + d)
        } else {
            (lo, hi)
        }
    };
    let (x0, x1) = range(|p| p.0);
    let (y0, y1) = range(|p| p.1);
    let pad = (y1 - y0) * 0.05;
    let (y0, y1) = (y0 - pad, y1 + pad);
    render(800, 500, |root| {
        let mut chart = ChartBuilder::on(root)
            .margin(15)
            .margin_top(32)
            .x_label_area_size(45)
            .y_label_area_size(60)
            .build_cartesian_2d(x0..x1, y0..y1)
            .map_err(draw_err)?;
        chart
            .configure_mesh()
            .x_desc(x_label)
            .label_style((FONT, 13))
            .draw()
            .map_err(draw_err)?;
        // ab_glyph draws no rotated text, so the y label goes above the axis.
        let (px, py) = chart.plotting_area().get_base_pixel();
        text(
            root,
            y_label,
            (px - 50, py - 16),
            13.0,
            BLACK,
            (HPos::Left, VPos::Center),
        );
        let mut labelled = false;
        for (i, (name, pts)) in clean.iter().enumerate() {
            let c = PALETTE[i % PALETTE.len()];
            let style = c.stroke_width(2);
            let s = chart
                .draw_series(LineSeries::new(pts.iter().copied(), style))
                .map_err(draw_err)?;
            if !name.is_empty() {
                labelled = true;
                s.label(*name).legend(move |(x, y)| {
                    PathElement::new(vec![(x, y), (x + 16, y)], c.stroke_width(2))
                });
            }
            if pts.len() <= 60 {
                chart
                    .draw_series(pts.iter().map(|&p| Circle::new(p, 3, c.filled())))
                    .map_err(draw_err)?;
            }
        }
        if labelled {
            chart
                .configure_series_labels()
                .position(SeriesLabelPosition::UpperRight)
                .background_style(WHITE.mix(0.85))
                .border_style(BLACK)
                .label_font((FONT, 12))
                .draw()
                .map_err(draw_err)?;
        }
        Ok(())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn viridis_ends() {
        assert_eq!(viridis(0.0), RGBColor(68, 1, 84));
        assert_eq!(viridis(1.0), RGBColor(253, 231, 37));
        assert_eq!(viridis(f64::NAN), RGBColor(68, 1, 84));
        assert_eq!(viridis(0.5), RGBColor(33, 145, 140));
    }

    #[test]
    fn font_registers() {
        assert!(fonts_ready());
        assert!(text_width("GN", 13.0) > 5);
    }
}
