//! Tables 2 and 3 and the clean-vs-corrupted table, in Markdown, CSV and LaTeX.

use std::collections::BTreeSet;
use std::fmt::Write as _;

use crate::names::{corruption_abbrev, MethodKey};
use crate::stats::{
    archs, base_cell, corrupted_set, corruptions_where, failures_of, fmt_stat, is_base,
    method_keys, repaired_cell, Stat,
};
use crate::{Record, Tables};

const MD_PM: &str = " ± ";
const TEX_PM: &str = " $\\pm$ ";
const MD_MISSING: &str = "–";
const TEX_MISSING: &str = "--";

/// Escapes LaTeX's special characters in text mode (`_` → `\_`, `&` → `\&`, ...).
pub fn latex_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '\\' => out.push_str("\\textbackslash{}"),
            '&' | '%' | '$' | '#' | '_' | '{' | '}' => {
                out.push('\\');
                out.push(c);
            }
            '~' => out.push_str("\\textasciitilde{}"),
            '^' => out.push_str("\\textasciicircum{}"),
            _ => out.push(c),
        }
    }
    out
}

fn md_escape(s: &str) -> String {
    s.replace('|', "\\|")
}

/// CSV field, quoted when needed (RFC 4180).
fn csv_field(s: &str) -> String {
    if s.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s.to_string()
    }
}

fn csv_opt_f(x: Option<f64>) -> String {
    x.map(|v| format!("{v:.6}")).unwrap_or_default()
}

/// A method × corruption grid of one architecture.
struct Grid {
    arch: String,
    cols: Vec<String>,
    rows: Vec<GridRow>,
}

struct GridRow {
    label: String,
    key: MethodKey,
    cells: Vec<Option<Stat>>,
}

impl Grid {
    /// Per column, the best mean (rows with any value).
    fn best(&self) -> Vec<Option<f64>> {
        (0..self.cols.len())
            .map(|j| {
                self.rows
                    .iter()
                    .filter_map(|r| r.cells[j].map(|s| s.mean))
                    .fold(None, |acc: Option<f64>, m| {
                        Some(acc.map_or(m, |a| a.max(m)))
                    })
            })
            .collect()
    }
}

fn is_best(s: &Stat, best: Option<f64>) -> bool {
    best.is_some_and(|b| (s.mean - b).abs() <= 1e-12)
}

/// The cell of a grid row: De_k accuracy of the model repaired for `c` (base: unrepaired).
fn failure_cell(records: &[Record], arch: &str, key: &MethodKey, c: &str) -> Option<Stat> {
    let set = crate::failures_set(c);
    if key.method == "base" {
        base_cell(records, arch, &set)
    } else {
        repaired_cell(records, arch, key, c, &set)
    }
}

/// Grids over the `failures:<c>` sets, one per architecture, rows chosen by `keys`.
fn failure_grids(records: &[Record], keys: impl Fn(&str) -> Vec<(String, MethodKey)>) -> Vec<Grid> {
    let mut grids = Vec::new();
    for arch in archs(records) {
        let cols = corruptions_where(records, &arch, |r| {
            failures_of(&r.eval_set).map(str::to_string)
        });
        if cols.is_empty() {
            continue;
        }
        let rows: Vec<GridRow> = keys(&arch)
            .into_iter()
            .map(|(label, key)| GridRow {
                cells: cols
                    .iter()
                    .map(|c| failure_cell(records, &arch, &key, c))
                    .collect(),
                label,
                key,
            })
            .filter(|r| r.cells.iter().any(Option::is_some))
            .collect();
        if rows.is_empty() {
            continue;
        }
        grids.push(Grid { arch, cols, rows });
    }
    grids
}

fn has_base_failures(records: &[Record], arch: &str) -> bool {
    records
        .iter()
        .any(|r| r.arch == arch && is_base(r) && failures_of(&r.eval_set).is_some())
}

/// "Columns: GN = gaussian_noise, FG = fog." for the abbreviated columns used.
fn legend(cols: &[String]) -> Option<String> {
    let parts: Vec<String> = cols
        .iter()
        .filter_map(|c| {
            let a = corruption_abbrev(c);
            (a != *c).then(|| format!("{a} = {c}"))
        })
        .collect();
    (!parts.is_empty()).then(|| parts.join(", "))
}

/// The columns of all grids, in paper order, once each.
fn all_cols(grids: &[Grid]) -> Vec<String> {
    let mut names: Vec<String> = grids.iter().flat_map(|g| g.cols.clone()).collect();
    crate::names::sort_corruptions(&mut names);
    names
}

const GRID_CSV_HEADER: &str =
    "arch,method,variant,corruption,accuracy_mean,accuracy_std,seeds,images\n";

/// Renders grids (with one optional extra, unbolded row per grid from `extra`).
fn render_grids(
    grids: &[Grid],
    title: &str,
    intro: &str,
    latex_caption: &str,
    first_col: &str,
    extra: impl Fn(&Grid) -> Option<(String, String, Vec<Option<f64>>)>,
) -> Tables {
    let mut md = format!("## {title}\n\n{intro}\n");
    let mut csv = GRID_CSV_HEADER.to_string();
    let mut tex = format!("% {title}\n% Needs \\usepackage{{booktabs}}.\n");
    for g in grids {
        let best = g.best();
        let heads: Vec<String> = g.cols.iter().map(|c| corruption_abbrev(c)).collect();
        // How many seeds stand behind each number: said once when every cell has as many,
        // else next to each cell with fewer than the most.
        let seed_counts: BTreeSet<usize> = g
            .rows
            .iter()
            .flat_map(|r| r.cells.iter().flatten().map(|s| s.seeds))
            .collect();
        let most_seeds = seed_counts.last().copied().unwrap_or(0);
        // Markdown.
        let _ = write!(md, "\n### {}\n\n| {} |", md_escape(&g.arch), first_col);
        for h in &heads {
            let _ = write!(md, " {} |", md_escape(h));
        }
        md.push_str("\n| --- |");
        for _ in &heads {
            md.push_str(" ---: |");
        }
        md.push('\n');
        // LaTeX.
        let _ = write!(
            tex,
            "\n\\begin{{table}}[t]\n\\centering\n\\caption{{{} ({}).}}\n\\begin{{tabular}}{{l{}}}\n\\toprule\n{}",
            latex_caption,
            latex_escape(&g.arch),
            "r".repeat(heads.len()),
            first_col
        );
        for h in &heads {
            let _ = write!(tex, " & {}", latex_escape(h));
        }
        tex.push_str(" \\\\\n\\midrule\n");
        for row in &g.rows {
            let _ = write!(md, "| {} |", md_escape(&row.label));
            tex.push_str(&latex_escape(&row.label));
            for (j, cell) in row.cells.iter().enumerate() {
                match cell {
                    Some(s) => {
                        let (mut m, mut t) = (fmt_stat(s, MD_PM), fmt_stat(s, TEX_PM));
                        if s.seeds < most_seeds {
                            m.push_str(&format!(" (n={})", s.seeds));
                            t.push_str(&format!(" ($n={}$)", s.seeds));
                        }
                        if is_best(s, best[j]) {
                            let _ = write!(md, " **{m}** |");
                            let _ = write!(tex, " & \\textbf{{{t}}}");
                        } else {
                            let _ = write!(md, " {m} |");
                            let _ = write!(tex, " & {t}");
                        }
                        let _ = writeln!(
                            csv,
                            "{},{},{},{},{:.6},{},{},{}",
                            csv_field(&g.arch),
                            csv_field(&row.key.method),
                            csv_field(row.key.variant.as_deref().unwrap_or("")),
                            csv_field(&g.cols[j]),
                            s.mean,
                            csv_opt_f(s.std),
                            s.seeds,
                            s.images
                        );
                    }
                    None => {
                        let _ = write!(md, " {MD_MISSING} |");
                        let _ = write!(tex, " & {TEX_MISSING}");
                    }
                }
            }
            md.push('\n');
            tex.push_str(" \\\\\n");
        }
        if let Some((label, tex_label, vals)) = extra(g) {
            let _ = write!(md, "| {} |", md_escape(&label));
            tex.push_str("\\midrule\n");
            tex.push_str(&tex_label);
            for v in &vals {
                match v {
                    Some(d) => {
                        let _ = write!(md, " {:+.2} |", d * 100.0);
                        let _ = write!(tex, " & {:+.2}", d * 100.0);
                    }
                    None => {
                        let _ = write!(md, " {MD_MISSING} |");
                        let _ = write!(tex, " & {TEX_MISSING}");
                    }
                }
            }
            md.push('\n');
            tex.push_str(" \\\\\n");
        }
        tex.push_str("\\bottomrule\n\\end{tabular}\n\\end{table}\n");
        match seed_counts.len() {
            0 => {}
            1 => {
                let _ = writeln!(md, "\nSeeds behind every cell: {most_seeds}.");
            }
            _ => {
                let _ = writeln!(md, "\nSeeds per cell: {most_seeds} unless marked (n=…).");
            }
        }
    }
    if let Some(l) = legend(&all_cols(grids)) {
        let _ = write!(md, "\nColumns: {l}.\n");
        let _ = writeln!(tex, "% Columns: {l}.");
    }
    Tables {
        markdown: md,
        csv,
        latex: tex,
    }
}

fn no_data(title: &str, why: &str, csv_header: &str) -> Tables {
    Tables {
        markdown: format!("## {title}\n\n_No data: {why}_\n"),
        csv: csv_header.to_string(),
        latex: format!("% {title}\n% No data: {why}\n"),
    }
}

const T2_TITLE: &str = "Table 2: accuracy (%) on the unseen failures De_k";
const T2_INTRO: &str =
    "Accuracy (%) of the model repaired for corruption k on its unseen failures \
De_k (`failures:<k>`); `base` is the unrepaired model. Mean over seeds (± sample std with \
several seeds); best per column in bold.";

/// DeepRepair Table 2: per architecture, rows = methods (base, finetune, cutout, mixup, cutmix,
/// augmix, sensei, fsgmix, deeprepair, then the others alphabetically; a method with variants
/// has one row per variant), columns = corruptions (paper order, then alphabetical), cell =
/// accuracy on `failures:<c>` of the model repaired for `c`, mean over seeds (± std with more
/// than one), best per column bold in Markdown and LaTeX. CSV is long-form, fractions.
pub fn repair_table(records: &[Record]) -> Tables {
    let grids = failure_grids(records, |arch| {
        let mut keys = Vec::new();
        if has_base_failures(records, arch) {
            let k = MethodKey::parse("base");
            keys.push((k.label(), k));
        }
        for k in method_keys(records, arch) {
            keys.push((k.label(), k));
        }
        keys
    });
    if grids.is_empty() {
        return no_data(
            T2_TITLE,
            "no records on `failures:<corruption>` evaluation sets.",
            GRID_CSV_HEADER,
        );
    }
    render_grids(
        &grids,
        T2_TITLE,
        T2_INTRO,
        "Accuracy (\\%) of repaired models on the unseen failures $\\mathcal{D}_e^k$",
        "Method",
        |_| None,
    )
}

const T3_TITLE: &str = "Table 3: DeepRepair, uniform (no-cluster) vs cluster-guided sampling";
const T3_INTRO: &str = "Accuracy (%) of DeepRepair on the unseen failures De_k of the corruption \
it was repaired for, by failure-reference sampling variant; `base` is the unrepaired model. Mean \
over seeds (± sample std with several seeds); best per column in bold; with both variants, a last \
row gives the mean difference cluster − uniform in points.";

fn sampling_rank(v: Option<&str>) -> (usize, String) {
    match v {
        Some("uniform") => (0, String::new()),
        Some("cluster") => (1, String::new()),
        Some(o) => (2, o.to_string()),
        None => (3, String::new()),
    }
}

/// DeepRepair Table 3: per architecture, the `deeprepair` variants (uniform = "no-cluster",
/// cluster, then others) and base, per corruption, on `failures:<c>`; plus the difference
/// cluster − uniform when both exist (Markdown and LaTeX only).
pub fn sampling_table(records: &[Record]) -> Tables {
    let grids = failure_grids(records, |arch| {
        let mut keys = Vec::new();
        if has_base_failures(records, arch) {
            let k = MethodKey::parse("base");
            keys.push((k.label(), k));
        }
        let mut dr: Vec<MethodKey> = method_keys(records, arch)
            .into_iter()
            .filter(|k| k.method == "deeprepair")
            .collect();
        dr.sort_by_key(|k| sampling_rank(k.variant.as_deref()));
        for k in dr {
            let label = match k.variant.as_deref() {
                Some("uniform") => "uniform (no-cluster)".to_string(),
                Some(v) => v.to_string(),
                None => "deeprepair".to_string(),
            };
            keys.push((label, k));
        }
        keys
    });
    let grids: Vec<Grid> = grids
        .into_iter()
        .filter(|g| g.rows.iter().any(|r| r.key.method == "deeprepair"))
        .collect();
    if grids.is_empty() {
        return no_data(
            T3_TITLE,
            "no `deeprepair` records on `failures:<corruption>` evaluation sets.",
            GRID_CSV_HEADER,
        );
    }
    render_grids(
        &grids,
        T3_TITLE,
        T3_INTRO,
        "DeepRepair with uniform vs cluster-guided sampling: accuracy (\\%) on $\\mathcal{D}_e^k$",
        "Sampling",
        |g| {
            let find = |v: &str| {
                g.rows
                    .iter()
                    .find(|r| r.key.method == "deeprepair" && r.key.variant.as_deref() == Some(v))
            };
            let (u, c) = (find("uniform")?, find("cluster")?);
            let d = u
                .cells
                .iter()
                .zip(&c.cells)
                .map(|(a, b)| Some(b.as_ref()?.mean - a.as_ref()?.mean))
                .collect();
            Some((
                "Δ cluster − uniform".to_string(),
                "$\\Delta$ cluster $-$ uniform".to_string(),
                d,
            ))
        },
    )
}

const CVC_TITLE: &str = "Clean vs corrupted accuracy (%) before and after repair";
const CVC_INTRO: &str = "Per corruption k and repair method: accuracy (%) on the clean test set \
and on Dv_k (all severities of k) of the unrepaired model (base) and of the model repaired for \
k, and the change in points. Mean over seeds (± sample std with several seeds).";
const CVC_CSV_HEADER: &str = "arch,corruption,method,variant,base_clean_mean,base_clean_std,\
base_corrupted_mean,base_corrupted_std,repaired_clean_mean,repaired_clean_std,\
repaired_corrupted_mean,repaired_corrupted_std\n";

struct CvcRow {
    corruption: String,
    key: Option<MethodKey>,
    cells: [Option<Stat>; 4],
}

/// Per architecture, corruption and repair method: clean and `Dv_k` accuracy of the base model
/// and of the model repaired for `k`, with the changes (Fig. 2/3 as a table).
pub fn clean_vs_corrupted_table(records: &[Record]) -> Tables {
    let mut per_arch: Vec<(String, Vec<CvcRow>)> = Vec::new();
    for arch in archs(records) {
        let cs = corruptions_where(records, &arch, |r| {
            if is_base(r) {
                corrupted_set(&r.eval_set).map(str::to_string)
            } else {
                r.repaired_for.clone()
            }
        });
        let base_clean = base_cell(records, &arch, "clean");
        let keys = method_keys(records, &arch);
        let mut rows = Vec::new();
        for c in cs {
            let base_c = base_cell(records, &arch, &c);
            let mut any = false;
            for k in &keys {
                let rc = repaired_cell(records, &arch, k, &c, "clean");
                let rk = repaired_cell(records, &arch, k, &c, &c);
                if rc.is_some() || rk.is_some() {
                    any = true;
                    rows.push(CvcRow {
                        corruption: c.clone(),
                        key: Some(k.clone()),
                        cells: [base_clean, base_c, rc, rk],
                    });
                }
            }
            if !any && base_c.is_some() {
                rows.push(CvcRow {
                    corruption: c.clone(),
                    key: None,
                    cells: [base_clean, base_c, None, None],
                });
            }
        }
        if !rows.is_empty() {
            per_arch.push((arch, rows));
        }
    }
    if per_arch.is_empty() {
        return no_data(
            CVC_TITLE,
            "no records on corrupted (`<corruption>`) evaluation sets.",
            CVC_CSV_HEADER,
        );
    }
    let mut md = format!("## {CVC_TITLE}\n\n{CVC_INTRO}\n");
    let mut csv = CVC_CSV_HEADER.to_string();
    let mut tex = format!("% {CVC_TITLE}\n% Needs \\usepackage{{booktabs}}.\n");
    let delta = |a: Option<Stat>, b: Option<Stat>| Some(b?.mean - a?.mean);
    for (arch, rows) in &per_arch {
        let _ = write!(
            md,
            "\n### {}\n\n| Corruption | Method | Base clean | Base Dv_k | Repaired clean | \
Repaired Dv_k | Δ clean | Δ Dv_k |\n| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |\n",
            md_escape(arch)
        );
        let _ = write!(
            tex,
            "\n\\begin{{table}}[t]\n\\centering\n\\caption{{Clean and corrupted accuracy (\\%) \
before and after repair ({}).}}\n\\begin{{tabular}}{{llrrrrrr}}\n\\toprule\n & & \
\\multicolumn{{2}}{{c}}{{Base}} & \\multicolumn{{2}}{{c}}{{Repaired}} & \
\\multicolumn{{2}}{{c}}{{$\\Delta$}} \\\\\nCorruption & Method & clean & $\\mathcal{{D}}_v^k$ & \
clean & $\\mathcal{{D}}_v^k$ & clean & $\\mathcal{{D}}_v^k$ \\\\\n\\midrule\n",
            latex_escape(arch)
        );
        for row in rows {
            let label = row
                .key
                .as_ref()
                .map(MethodKey::label)
                .unwrap_or_else(|| MD_MISSING.to_string());
            let tex_label = row
                .key
                .as_ref()
                .map(|k| latex_escape(&k.label()))
                .unwrap_or_else(|| TEX_MISSING.to_string());
            let _ = write!(
                md,
                "| {} | {} |",
                md_escape(&row.corruption),
                md_escape(&label)
            );
            let _ = write!(tex, "{} & {}", latex_escape(&row.corruption), tex_label);
            for cell in &row.cells {
                match cell {
                    Some(s) => {
                        let _ = write!(md, " {} |", fmt_stat(s, MD_PM));
                        let _ = write!(tex, " & {}", fmt_stat(s, TEX_PM));
                    }
                    None => {
                        let _ = write!(md, " {MD_MISSING} |");
                        let _ = write!(tex, " & {TEX_MISSING}");
                    }
                }
            }
            let [bc, bk, rc, rk] = row.cells;
            for d in [delta(bc, rc), delta(bk, rk)] {
                match d {
                    Some(d) => {
                        let _ = write!(md, " {:+.2} |", d * 100.0);
                        let _ = write!(tex, " & {:+.2}", d * 100.0);
                    }
                    None => {
                        let _ = write!(md, " {MD_MISSING} |");
                        let _ = write!(tex, " & {TEX_MISSING}");
                    }
                }
            }
            md.push('\n');
            tex.push_str(" \\\\\n");
            let _ = write!(
                csv,
                "{},{},{},{}",
                csv_field(arch),
                csv_field(&row.corruption),
                csv_field(row.key.as_ref().map_or("", |k| k.method.as_str())),
                csv_field(
                    row.key
                        .as_ref()
                        .and_then(|k| k.variant.as_deref())
                        .unwrap_or("")
                ),
            );
            for cell in &row.cells {
                let _ = write!(
                    csv,
                    ",{},{}",
                    csv_opt_f(cell.map(|s| s.mean)),
                    csv_opt_f(cell.and_then(|s| s.std))
                );
            }
            csv.push('\n');
        }
        tex.push_str("\\bottomrule\n\\end{tabular}\n\\end{table}\n");
    }
    Tables {
        markdown: md,
        csv,
        latex: tex,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(
        method: &str,
        variant: Option<&str>,
        rf: Option<&str>,
        eval: &str,
        seed: u64,
        acc: f64,
    ) -> Record {
        Record {
            arch: "tiny-cnn".into(),
            method: method.into(),
            variant: variant.map(Into::into),
            repaired_for: rf.map(Into::into),
            eval_set: eval.into(),
            seed,
            accuracy: acc,
            n: 100,
        }
    }

    /// 2 methods × 2 corruptions; deeprepair on gaussian_noise has two seeds.
    fn two_by_two() -> Vec<Record> {
        vec![
            rec("deeprepair", None, Some("fog"), "failures:fog", 0, 0.45),
            rec(
                "augmix",
                None,
                Some("gaussian_noise"),
                "failures:gaussian_noise",
                0,
                0.30,
            ),
            rec("augmix", None, Some("fog"), "failures:fog", 0, 0.50),
            rec(
                "deeprepair",
                None,
                Some("gaussian_noise"),
                "failures:gaussian_noise",
                0,
                0.40,
            ),
            rec(
                "deeprepair",
                None,
                Some("gaussian_noise"),
                "failures:gaussian_noise",
                1,
                0.60,
            ),
            // Cross-corruption and clean results are not Table 2 cells.
            rec(
                "deeprepair",
                None,
                Some("fog"),
                "failures:gaussian_noise",
                0,
                0.99,
            ),
            rec("augmix", None, Some("fog"), "clean", 0, 0.99),
        ]
    }

    #[test]
    fn table2_exact_markdown_and_csv() {
        let t = repair_table(&two_by_two());
        assert!(t
            .markdown
            .starts_with("## Table 2: accuracy (%) on the unseen failures De_k\n\n"));
        let tail = "\n### tiny-cnn\n\n\
| Method | GN | FG |\n\
| --- | ---: | ---: |\n\
| augmix | 30.00 (n=1) | **50.00 (n=1)** |\n\
| deeprepair | **50.00 ± 14.14** | 45.00 (n=1) |\n\
\nSeeds per cell: 2 unless marked (n=…).\n\
\nColumns: GN = gaussian_noise, FG = fog.\n";
        assert!(t.markdown.ends_with(tail), "{}", t.markdown);
        assert_eq!(
            t.csv,
            "arch,method,variant,corruption,accuracy_mean,accuracy_std,seeds,images\n\
tiny-cnn,augmix,,gaussian_noise,0.300000,,1,100\n\
tiny-cnn,augmix,,fog,0.500000,,1,100\n\
tiny-cnn,deeprepair,,gaussian_noise,0.500000,0.141421,2,200\n\
tiny-cnn,deeprepair,,fog,0.450000,,1,100\n"
        );
        assert!(t
            .latex
            .contains("\\begin{tabular}{lrr}\n\\toprule\nMethod & GN & FG \\\\\n\\midrule\n"));
        assert!(
            t.latex
                .contains("augmix & 30.00 ($n=1$) & \\textbf{50.00 ($n=1$)} \\\\\n"),
            "{}",
            t.latex
        );
        assert!(t
            .latex
            .contains("deeprepair & \\textbf{50.00 $\\pm$ 14.14} & 45.00 ($n=1$) \\\\\n"));
    }

    #[test]
    fn table2_row_order_variants_ties_and_missing() {
        let mut rs = vec![
            rec("zeta", None, Some("fog"), "failures:fog", 0, 0.5),
            rec(
                "deeprepair",
                Some("uniform"),
                Some("fog"),
                "failures:fog",
                0,
                0.5,
            ),
            rec(
                "deeprepair",
                Some("cluster"),
                Some("fog"),
                "failures:fog",
                0,
                0.2,
            ),
            rec("base", None, None, "failures:fog", 0, 0.0),
            rec("base", None, None, "failures:snow", 0, 0.0),
            rec("finetune", None, Some("snow"), "failures:snow", 0, 0.1),
        ];
        rs.push(rec(
            "finetune",
            None,
            Some("snow"),
            "failures:snow",
            0,
            f64::NAN,
        ));
        let t = repair_table(&rs);
        let rows: Vec<&str> = t
            .markdown
            .lines()
            .filter(|l| {
                l.starts_with("| ") && !l.starts_with("| Method") && !l.starts_with("| ---")
            })
            .collect();
        assert_eq!(
            rows,
            [
                "| base | 0.00 | 0.00 |",
                "| finetune | **10.00** | – |",
                "| deeprepair (cluster) | – | 20.00 |",
                "| deeprepair (uniform) | – | **50.00** |",
                "| zeta | – | **50.00** |",
            ]
        );
        assert!(t.markdown.contains("| Method | SW | FG |"));
    }

    #[test]
    fn latex_escapes_underscores_and_specials() {
        assert_eq!(latex_escape("a_b"), "a\\_b");
        assert_eq!(
            latex_escape("50% & $x# {y} ~ ^ \\"),
            "50\\% \\& \\$x\\# \\{y\\} \\textasciitilde{} \\textasciicircum{} \\textbackslash{}"
        );
        let mut r = rec(
            "my_method",
            None,
            Some("my_corruption"),
            "failures:my_corruption",
            0,
            0.5,
        );
        r.arch = "wrn_40_2".into();
        let t = repair_table(&[r]);
        assert!(
            t.latex.contains("my\\_method & \\textbf{50.00}"),
            "{}",
            t.latex
        );
        assert!(t.latex.contains("Method & my\\_corruption \\\\"));
        assert!(t.latex.contains("(wrn\\_40\\_2)"));
        assert!(!t.latex.contains("my_method"));
        // Markdown keeps names as they are.
        assert!(t.markdown.contains("| my_method | **50.00** |"));
    }

    #[test]
    fn table3_uniform_vs_cluster() {
        let rs = vec![
            rec("base", None, None, "failures:fog", 0, 0.0),
            rec(
                "deeprepair",
                Some("cluster"),
                Some("fog"),
                "failures:fog",
                0,
                0.60,
            ),
            rec(
                "deeprepair",
                Some("uniform"),
                Some("fog"),
                "failures:fog",
                0,
                0.55,
            ),
            rec("augmix", None, Some("fog"), "failures:fog", 0, 0.9),
        ];
        let t = sampling_table(&rs);
        let rows: Vec<&str> = t
            .markdown
            .lines()
            .filter(|l| l.starts_with("| ") && !l.starts_with("| ---"))
            .collect();
        assert_eq!(
            rows,
            [
                "| Sampling | FG |",
                "| base | 0.00 |",
                "| uniform (no-cluster) | 55.00 |",
                "| cluster | **60.00** |",
                "| Δ cluster − uniform | +5.00 |",
            ]
        );
        assert!(t
            .latex
            .contains("$\\Delta$ cluster $-$ uniform & +5.00 \\\\"));
        assert_eq!(t.csv.lines().count(), 4);
        // Without deeprepair: no table.
        let t = sampling_table(&rs[3..]);
        assert!(t.markdown.contains("_No data:"));
        assert_eq!(t.csv, GRID_CSV_HEADER);
    }

    #[test]
    fn clean_vs_corrupted_rows() {
        let rs = vec![
            rec("base", None, None, "clean", 0, 0.90),
            rec("base", None, None, "fog", 0, 0.60),
            rec("base", None, None, "snow", 0, 0.70),
            rec("deeprepair", None, Some("fog"), "clean", 0, 0.89),
            rec("deeprepair", None, Some("fog"), "fog", 0, 0.80),
        ];
        let t = clean_vs_corrupted_table(&rs);
        let rows: Vec<&str> = t
            .markdown
            .lines()
            .filter(|l| {
                l.starts_with("| ") && !l.starts_with("| Corruption") && !l.starts_with("| ---")
            })
            .collect();
        assert_eq!(
            rows,
            [
                "| snow | – | 90.00 | 70.00 | – | – | – | – |",
                "| fog | deeprepair | 90.00 | 60.00 | 89.00 | 80.00 | -1.00 | +20.00 |",
            ]
        );
        assert_eq!(
            t.csv.lines().nth(2),
            Some("tiny-cnn,fog,deeprepair,,0.900000,,0.600000,,0.890000,,0.800000,")
        );
        assert!(t
            .latex
            .contains("fog & deeprepair & 90.00 & 60.00 & 89.00 & 80.00 & -1.00 & +20.00 \\\\"));
    }

    #[test]
    fn empty_inputs_give_notes() {
        for t in [
            repair_table(&[]),
            sampling_table(&[]),
            clean_vs_corrupted_table(&[]),
        ] {
            assert!(t.markdown.contains("_No data:"), "{}", t.markdown);
            assert_eq!(t.csv.lines().count(), 1);
            assert!(t.latex.contains("% No data:"));
        }
        // Records without any failures set: Table 2 is empty, the clean table is not.
        let rs = [rec("base", None, None, "fog", 0, 0.5)];
        assert!(repair_table(&rs).markdown.contains("_No data:"));
        assert!(clean_vs_corrupted_table(&rs)
            .markdown
            .contains("| fog | – |"));
    }

    #[test]
    fn csv_quotes() {
        assert_eq!(csv_field("a,b"), "\"a,b\"");
        assert_eq!(csv_field("say \"hi\""), "\"say \"\"hi\"\"\"");
        assert_eq!(csv_field("plain"), "plain");
    }
}
