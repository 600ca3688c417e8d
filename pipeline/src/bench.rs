//! `deeprepair bench orchestrator`: planning and cached re-runs of a large grid, and blob
//! put/get throughput. Prints a table; numbers go to BENCHMARKS.md.

use crate::artifact::{Artifact, ArtifactHeader, ArtifactKind};
use crate::executor::{run_plan, RunOptions};
use crate::kind::Registry;
use crate::plan::plan_file;
use crate::progress::Progress;
use crate::render::{self, PlannedState};
use crate::store::Store;
use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Instant;

pub fn orchestrator(
    stages: usize,
    dir: Option<PathBuf>,
    registry: &Registry,
) -> anyhow::Result<Vec<(String, String)>> {
    let dir = match dir {
        Some(d) => d,
        None => std::env::temp_dir().join(format!("deeprepair-bench-{}", std::process::id())),
    };
    std::fs::create_dir_all(&dir)?;
    let side = (stages as f64).sqrt().ceil() as usize;
    let values = |n: usize| (0..n).map(|i| i.to_string()).collect::<Vec<_>>().join(", ");
    let manifest = dir.join("grid.yaml");
    std::fs::write(
        &manifest,
        format!(
            "name: bench\ngrid:\n  seed: [{}]\n  label: [{}]\nstages:\n  cell:\n    kind: util.work\n    over: [seed, label]\n    params: {{steps: 1, size: 64}}\n",
            values(side),
            values(side)
        ),
    )?;
    let mut rows: Vec<(String, String)> = vec![];
    let t = Instant::now();
    let plan = plan_file(&manifest, registry)?;
    rows.push((
        format!("plan {} stages", plan.stages.len()),
        format!("{:.3} s", t.elapsed().as_secs_f64()),
    ));

    let store_file = dir.join("store.redb");
    let _ = std::fs::remove_file(&store_file);
    let store = Arc::new(Store::open_writer(&store_file)?);
    let progress: Arc<Progress> = Arc::new(Progress::new(plan.stages.len() as u64, true));
    let options = RunOptions::default();
    let t = Instant::now();
    let first = run_plan(
        &plan,
        registry,
        store.clone(),
        &options,
        progress.clone(),
        Arc::new(AtomicBool::new(false)),
    )?;
    rows.push((
        format!("first run ({} executed)", first.executed.len()),
        format!("{:.2} s", t.elapsed().as_secs_f64()),
    ));
    let t = Instant::now();
    let status = render::plan_status(&plan, Some(&store))?;
    rows.push((
        format!(
            "plan status vs store ({} cached)",
            status.count(PlannedState::Cached)
        ),
        format!("{:.3} s", t.elapsed().as_secs_f64()),
    ));
    let t = Instant::now();
    let again = run_plan(
        &plan,
        registry,
        store.clone(),
        &options,
        progress.clone(),
        Arc::new(AtomicBool::new(false)),
    )?;
    anyhow::ensure!(
        again.executed.is_empty(),
        "cached re-run executed {} stages",
        again.executed.len()
    );
    rows.push((
        format!("fully cached re-run ({} cached)", again.cached.len()),
        format!("{:.3} s", t.elapsed().as_secs_f64()),
    ));

    for (label, size) in [("1 MB", 1usize << 20), ("100 MB", 100 << 20)] {
        let mut bytes = vec![0u8; size];
        let mut state = 0x2545F4914F6CDD1Du64;
        for chunk in bytes.chunks_mut(8) {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            chunk.copy_from_slice(&state.to_le_bytes()[..chunk.len()]);
        }
        let reps = if size < (10 << 20) { 50 } else { 3 };
        let artifacts: Vec<Artifact> = (0..reps)
            .map(|r| {
                let mut b = bytes.clone();
                b[0] = r as u8;
                b[size - 1] = (r >> 8) as u8;
                Artifact {
                    header: ArtifactHeader::new(
                        ArtifactKind::Tensor,
                        "application/octet-stream",
                        "bin",
                    ),
                    bytes: b,
                }
            })
            .collect();
        let t = Instant::now();
        let mut digests = vec![];
        for a in &artifacts {
            digests.extend(store.put_artifacts(std::slice::from_ref(a))?);
        }
        let put = t.elapsed().as_secs_f64();
        let t = Instant::now();
        for d in &digests {
            let a = store.get_artifact(d)?;
            anyhow::ensure!(a.bytes.len() == size);
        }
        let get = t.elapsed().as_secs_f64();
        let mb = (size * reps) as f64 / 1e6;
        rows.push((
            format!("blob put {label} ×{reps}"),
            format!("{:.0} MB/s", mb / put),
        ));
        rows.push((
            format!("blob get {label} ×{reps} (verified)"),
            format!("{:.0} MB/s", mb / get),
        ));
    }
    drop(store);
    let file_mb = std::fs::metadata(&store_file)?.len() as f64 / 1e6;
    rows.push(("store file size".into(), format!("{file_mb:.0} MB")));
    let _ = std::fs::remove_dir_all(&dir);
    Ok(rows)
}

/// Markdown table of benchmark rows.
pub fn table(rows: &[(String, String)]) -> String {
    let mut out = String::from("| measurement | result |\n| --- | --- |\n");
    for (k, v) in rows {
        out.push_str(&format!("| {k} | {v} |\n"));
    }
    out
}
