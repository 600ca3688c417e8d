//! The report folder.

use std::collections::{BTreeSet, HashSet};
use std::fmt::Write as _;
use std::io::Write as _;
use std::path::{Path, PathBuf};

use crate::names::slug;
use crate::plots::{plot_clean_vs_corrupted, plot_cross_corruption};
use crate::stats::{archs, method_keys};
use crate::tables::{clean_vs_corrupted_table, repair_table, sampling_table};
use crate::{Record, ReportError, Tables};

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> ReportError + '_ {
    move |source| ReportError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Files staged in memory, written to a temporary folder, then renamed into place one by one.
struct Staged {
    files: Vec<(String, Vec<u8>)>,
    used: HashSet<String>,
}

impl Staged {
    /// Adds a file; a name already taken gets "-2", "-3"... before its extension.
    fn add(&mut self, name: &str, bytes: Vec<u8>) -> String {
        let mut n = name.to_string();
        let mut i = 2;
        while self.used.contains(&n) {
            n = match name.rsplit_once('.') {
                Some((stem, ext)) => format!("{stem}-{i}.{ext}"),
                None => format!("{name}-{i}"),
            };
            i += 1;
        }
        self.used.insert(n.clone());
        self.files.push((n.clone(), bytes));
        n
    }

    fn add_tables(&mut self, stem: &str, t: &Tables) -> [String; 3] {
        [
            self.add(&format!("{stem}.md"), t.markdown.clone().into_bytes()),
            self.add(&format!("{stem}.csv"), t.csv.clone().into_bytes()),
            self.add(&format!("{stem}.tex"), t.latex.clone().into_bytes()),
        ]
    }
}

fn write_file(path: &Path, bytes: &[u8]) -> Result<(), ReportError> {
    let mut f = std::fs::File::create(path).map_err(io_err(path))?;
    f.write_all(bytes).map_err(io_err(path))?;
    f.sync_all().map_err(io_err(path))
}

/// Writes the whole report into `dir` (created if missing): `table2.{md,csv,tex}`,
/// `table3.*`, `clean_vs_corrupted.*`, per architecture `fig_clean_vs_corrupted_<arch>.png`
/// and per repaired method `fig_cross_<arch>_<method>.png` (`<method>-<variant>` for methods
/// with variants; figures without data are skipped and listed as notes), `records.json`, and
/// `report.md` linking them. Every file is first written under a temporary folder inside `dir`
/// and then renamed over its final name, so readers never see a half-written file. Returns the
/// paths written, `report.md` last.
pub fn write_report(records: &[Record], dir: &Path) -> Result<Vec<PathBuf>, ReportError> {
    std::fs::create_dir_all(dir).map_err(io_err(dir))?;
    let mut st = Staged {
        files: Vec::new(),
        used: HashSet::new(),
    };
    let t2 = repair_table(records);
    let t3 = sampling_table(records);
    let cvc = clean_vs_corrupted_table(records);
    let tp = crate::paired::paired_table(records);
    let f2 = st.add_tables("table2", &t2);
    let f3 = st.add_tables("table3", &t3);
    let fc = st.add_tables("clean_vs_corrupted", &cvc);
    let fp = st.add_tables("paired_vs_augmix", &tp);

    let mut notes: Vec<String> = Vec::new();
    let mut figures: Vec<(String, Vec<(String, String)>)> = Vec::new();
    for arch in archs(records) {
        let mut figs = Vec::new();
        match plot_clean_vs_corrupted(records, &arch) {
            Ok(png) => {
                let name = st.add(&format!("fig_clean_vs_corrupted_{}.png", slug(&arch)), png);
                figs.push((
                    format!("{arch}: clean vs corrupted, before/after repair"),
                    name,
                ));
            }
            Err(e) => notes.push(format!("`{arch}`: no clean-vs-corrupted figure ({e}).")),
        }
        for key in method_keys(records, &arch) {
            let spec = match &key.variant {
                Some(v) => format!("{}/{}", key.method, v),
                None => key.method.clone(),
            };
            match plot_cross_corruption(records, &arch, &spec) {
                Ok(png) => {
                    let name = st.add(
                        &format!("fig_cross_{}_{}.png", slug(&arch), key.slug()),
                        png,
                    );
                    figs.push((format!("{arch}, {}: cross-corruption", key.label()), name));
                }
                Err(e) => notes.push(format!(
                    "`{arch}`, `{}`: no cross-corruption figure ({e}).",
                    key.label()
                )),
            }
        }
        figures.push((arch, figs));
    }
    let json = serde_json::to_vec_pretty(records)?;
    let fj = st.add("records.json", json);

    // report.md
    let mut md = String::from("# DeepRepair report\n\n");
    let set = |f: fn(&Record) -> String| -> Vec<String> {
        records
            .iter()
            .map(f)
            .collect::<BTreeSet<_>>()
            .into_iter()
            .collect()
    };
    let _ = writeln!(
        md,
        "{} evaluation records; architectures: {}; methods: {}; seeds: {}.\n",
        records.len(),
        or_none(&set(|r| r.arch.clone())),
        or_none(&set(|r| crate::method_label(
            &r.method,
            r.variant.as_deref()
        ))),
        or_none(&set(|r| r.seed.to_string())),
    );
    md.push_str("Files:\n\n");
    for (what, names) in [
        ("Table 2 (methods × corruptions, De_k)", &f2),
        ("Table 3 (uniform vs cluster sampling)", &f3),
        ("Clean vs corrupted", &fc),
        ("Paired differences to AugMix over seeds", &fp),
    ] {
        let links: Vec<String> = names.iter().map(|n| format!("[{n}]({n})")).collect();
        let _ = writeln!(md, "- {what}: {}", links.join(", "));
    }
    let _ = writeln!(md, "- Records: [{fj}]({fj})\n");
    for t in [&t2, &tp, &t3, &cvc] {
        // Tables use "##"/"###" headings; they nest under this document's "#".
        md.push_str(&t.markdown);
        md.push('\n');
    }
    md.push_str("## Figures\n");
    if figures.iter().all(|(_, f)| f.is_empty()) {
        md.push_str("\n_No figures: nothing to plot._\n");
    }
    for (arch, figs) in &figures {
        if figs.is_empty() {
            continue;
        }
        let _ = writeln!(md, "\n### {arch}\n");
        for (caption, name) in figs {
            let _ = writeln!(md, "![{caption}]({name})\n");
        }
    }
    if !notes.is_empty() {
        md.push_str("\n## Notes\n\n");
        for n in &notes {
            let _ = writeln!(md, "- {n}");
        }
    }
    st.add("report.md", md.into_bytes());

    // Stage, then rename into place.
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    let tmp = dir.join(format!(".report-tmp-{}-{nanos}", std::process::id()));
    std::fs::create_dir(&tmp).map_err(io_err(&tmp))?;
    let result = (|| {
        for (name, bytes) in &st.files {
            write_file(&tmp.join(name), bytes)?;
        }
        let mut written = Vec::with_capacity(st.files.len());
        for (name, _) in &st.files {
            let (from, to) = (tmp.join(name), dir.join(name));
            std::fs::rename(&from, &to).map_err(io_err(&to))?;
            written.push(to);
        }
        Ok(written)
    })();
    let _ = std::fs::remove_dir_all(&tmp);
    result
}

fn or_none(v: &[String]) -> String {
    if v.is_empty() {
        "none".to_string()
    } else {
        v.join(", ")
    }
}
