//! Checking a whole store ([`Store::check`], behind `verify`) and salvaging a damaged one
//! ([`salvage`], behind `verify --repair`).
//!
//! Both read every table with [`walk`]: forward until the first unreadable entry, then backward
//! from the end down to it, so one damaged page costs the entries on it, not the rest of the
//! table. Salvage copies every record that reads, decodes and verifies into a fresh file, drops
//! what depends on something lost (an artifact missing a chunk, an action missing an output),
//! then swaps the files, keeping the damaged one beside the store. The next `run` recomputes
//! what was lost: same keys, same bytes.

use super::guard::{catch_store_panic, InStore};
use super::{
    ActionRecord, ArtifactRecord, CheckpointMeta, RunRecord, StageRunRecord, Store, StoreError,
    StoreResult, ACTIONS, ARTIFACTS, CHECKPOINT_CHUNKS, CHECKPOINT_META, CHUNKS, RUNS, STAGE_RUNS,
};
use crate::artifact::Digest;
use redb::{ReadTransaction, ReadableTable, TableDefinition, TableHandle};
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// The detail of a store error, without the advice its `Display` adds.
fn detail(e: &StoreError) -> String {
    match e {
        StoreError::Damaged { detail, .. } | StoreError::Db { detail, .. } => detail.clone(),
        other => other.to_string(),
    }
}

/// Visits every readable entry of `table` (see the module comment); never panics. Returns why
/// part of the table could not be read, if it could not.
fn walk<K, O>(
    path: &Path,
    txn: &ReadTransaction,
    table: TableDefinition<K, &'static [u8]>,
    own: impl Fn(K::SelfType<'_>) -> O,
    visit: &mut dyn FnMut(O, &[u8]),
) -> Option<String>
where
    K: redb::Key + 'static,
    O: Ord + Clone + std::fmt::Debug,
{
    let mut last_forward: Option<O> = None;
    let forward = catch_store_panic(path, || {
        let t = txn.open_table(table).in_store(path)?;
        for entry in t.iter().in_store(path)? {
            let (k, v) = entry.in_store(path)?;
            let key = own(k.value());
            visit(key.clone(), v.value());
            last_forward = Some(key);
        }
        Ok(())
    });
    let Err(first) = forward else {
        return None;
    };
    let mut first_backward: Option<O> = None;
    let backward = catch_store_panic(path, || {
        let t = txn.open_table(table).in_store(path)?;
        for entry in t.iter().in_store(path)?.rev() {
            let (k, v) = entry.in_store(path)?;
            let key = own(k.value());
            if last_forward.as_ref().is_some_and(|f| key <= *f) {
                break;
            }
            visit(key.clone(), v.value());
            first_backward = Some(key);
        }
        Ok(())
    });
    let span = match (&last_forward, &first_backward) {
        (None, None) => "no entry could be read".to_string(),
        (Some(f), None) => format!("entries after {f:?} could not be read"),
        (None, Some(b)) => format!("entries before {b:?} could not be read"),
        (Some(f), Some(b)) => format!("entries between {f:?} and {b:?} could not be read"),
    };
    let also = match backward {
        Err(e) if detail(&e) != detail(&first) => format!("; reading backward: {}", detail(&e)),
        _ => String::new(),
    };
    Some(format!(
        "table {}: {span} ({}{also})",
        table.name(),
        detail(&first)
    ))
}

fn digest_key(k: &[u8; 32]) -> Digest {
    Digest(*k)
}

/// redb's own integrity check of the file at `path` (page checksums, allocator state). It runs
/// on a copy beside the store: on a file it cannot repair, the check leaves it marked as needing
/// recovery, which would make the store unreadable for every later command. Call it while
/// holding the store (a writer handle), so that the copy is consistent. `Ok(None)`: sound.
pub fn check_file_integrity(path: &Path) -> StoreResult<Option<String>> {
    let copy = PathBuf::from(format!("{}.integrity-check", path.display()));
    std::fs::copy(path, &copy).map_err(|e| StoreError::Db {
        path: path.into(),
        detail: format!("copying the file for its integrity check: {e}"),
    })?;
    let outcome = match Store::open_writer(&copy) {
        Ok(mut store) => {
            let copy_path = copy.clone();
            match &mut *store.handle {
                super::Handle::Writer(db) => {
                    catch_store_panic(&copy_path, || db.check_integrity().in_store(&copy_path))
                }
                super::Handle::Reader(_) => Ok(true),
            }
        }
        Err(e) => Err(e),
    };
    let _ = std::fs::remove_file(&copy);
    match outcome {
        Ok(_) => Ok(None),
        Err(StoreError::Damaged { detail, .. }) => Ok(Some(detail)),
        Err(e) => Err(e),
    }
}

/// What `verify` found.
#[derive(Debug, Default)]
pub struct CheckReport {
    pub artifacts: usize,
    pub actions: usize,
    pub runs: usize,
    /// Each damaged, unreadable or inconsistent thing, named.
    pub problems: Vec<String>,
}

impl Store {
    /// Checks every record of every table decodes, every artifact's chunks and digest, every
    /// action's outputs, every checkpoint. (The file itself: [`check_file_integrity`].)
    pub fn check(&self) -> StoreResult<CheckReport> {
        let mut report = CheckReport::default();
        let path = self.path.clone();
        let txn = catch_store_panic(&path, || self.begin_read())?;
        let mut problems = vec![];

        let mut chunks = BTreeSet::new();
        let walk_chunks = walk(&path, &txn, CHUNKS, digest_key, &mut |d, bytes| {
            if Digest::of(bytes) == d {
                chunks.insert(d);
            } else {
                problems.push(format!("chunk {d} does not match its digest"));
            }
        });
        let mut records: Vec<ArtifactRecord> = vec![];
        let walk_artifacts = walk(
            &path,
            &txn,
            ARTIFACTS,
            digest_key,
            &mut |d, bytes| match self.decode(format_args!("artifact record {d}"), bytes) {
                Ok(r) => records.push(r),
                Err(e) => problems.push(detail(&e)),
            },
        );
        let mut good_artifacts = BTreeSet::new();
        for record in &records {
            match self.verify_artifact(&record.digest) {
                Ok(()) => {
                    good_artifacts.insert(record.digest);
                }
                Err(e) => problems.push(format!("artifact {}: {}", record.digest, detail(&e))),
            }
        }
        report.artifacts = records.len();
        let mut actions: Vec<ActionRecord> = vec![];
        let walk_actions = walk(&path, &txn, ACTIONS, digest_key, &mut |d, bytes| match self
            .decode(format_args!("action {d}"), bytes)
        {
            Ok(a) => actions.push(a),
            Err(e) => problems.push(detail(&e)),
        });
        for action in &actions {
            for (name, digest) in &action.outputs {
                if !good_artifacts.contains(digest) {
                    problems.push(format!(
                        "stage {} output {name}: artifact {digest} {}",
                        action.stage,
                        if records.iter().any(|r| r.digest == *digest) {
                            "is damaged"
                        } else {
                            "is missing"
                        }
                    ));
                }
            }
        }
        report.actions = actions.len();
        let walk_runs = walk(&path, &txn, RUNS, |k: u64| k, &mut |id, bytes| match self
            .decode::<RunRecord>(format_args!("run record {id}"), bytes)
        {
            Ok(_) => report.runs += 1,
            Err(e) => problems.push(detail(&e)),
        });
        let walk_stage_runs = walk(
            &path,
            &txn,
            STAGE_RUNS,
            |(run, stage): (u64, &str)| (run, stage.to_string()),
            &mut |(run, stage), bytes| {
                if let Err(e) = self.decode::<StageRunRecord>(
                    format_args!("stage record {stage:?} of run {run}"),
                    bytes,
                ) {
                    problems.push(detail(&e));
                }
            },
        );
        let mut checkpoints = vec![];
        let walk_meta = walk(
            &path,
            &txn,
            CHECKPOINT_META,
            digest_key,
            &mut |key, bytes| match self
                .decode::<CheckpointMeta>(format_args!("checkpoint of stage key {key}"), bytes)
            {
                Ok(_) => checkpoints.push(key),
                Err(e) => problems.push(detail(&e)),
            },
        );
        let walk_checkpoint_chunks = walk(
            &path,
            &txn,
            CHECKPOINT_CHUNKS,
            |(k, i): (&[u8; 32], u32)| (Digest(*k), i),
            &mut |_, _| {},
        );
        drop(txn);
        for key in checkpoints {
            if let Err(e) = self.load_checkpoint(&key) {
                problems.push(format!("checkpoint of stage key {key}: {}", detail(&e)));
            }
        }
        for w in [
            walk_chunks,
            walk_artifacts,
            walk_actions,
            walk_runs,
            walk_stage_runs,
            walk_meta,
            walk_checkpoint_chunks,
        ] {
            problems.extend(w);
        }
        report.problems.extend(problems);
        Ok(report)
    }
}

/// What `verify --repair` kept and lost.
#[derive(Debug, Default)]
pub struct SalvageReport {
    /// Where the damaged file was moved (kept for inspection; delete it when satisfied).
    pub damaged_copy: PathBuf,
    pub chunks: usize,
    pub artifacts: usize,
    pub actions: usize,
    pub runs: usize,
    pub stage_records: usize,
    pub checkpoints: usize,
    /// Each thing left behind, named, with why.
    pub lost: Vec<String>,
    /// The stages whose cached results were lost (the next `run` recomputes them).
    pub lost_stages: Vec<String>,
}

/// Copies every readable, verified record of the store at `path` into a fresh file and puts it
/// in the store's place; the damaged file moves to `<path>.damaged-<unix ms>`. Refused while a
/// run holds the store. A file redb cannot open at all is moved aside whole (everything lost).
pub fn salvage(path: &Path) -> StoreResult<SalvageReport> {
    let mut report = SalvageReport {
        damaged_copy: PathBuf::from(format!("{}.damaged-{}", path.display(), super::now_ms())),
        ..SalvageReport::default()
    };
    let partial = PathBuf::from(format!("{}.salvage-partial", path.display()));
    let _ = std::fs::remove_file(&partial);
    // A writer, which keeps runs out while the files are swapped (on a file closed cleanly the
    // open writes nothing; never redb's integrity check here: see `check_file_integrity`). A
    // file a writer cannot open is read as it is.
    let source = match Store::open_writer(path) {
        Ok(store) => Some(store),
        Err(StoreError::Damaged { detail: first, .. }) => match Store::open_read_only(path) {
            Ok(store) => Some(store),
            Err(e) => {
                report.lost.push(format!(
                    "the whole file: redb cannot open it ({first}; read-only: {})",
                    detail(&e)
                ));
                None
            }
        },
        Err(e) => return Err(e),
    };
    if let Some(source) = source {
        let target = Store::open_writer(&partial)?;
        copy_readable(&source, &target, &mut report)?;
        drop(target);
    }
    // The swap: the damaged file aside, the salvaged one (or none: the next run starts afresh)
    // in its place.
    let io = |e: std::io::Error, what: &str| StoreError::Db {
        path: path.into(),
        detail: format!("{what}: {e}"),
    };
    std::fs::rename(path, &report.damaged_copy).map_err(|e| io(e, "moving the damaged file"))?;
    if partial.exists() {
        std::fs::rename(&partial, path).map_err(|e| io(e, "installing the salvaged file"))?;
    }
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        if let Ok(dir) = std::fs::File::open(dir) {
            let _ = dir.sync_all();
        }
    }
    Ok(report)
}

/// Chunks per write transaction while copying (bounds the writer's dirty pages to ~256 MiB).
const CHUNKS_PER_COMMIT: usize = 64;

fn copy_readable(source: &Store, target: &Store, report: &mut SalvageReport) -> StoreResult<()> {
    let path = source.path.clone();
    let txn = catch_store_panic(&path, || source.begin_read())?;

    let good_chunks = copy_chunks(&path, &txn, target, report)?;

    // Artifact records that decode and whose bytes (from the salvaged chunks) verify.
    let mut records: Vec<ArtifactRecord> = vec![];
    let w = walk(
        &path,
        &txn,
        ARTIFACTS,
        digest_key,
        &mut |d, bytes| match source
            .decode::<ArtifactRecord>(format_args!("artifact record {d}"), bytes)
        {
            Ok(r) => records.push(r),
            Err(e) => report.lost.push(detail(&e)),
        },
    );
    report.lost.extend(w);
    let mut kept_artifacts = BTreeSet::new();
    let write = target.begin_write()?;
    {
        let mut t = write.open_table(ARTIFACTS).in_store(&target.path)?;
        for record in records {
            let verified = record.chunks.iter().all(|c| good_chunks.contains(c))
                && target
                    .reader(&record)
                    .is_ok_and(|mut r| std::io::copy(&mut r, &mut std::io::sink()).is_ok());
            if verified {
                t.insert(&record.digest.0, super::json(&record).as_slice())
                    .in_store(&target.path)?;
                kept_artifacts.insert(record.digest);
            } else {
                report.lost.push(format!(
                    "artifact {}: a chunk is missing or its bytes do not verify",
                    record.digest
                ));
            }
        }
    }
    report.artifacts = kept_artifacts.len();

    // Actions whose every output was kept; the others are forgotten, so `run` recomputes them.
    let mut actions: Vec<ActionRecord> = vec![];
    let w = walk(
        &path,
        &txn,
        ACTIONS,
        digest_key,
        &mut |d, bytes| match source.decode::<ActionRecord>(format_args!("action {d}"), bytes) {
            Ok(a) => actions.push(a),
            Err(e) => report.lost.push(detail(&e)),
        },
    );
    report.lost.extend(w);
    {
        let mut t = write.open_table(ACTIONS).in_store(&target.path)?;
        for action in actions {
            if action.outputs.values().all(|d| kept_artifacts.contains(d)) {
                t.insert(&action.key.0, super::json(&action).as_slice())
                    .in_store(&target.path)?;
                report.actions += 1;
            } else {
                report.lost_stages.push(action.stage.clone());
            }
        }
    }

    // Run and stage records that decode.
    let mut runs: BTreeMap<u64, RunRecord> = BTreeMap::new();
    let w = walk(&path, &txn, RUNS, |k: u64| k, &mut |id, bytes| match source
        .decode(format_args!("run record {id}"), bytes)
    {
        Ok(r) => {
            runs.insert(id, r);
        }
        Err(e) => report.lost.push(detail(&e)),
    });
    report.lost.extend(w);
    let mut stage_records: Vec<(u64, StageRunRecord)> = vec![];
    let w = walk(
        &path,
        &txn,
        STAGE_RUNS,
        |(run, stage): (u64, &str)| (run, stage.to_string()),
        &mut |(run, stage), bytes| match source
            .decode(format_args!("stage record {stage:?} of run {run}"), bytes)
        {
            Ok(r) => stage_records.push((run, r)),
            Err(e) => report.lost.push(detail(&e)),
        },
    );
    report.lost.extend(w);
    {
        let mut t = write.open_table(RUNS).in_store(&target.path)?;
        for (id, record) in &runs {
            t.insert(*id, super::json(record).as_slice())
                .in_store(&target.path)?;
        }
        report.runs = runs.len();
        let mut s = write.open_table(STAGE_RUNS).in_store(&target.path)?;
        for (run, record) in &stage_records {
            s.insert(
                (*run, record.stage.as_str()),
                super::json(record).as_slice(),
            )
            .in_store(&target.path)?;
        }
        report.stage_records = stage_records.len();
    }
    write.commit().in_store(&target.path)?;

    // Checkpoints that verify (a lost one only means its stage starts from epoch 0).
    let mut checkpoint_keys = vec![];
    let w = walk(&path, &txn, CHECKPOINT_META, digest_key, &mut |key, _| {
        checkpoint_keys.push(key)
    });
    report.lost.extend(w);
    drop(txn);
    copy_checkpoints(source, target, checkpoint_keys, report)?;
    report.lost_stages.sort();
    report.lost_stages.dedup();
    Ok(())
}

/// Copies the chunks whose bytes match their digest; returns their digests.
fn copy_chunks(
    path: &Path,
    txn: &ReadTransaction,
    target: &Store,
    report: &mut SalvageReport,
) -> StoreResult<BTreeSet<Digest>> {
    let mut good_chunks = BTreeSet::new();
    let mut pending: Vec<(Digest, Vec<u8>)> = vec![];
    let mut write_error = None;
    let flush = |pending: &mut Vec<(Digest, Vec<u8>)>| -> StoreResult<()> {
        let w = target.begin_write()?;
        {
            let mut t = w.open_table(CHUNKS).in_store(&target.path)?;
            for (d, bytes) in pending.drain(..) {
                t.insert(&d.0, bytes.as_slice()).in_store(&target.path)?;
            }
        }
        w.commit().in_store(&target.path)
    };
    let chunks_walk = walk(path, txn, CHUNKS, digest_key, &mut |d, bytes| {
        if write_error.is_some() {
            return;
        }
        if Digest::of(bytes) != d {
            report
                .lost
                .push(format!("chunk {d}: bytes do not match its digest"));
            return;
        }
        good_chunks.insert(d);
        pending.push((d, bytes.to_vec()));
        if pending.len() >= CHUNKS_PER_COMMIT {
            if let Err(e) = flush(&mut pending) {
                write_error = Some(e);
            }
        }
    });
    if let Some(e) = write_error {
        return Err(e);
    }
    flush(&mut pending)?;
    report.chunks = good_chunks.len();
    report.lost.extend(chunks_walk);

    Ok(good_chunks)
}

/// Copies the checkpoints that verify (a lost one only means its stage starts from epoch 0).
fn copy_checkpoints(
    source: &Store,
    target: &Store,
    keys: Vec<Digest>,
    report: &mut SalvageReport,
) -> StoreResult<()> {
    for key in keys {
        match source.load_checkpoint(&key) {
            Ok(Some(bytes)) => {
                target.save_checkpoint(&key, &bytes)?;
                report.checkpoints += 1;
            }
            Ok(None) => {}
            Err(e) => report.lost.push(format!(
                "checkpoint of stage key {key} (the stage starts over): {}",
                detail(&e)
            )),
        }
    }
    Ok(())
}
