//! The content-addressed store: one redb file holding artifacts (chunked, deduplicated),
//! the action cache (stage key → outputs), training checkpoints and run records.
//!
//! Invariants:
//! - An artifact is addressed by the BLAKE3 of its bytes and stored as fixed-size chunks, each
//!   keyed by its own BLAKE3, under an artifact record listing them (redb copies a value on
//!   write and rounds it up to a power-of-two run of pages, so large values are never stored
//!   whole).
//! - A stage's outputs, its action record and its run record are committed in ONE write
//!   transaction: after a crash a stage either fully exists or does not.
//! - Every read verifies chunk digests and the whole-artifact digest.
//! - One process writes (`SingleWriter`); read-only handles (`status`, `ls`, `inspect`) follow
//!   its commits concurrently. A second writer is refused with [`StoreError::Busy`].
//! - A damaged file is an error, never a panic: every operation runs under
//!   [`guard::catch_store_panic`] and redb's corruption errors become [`StoreError::Damaged`],
//!   which names the store and says what to do (`verify`, then `verify --repair`, which
//!   salvages every readable record into a fresh file: [`salvage`]).

mod guard;
pub mod salvage;

use guard::{catch_store_panic, InStore};

use crate::artifact::{Artifact, ArtifactHeader, Digest};
use redb::{
    ConcurrencyMode, Database, DatabaseError, ReadOnlyDatabase, ReadTransaction, ReadableDatabase,
    ReadableTable, TableDefinition, WriteTransaction,
};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};
use std::io::Read;
use std::mem::ManuallyDrop;
use std::path::{Path, PathBuf};

/// Chunk payload size: 4 MiB less one page, so a chunk plus its leaf header fits a 4 MiB run.
pub const CHUNK_SIZE: usize = 4 * 1024 * 1024 - 4096;

const CHUNKS: TableDefinition<&[u8; 32], &[u8]> = TableDefinition::new("chunks");
const ARTIFACTS: TableDefinition<&[u8; 32], &[u8]> = TableDefinition::new("artifacts");
const ACTIONS: TableDefinition<&[u8; 32], &[u8]> = TableDefinition::new("actions");
const CHECKPOINT_META: TableDefinition<&[u8; 32], &[u8]> = TableDefinition::new("checkpoint_meta");
const CHECKPOINT_CHUNKS: TableDefinition<(&[u8; 32], u32), &[u8]> =
    TableDefinition::new("checkpoint_chunks");
const RUNS: TableDefinition<u64, &[u8]> = TableDefinition::new("runs");
const STAGE_RUNS: TableDefinition<(u64, &str), &[u8]> = TableDefinition::new("stage_runs");

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("store {path} is in use by another deeprepair process (a run is writing to it); wait for it to finish or use another --store")]
    Busy { path: PathBuf },
    #[error("no store at {path} (run a manifest first, or pass --store)")]
    Missing { path: PathBuf },
    #[error("{0} not found in the store")]
    NotFound(String),
    #[error("artifact {digest} is corrupt: {detail}")]
    Corrupt { digest: Digest, detail: String },
    #[error("store {path}: {detail}")]
    Db { path: PathBuf, detail: String },
    #[error("store {path} is damaged: {detail}. `deeprepair verify --store {path}` lists what is affected; `deeprepair verify --store {path} --repair` keeps every readable record in a fresh file (the damaged one is kept beside it) and the next `run` recomputes what was lost")]
    Damaged { path: PathBuf, detail: String },
}

pub type StoreResult<T> = Result<T, StoreError>;

/// Where an artifact's bytes live.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ArtifactRecord {
    pub digest: Digest,
    pub header: ArtifactHeader,
    pub size: u64,
    pub chunks: Vec<Digest>,
}

/// The action cache entry: a stage key and what executing it produced.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ActionRecord {
    pub key: Digest,
    pub kind: String,
    pub version: String,
    pub stage: String,
    pub params: serde_json::Value,
    pub inputs: BTreeMap<String, Vec<Digest>>,
    pub outputs: BTreeMap<String, Digest>,
    pub run: u64,
    pub worker: String,
    pub attempt: u32,
    pub started_ms: u64,
    pub duration_ms: u64,
    #[serde(default)]
    pub log_tail: Vec<String>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RunState {
    Running,
    Succeeded,
    Failed,
    Cancelled,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct RunRecord {
    pub id: u64,
    pub manifest: String,
    pub manifest_digest: Digest,
    pub pid: u32,
    pub started_ms: u64,
    pub ended_ms: Option<u64>,
    pub state: RunState,
    pub stages_total: usize,
    #[serde(default)]
    pub error: Option<String>,
}

impl RunRecord {
    /// The state a person reads: `running`, `succeeded`, `failed`, `cancelled`, or
    /// `interrupted` for a run still marked running whose process is gone (killed or crashed).
    pub fn state_label(&self) -> String {
        match self.state {
            RunState::Running if self.pid != std::process::id() && !pid_alive(self.pid) => {
                "interrupted".into()
            }
            s => format!("{s:?}").to_lowercase(),
        }
    }

    /// How long the run ran, in ms: to its end; for a live run, to now; for an interrupted
    /// one, to the last thing its stages recorded (so the figure stops growing once it died).
    pub fn wall_ms(&self, stages: &[StageRunRecord]) -> u64 {
        let until = match self.ended_ms {
            Some(end) => end,
            None if self.state_label() == "interrupted" => stages
                .iter()
                .filter_map(|s| s.ended_ms.or(s.started_ms))
                .max()
                .unwrap_or(self.started_ms),
            None => now_ms(),
        };
        until.saturating_sub(self.started_ms)
    }
}

/// Whether `pid` is a live (not zombie) deeprepair process (Linux /proc; elsewhere assume so).
pub fn pid_alive(pid: u32) -> bool {
    if !Path::new("/proc/self").exists() {
        return true;
    }
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return false;
    };
    // Format: "pid (comm) S ..."; the state follows the last ')'.
    let state = stat
        .rsplit(')')
        .next()
        .and_then(|rest| rest.split_whitespace().next());
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
    state != Some("Z") && String::from_utf8_lossy(&cmdline).contains("deeprepair")
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StageState {
    Pending,
    Running,
    Cached,
    Succeeded,
    Failed,
    /// Not run because an upstream stage failed or the run was cancelled.
    Skipped,
}

impl StageState {
    pub fn is_done(self) -> bool {
        matches!(self, StageState::Cached | StageState::Succeeded)
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct StageRunRecord {
    pub stage: String,
    pub kind: String,
    pub state: StageState,
    pub key: Option<Digest>,
    pub started_ms: Option<u64>,
    pub ended_ms: Option<u64>,
    pub worker: Option<String>,
    pub attempt: u32,
    pub error: Option<String>,
    #[serde(default)]
    pub log_tail: Vec<String>,
    #[serde(default)]
    pub outputs: BTreeMap<String, Digest>,
    /// The stage paths this stage reads outputs of (the plan's edges, so a reader can draw
    /// the DAG of a run before its stages have run); empty in records older than the field.
    #[serde(default)]
    pub deps: Vec<String>,
    /// The planned params and code version (known before the stage runs, so a failed stage
    /// shows what it was asked to do); null and empty in records older than the fields.
    #[serde(default)]
    pub params: serde_json::Value,
    #[serde(default)]
    pub version: String,
}

impl StageRunRecord {
    pub fn pending(stage: &str, kind: &str) -> Self {
        StageRunRecord {
            stage: stage.into(),
            kind: kind.into(),
            state: StageState::Pending,
            key: None,
            started_ms: None,
            ended_ms: None,
            worker: None,
            attempt: 0,
            error: None,
            log_tail: vec![],
            outputs: BTreeMap::new(),
            deps: vec![],
            params: serde_json::Value::Null,
            version: String::new(),
        }
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct CheckpointMeta {
    pub digest: Digest,
    pub size: u64,
    pub chunks: u32,
    pub saved_ms: u64,
}

/// What [`Store::import_actions`] copied.
#[derive(Clone, Debug, Default, Serialize)]
pub struct ImportReport {
    /// Stages copied, and the bytes of their outputs.
    pub copied: usize,
    pub bytes: u64,
    /// Stages this store already had.
    pub already_present: usize,
    /// Stages not copied, with why (outputs missing or corrupt in the source).
    pub skipped: Vec<String>,
}

/// What `gc` found and (unless dry) removed.
#[derive(Clone, Debug, Default, Serialize)]
pub struct GcReport {
    pub runs_dropped: usize,
    pub actions_dropped: usize,
    pub artifacts_dropped: usize,
    pub chunks_dropped: usize,
    pub bytes_dropped: u64,
    pub artifacts_kept: usize,
}

enum Handle {
    Writer(Database),
    Reader(ReadOnlyDatabase),
}

pub struct Store {
    /// Dropped by hand (see `Drop`): closing a damaged file may panic inside redb.
    handle: ManuallyDrop<Handle>,
    path: PathBuf,
}

impl Drop for Store {
    fn drop(&mut self) {
        let path = self.path.clone();
        // SAFETY: `handle` is dropped exactly once, here, and never used afterwards.
        let handle = &mut self.handle;
        let closed = catch_store_panic(&path, || {
            unsafe { ManuallyDrop::drop(handle) };
            Ok(())
        });
        if let Err(e) = closed {
            tracing::warn!("{e}");
        }
    }
}

pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

fn json<T: Serialize>(value: &T) -> Vec<u8> {
    serde_json::to_vec(value).expect("records serialize")
}

impl Store {
    /// Opens (creating if needed) the store for writing. Only one process may write.
    pub fn open_writer(path: &Path) -> StoreResult<Store> {
        if let Some(dir) = path.parent() {
            if !dir.as_os_str().is_empty() {
                std::fs::create_dir_all(dir).map_err(|e| StoreError::Db {
                    path: path.into(),
                    detail: format!("cannot create directory {}: {e}", dir.display()),
                })?;
            }
        }
        let db = catch_store_panic(path, || {
            Database::builder()
                .set_concurrency_mode(ConcurrencyMode::SingleWriter)
                .create(path)
                .map_err(|e| map_open_error(path, e))
        })?;
        let store = Store {
            handle: ManuallyDrop::new(Handle::Writer(db)),
            path: path.into(),
        };
        store.init_tables()?;
        Ok(store)
    }

    /// Opens the store for reading, alongside a running writer if there is one. A store that
    /// needs crash recovery and has no writer is opened as a writer, which repairs it.
    pub fn open_reader(path: &Path) -> StoreResult<Store> {
        if !path.exists() {
            return Err(StoreError::Missing { path: path.into() });
        }
        match catch_store_panic(path, || Ok(open_shared(path)))? {
            Ok(db) => Ok(Store {
                handle: ManuallyDrop::new(Handle::Reader(db)),
                path: path.into(),
            }),
            // Needs crash recovery: only a writer may repair.
            Err(DatabaseError::RepairAborted) | Err(DatabaseError::Storage(_)) => {
                Store::open_writer(path)
            }
            Err(e) => Err(map_open_error(path, e)),
        }
    }

    /// Opens the store strictly read-only, alongside a running writer if there is one. Unlike
    /// [`Store::open_reader`] it never falls back to a writer: a store that needs crash
    /// recovery is reported as such, and nothing is ever written (what `ui` uses).
    pub fn open_read_only(path: &Path) -> StoreResult<Store> {
        if !path.is_file() {
            return Err(StoreError::Missing { path: path.into() });
        }
        match catch_store_panic(path, || Ok(open_shared(path)))? {
            Ok(db) => Ok(Store {
                handle: ManuallyDrop::new(Handle::Reader(db)),
                path: path.into(),
            }),
            Err(DatabaseError::RepairAborted) => Err(StoreError::Db {
                path: path.into(),
                detail: "needs crash recovery, which only a writer does (run `deeprepair verify` \
                         or any run on it once)"
                    .into(),
            }),
            Err(e) => Err(map_open_error(path, e)),
        }
    }

    /// Whether this handle may write (and so holds the store against other writers).
    pub fn is_writer(&self) -> bool {
        matches!(&*self.handle, Handle::Writer(_))
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn writer(&self) -> StoreResult<&Database> {
        match &*self.handle {
            Handle::Writer(db) => Ok(db),
            Handle::Reader(_) => Err(self.err("store opened read-only")),
        }
    }

    fn err(&self, detail: impl std::fmt::Display) -> StoreError {
        StoreError::Db {
            path: self.path.clone(),
            detail: detail.to_string(),
        }
    }

    /// Decodes a record; one that does not decode is damage, named by `what`.
    fn decode<T: serde::de::DeserializeOwned>(
        &self,
        what: std::fmt::Arguments,
        bytes: &[u8],
    ) -> StoreResult<T> {
        serde_json::from_slice(bytes).map_err(|e| StoreError::Damaged {
            path: self.path.clone(),
            detail: format!("{what} is unreadable ({e})"),
        })
    }

    /// Every record of `table`, decoded; one that does not decode is named by `what(key)`.
    fn decode_all<K, T>(
        &self,
        table: TableDefinition<K, &'static [u8]>,
        what: impl Fn(K::SelfType<'_>) -> String,
    ) -> StoreResult<Vec<T>>
    where
        K: redb::Key + 'static,
        T: serde::de::DeserializeOwned,
    {
        let txn = self.begin_read()?;
        let table = txn.open_table(table).in_store(&self.path)?;
        let mut out = vec![];
        for entry in table.iter().in_store(&self.path)? {
            let (k, v) = entry.in_store(&self.path)?;
            out.push(self.decode(format_args!("{}", what(k.value())), v.value())?);
        }
        Ok(out)
    }

    /// Runs a store operation so that a panic inside redb is a [`StoreError::Damaged`].
    fn guarded<T>(&self, op: impl FnOnce() -> StoreResult<T>) -> StoreResult<T> {
        catch_store_panic(&self.path, op)
    }

    fn init_tables(&self) -> StoreResult<()> {
        let txn = self.begin_write()?;
        {
            let path = &self.path;
            txn.open_table(CHUNKS).in_store(path)?;
            txn.open_table(ARTIFACTS).in_store(path)?;
            txn.open_table(ACTIONS).in_store(path)?;
            txn.open_table(CHECKPOINT_META).in_store(path)?;
            txn.open_table(CHECKPOINT_CHUNKS).in_store(path)?;
            txn.open_table(RUNS).in_store(path)?;
            txn.open_table(STAGE_RUNS).in_store(path)?;
        }
        txn.commit().in_store(&self.path)
    }

    fn begin_write(&self) -> StoreResult<WriteTransaction> {
        self.writer()?.begin_write().in_store(&self.path)
    }

    fn begin_read(&self) -> StoreResult<ReadTransaction> {
        match &*self.handle {
            Handle::Writer(db) => db.begin_read(),
            Handle::Reader(db) => db.begin_read(),
        }
        .in_store(&self.path)
    }

    // ---- artifacts ------------------------------------------------------------------------

    /// Stores artifacts and returns their digests (one transaction).
    pub fn put_artifacts(&self, artifacts: &[Artifact]) -> StoreResult<Vec<Digest>> {
        self.guarded(|| {
            let txn = self.begin_write()?;
            let digests = artifacts
                .iter()
                .map(|a| self.put_artifact_in(&txn, a))
                .collect::<StoreResult<Vec<_>>>()?;
            txn.commit().in_store(&self.path)?;
            Ok(digests)
        })
    }

    fn put_artifact_in(&self, txn: &WriteTransaction, artifact: &Artifact) -> StoreResult<Digest> {
        let digest = artifact.digest();
        let mut chunks_table = txn.open_table(CHUNKS).in_store(&self.path)?;
        let mut chunks = Vec::with_capacity(artifact.bytes.len() / CHUNK_SIZE + 1);
        for chunk in artifact.bytes.chunks(CHUNK_SIZE) {
            let chunk_digest = Digest::of(chunk);
            // Deduplicate, but replace a stored chunk whose bytes no longer match its digest.
            let present = match chunks_table.get(&chunk_digest.0).in_store(&self.path)? {
                Some(existing) => Digest::of(existing.value()) == chunk_digest,
                None => false,
            };
            if !present {
                chunks_table
                    .insert(&chunk_digest.0, chunk)
                    .in_store(&self.path)?;
            }
            chunks.push(chunk_digest);
        }
        let record = ArtifactRecord {
            digest,
            header: artifact.header.clone(),
            size: artifact.bytes.len() as u64,
            chunks,
        };
        let mut artifacts = txn.open_table(ARTIFACTS).in_store(&self.path)?;
        artifacts
            .insert(&digest.0, json(&record).as_slice())
            .in_store(&self.path)?;
        Ok(digest)
    }

    pub fn artifact_record(&self, digest: &Digest) -> StoreResult<Option<ArtifactRecord>> {
        self.guarded(|| {
            let txn = self.begin_read()?;
            let table = txn.open_table(ARTIFACTS).in_store(&self.path)?;
            let value = table.get(&digest.0).in_store(&self.path)?;
            value
                .map(|v| self.decode(format_args!("artifact record {digest}"), v.value()))
                .transpose()
        })
    }

    /// Reads and verifies a whole artifact.
    pub fn get_artifact(&self, digest: &Digest) -> StoreResult<Artifact> {
        self.guarded(|| {
            let record = self
                .artifact_record(digest)?
                .ok_or_else(|| StoreError::NotFound(format!("artifact {digest}")))?;
            let mut bytes = Vec::with_capacity(record.size as usize);
            self.reader(&record)?
                .read_to_end(&mut bytes)
                .map_err(|e| read_error(digest, e))?;
            Ok(Artifact {
                header: record.header,
                bytes,
            })
        })
    }

    /// Streams an artifact chunk by chunk, verifying each chunk and, at the end, the whole.
    pub fn reader(&self, record: &ArtifactRecord) -> StoreResult<ArtifactReader> {
        self.guarded(|| {
            let txn = self.begin_read()?;
            let table = txn.open_table(CHUNKS).in_store(&self.path)?;
            Ok(ArtifactReader {
                table,
                path: self.path.clone(),
                record: record.clone(),
                next_chunk: 0,
                buffer: Vec::new(),
                pos: 0,
                hasher: blake3::Hasher::new(),
                read: 0,
            })
        })
    }

    /// Checks that an artifact is present and its bytes match its digest.
    pub fn verify_artifact(&self, digest: &Digest) -> StoreResult<()> {
        self.guarded(|| {
            let record = self
                .artifact_record(digest)?
                .ok_or_else(|| StoreError::NotFound(format!("artifact {digest}")))?;
            let mut reader = self.reader(&record)?;
            std::io::copy(&mut reader, &mut std::io::sink()).map_err(|e| read_error(digest, e))?;
            Ok(())
        })
    }

    pub fn artifacts(&self) -> StoreResult<Vec<ArtifactRecord>> {
        self.guarded(|| self.decode_all(ARTIFACTS, |k| format!("artifact record {}", Digest(*k))))
    }

    /// Resolves a digest prefix (at least 4 hex digits) to artifact digests.
    pub fn resolve_artifact_prefix(&self, prefix: &str) -> StoreResult<Vec<Digest>> {
        self.guarded(|| {
            let prefix = prefix.to_ascii_lowercase();
            Ok(self
                .artifacts()?
                .into_iter()
                .map(|r| r.digest)
                .filter(|d| d.hex().starts_with(&prefix))
                .collect())
        })
    }

    // ---- action cache --------------------------------------------------------------------

    pub fn action(&self, key: &Digest) -> StoreResult<Option<ActionRecord>> {
        self.guarded(|| {
            let txn = self.begin_read()?;
            let table = txn.open_table(ACTIONS).in_store(&self.path)?;
            let value = table.get(&key.0).in_store(&self.path)?;
            value
                .map(|v| self.decode(format_args!("action {key}"), v.value()))
                .transpose()
        })
    }

    pub fn actions(&self) -> StoreResult<Vec<ActionRecord>> {
        self.guarded(|| self.decode_all(ACTIONS, |k| format!("action {}", Digest(*k))))
    }

    /// Drops an action record whose outputs turned out corrupt, so the stage runs again.
    pub fn forget_action(&self, key: &Digest) -> StoreResult<()> {
        self.guarded(|| {
            let txn = self.begin_write()?;
            txn.open_table(ACTIONS)
                .in_store(&self.path)?
                .remove(&key.0)
                .in_store(&self.path)?;
            txn.commit().in_store(&self.path)
        })
    }

    /// Commits a finished stage atomically: its output artifacts, its action record, its run
    /// record, and the removal of its training checkpoint.
    pub fn commit_stage(
        &self,
        action: &ActionRecord,
        outputs: &[Artifact],
        stage_run: &StageRunRecord,
    ) -> StoreResult<()> {
        self.guarded(|| {
            let txn = self.begin_write()?;
            for artifact in outputs {
                self.put_artifact_in(&txn, artifact)?;
            }
            txn.open_table(ACTIONS)
                .in_store(&self.path)?
                .insert(&action.key.0, json(action).as_slice())
                .in_store(&self.path)?;
            self.put_stage_run_in(&txn, action.run, stage_run)?;
            self.delete_checkpoint_in(&txn, &action.key)?;
            txn.commit().in_store(&self.path)
        })
    }

    // ---- sharing results between stores -------------------------------------------------

    /// Copies every finished stage of `from` that this store lacks: its action record and the
    /// artifacts it produced, each read and verified from `from` and checked against the digest
    /// the record names, written together in one transaction per stage (so a stage is either
    /// wholly here or not). A stage whose outputs are missing or corrupt in `from` is skipped
    /// and named. A run of this store then answers those stages from its cache.
    pub fn import_actions(&self, from: &Store) -> StoreResult<ImportReport> {
        copy_actions(
            from,
            |key| Ok(self.action(key)?.is_some()),
            |action, outputs| self.import_action(action, outputs),
        )
    }

    /// The outputs `action` names, each read, verified and checked against the digest the
    /// record gives it; the first problem, as text, otherwise.
    pub fn verified_outputs(&self, action: &ActionRecord) -> Result<Vec<Artifact>, String> {
        action
            .outputs
            .iter()
            .map(|(name, digest)| match self.get_artifact(digest) {
                Ok(a) if a.digest() == *digest => Ok(a),
                Ok(_) => Err(format!("output '{name}' does not match its digest")),
                Err(e) => Err(format!("output '{name}': {e}")),
            })
            .collect()
    }

    /// Adds a finished stage from elsewhere: its outputs (each checked against the digest the
    /// record names: a mismatch is `Corrupt`) and its action record, in one transaction.
    pub fn import_action(&self, action: &ActionRecord, outputs: &[Artifact]) -> StoreResult<()> {
        for (name, digest) in &action.outputs {
            if !outputs.iter().any(|a| a.digest() == *digest) {
                return Err(StoreError::Corrupt {
                    digest: *digest,
                    detail: format!(
                        "output '{name}' of {} is not among the bytes given",
                        action.stage
                    ),
                });
            }
        }
        self.guarded(|| {
            let txn = self.begin_write()?;
            for artifact in outputs {
                self.put_artifact_in(&txn, artifact)?;
            }
            txn.open_table(ACTIONS)
                .in_store(&self.path)?
                .insert(&action.key.0, json(action).as_slice())
                .in_store(&self.path)?;
            txn.commit().in_store(&self.path)
        })
    }

    // ---- checkpoints ---------------------------------------------------------------------

    /// Replaces the stage's checkpoint (one per stage key, not deduplicated: it is rewritten
    /// every epoch and dropped when the stage commits).
    pub fn save_checkpoint(&self, key: &Digest, bytes: &[u8]) -> StoreResult<()> {
        self.save_checkpoints(&[(*key, bytes)])
    }

    /// Replaces several stages' checkpoints in one write transaction (one fsync for all: what
    /// the coordinator does with checkpoints that arrive together). A key given twice keeps
    /// its last bytes.
    pub fn save_checkpoints(&self, checkpoints: &[(Digest, &[u8])]) -> StoreResult<()> {
        self.guarded(|| {
            let txn = self.begin_write()?;
            for (key, bytes) in checkpoints {
                self.delete_checkpoint_in(&txn, key)?;
                let mut chunks = txn.open_table(CHECKPOINT_CHUNKS).in_store(&self.path)?;
                for (i, chunk) in bytes.chunks(CHUNK_SIZE).enumerate() {
                    chunks
                        .insert((&key.0, i as u32), chunk)
                        .in_store(&self.path)?;
                }
                let meta = CheckpointMeta {
                    digest: Digest::of(bytes),
                    size: bytes.len() as u64,
                    chunks: bytes.chunks(CHUNK_SIZE).count() as u32,
                    saved_ms: now_ms(),
                };
                txn.open_table(CHECKPOINT_META)
                    .in_store(&self.path)?
                    .insert(&key.0, json(&meta).as_slice())
                    .in_store(&self.path)?;
            }
            txn.commit().in_store(&self.path)
        })
    }

    /// The stage's last checkpoint, verified; a corrupt checkpoint is reported as such.
    pub fn load_checkpoint(&self, key: &Digest) -> StoreResult<Option<Vec<u8>>> {
        self.guarded(|| {
            let txn = self.begin_read()?;
            let meta_table = txn.open_table(CHECKPOINT_META).in_store(&self.path)?;
            let Some(meta) = meta_table.get(&key.0).in_store(&self.path)? else {
                return Ok(None);
            };
            let meta: CheckpointMeta =
                self.decode(format_args!("checkpoint of stage key {key}"), meta.value())?;
            let chunks = txn.open_table(CHECKPOINT_CHUNKS).in_store(&self.path)?;
            let mut bytes = Vec::with_capacity(meta.size as usize);
            for i in 0..meta.chunks {
                let chunk = chunks
                    .get((&key.0, i))
                    .in_store(&self.path)?
                    .ok_or_else(|| StoreError::Corrupt {
                        digest: meta.digest,
                        detail: format!("checkpoint chunk {i} missing"),
                    })?;
                bytes.extend_from_slice(chunk.value());
            }
            if Digest::of(&bytes) != meta.digest {
                return Err(StoreError::Corrupt {
                    digest: meta.digest,
                    detail: "checkpoint bytes do not match their digest".into(),
                });
            }
            Ok(Some(bytes))
        })
    }

    fn delete_checkpoint_in(&self, txn: &WriteTransaction, key: &Digest) -> StoreResult<()> {
        let mut meta_table = txn.open_table(CHECKPOINT_META).in_store(&self.path)?;
        let old = meta_table.remove(&key.0).in_store(&self.path)?;
        if let Some(old) = old {
            let meta: CheckpointMeta =
                self.decode(format_args!("checkpoint of stage key {key}"), old.value())?;
            let mut chunks = txn.open_table(CHECKPOINT_CHUNKS).in_store(&self.path)?;
            for i in 0..meta.chunks {
                chunks.remove((&key.0, i)).in_store(&self.path)?;
            }
        }
        Ok(())
    }

    pub fn checkpoint_meta(&self, key: &Digest) -> StoreResult<Option<CheckpointMeta>> {
        self.guarded(|| {
            let txn = self.begin_read()?;
            let table = txn.open_table(CHECKPOINT_META).in_store(&self.path)?;
            let value = table.get(&key.0).in_store(&self.path)?;
            value
                .map(|v| self.decode(format_args!("checkpoint of stage key {key}"), v.value()))
                .transpose()
        })
    }

    // ---- runs ----------------------------------------------------------------------------

    /// Starts a run record with a fresh id.
    pub fn begin_run(
        &self,
        manifest: &str,
        manifest_digest: Digest,
        stages: &[StageRunRecord],
    ) -> StoreResult<RunRecord> {
        self.guarded(|| {
            let txn = self.begin_write()?;
            let id = {
                let runs = txn.open_table(RUNS).in_store(&self.path)?;
                let last = runs.last().in_store(&self.path)?;
                last.map(|(k, _)| k.value() + 1).unwrap_or(1)
            };
            let record = RunRecord {
                id,
                manifest: manifest.into(),
                manifest_digest,
                pid: std::process::id(),
                started_ms: now_ms(),
                ended_ms: None,
                state: RunState::Running,
                stages_total: stages.len(),
                error: None,
            };
            txn.open_table(RUNS)
                .in_store(&self.path)?
                .insert(id, json(&record).as_slice())
                .in_store(&self.path)?;
            for stage in stages {
                self.put_stage_run_in(&txn, id, stage)?;
            }
            txn.commit().in_store(&self.path)?;
            Ok(record)
        })
    }

    pub fn update_run(&self, record: &RunRecord) -> StoreResult<()> {
        self.guarded(|| {
            let txn = self.begin_write()?;
            txn.open_table(RUNS)
                .in_store(&self.path)?
                .insert(record.id, json(record).as_slice())
                .in_store(&self.path)?;
            txn.commit().in_store(&self.path)
        })
    }

    /// Records many stage state changes in one transaction.
    pub fn put_stage_runs(&self, run: u64, stages: &[StageRunRecord]) -> StoreResult<()> {
        self.guarded(|| {
            if stages.is_empty() {
                return Ok(());
            }
            let txn = self.begin_write()?;
            for stage in stages {
                self.put_stage_run_in(&txn, run, stage)?;
            }
            txn.commit().in_store(&self.path)
        })
    }

    fn put_stage_run_in(
        &self,
        txn: &WriteTransaction,
        run: u64,
        stage: &StageRunRecord,
    ) -> StoreResult<()> {
        txn.open_table(STAGE_RUNS)
            .in_store(&self.path)?
            .insert((run, stage.stage.as_str()), json(stage).as_slice())
            .in_store(&self.path)?;
        Ok(())
    }

    pub fn runs(&self) -> StoreResult<Vec<RunRecord>> {
        self.guarded(|| self.decode_all(RUNS, |k| format!("run record {k}")))
    }

    pub fn stage_runs(&self, run: u64) -> StoreResult<Vec<StageRunRecord>> {
        self.guarded(|| {
            let txn = self.begin_read()?;
            let table = txn.open_table(STAGE_RUNS).in_store(&self.path)?;
            let mut out = vec![];
            for entry in table.range((run, "")..(run + 1, "")).in_store(&self.path)? {
                let (k, v) = entry.in_store(&self.path)?;
                out.push(self.decode(
                    format_args!("stage record {:?} of run {run}", k.value().1),
                    v.value(),
                )?);
            }
            Ok(out)
        })
    }

    // ---- garbage collection --------------------------------------------------------------

    /// Drops runs older than the newest `keep_runs`, the actions no kept run references, and
    /// every artifact and chunk no kept action or stage record reaches.
    pub fn gc(&self, keep_runs: Option<usize>, dry_run: bool) -> StoreResult<GcReport> {
        self.guarded(|| {
            let mut report = GcReport::default();
            let runs = self.runs()?;
            let cut = keep_runs.map(|k| runs.len().saturating_sub(k)).unwrap_or(0);
            let (dropped_runs, kept_runs) = runs.split_at(cut);
            report.runs_dropped = dropped_runs.len();

            let mut live_keys = BTreeSet::new();
            let mut live_artifacts = BTreeSet::new();
            for run in kept_runs {
                for stage in self.stage_runs(run.id)? {
                    if let Some(key) = stage.key {
                        live_keys.insert(key);
                    }
                    live_artifacts.extend(stage.outputs.values().copied());
                }
            }
            let actions = self.actions()?;
            let mut dead_actions = vec![];
            for action in &actions {
                if live_keys.contains(&action.key) {
                    live_artifacts.extend(action.outputs.values().copied());
                } else {
                    dead_actions.push(action.key);
                }
            }
            report.actions_dropped = dead_actions.len();

            let mut live_chunks = BTreeSet::new();
            let mut dead_artifacts = vec![];
            for record in self.artifacts()? {
                if live_artifacts.contains(&record.digest) {
                    live_chunks.extend(record.chunks.iter().copied());
                    report.artifacts_kept += 1;
                } else {
                    dead_artifacts.push(record.digest);
                }
            }
            report.artifacts_dropped = dead_artifacts.len();

            let txn_read = self.begin_read()?;
            let chunk_table = txn_read.open_table(CHUNKS).in_store(&self.path)?;
            let mut dead_chunks = vec![];
            for entry in chunk_table.iter().in_store(&self.path)? {
                let (k, v) = entry.in_store(&self.path)?;
                let digest = Digest(*k.value());
                if !live_chunks.contains(&digest) {
                    report.bytes_dropped += v.value().len() as u64;
                    dead_chunks.push(digest);
                }
            }
            drop(chunk_table);
            drop(txn_read);
            report.chunks_dropped = dead_chunks.len();
            if dry_run {
                return Ok(report);
            }

            let txn = self.begin_write()?;
            {
                let mut t = txn.open_table(RUNS).in_store(&self.path)?;
                let mut s = txn.open_table(STAGE_RUNS).in_store(&self.path)?;
                for run in dropped_runs {
                    t.remove(run.id).in_store(&self.path)?;
                    let paths: Vec<String> = self
                        .stage_runs(run.id)?
                        .into_iter()
                        .map(|r| r.stage)
                        .collect();
                    for path in paths {
                        s.remove((run.id, path.as_str())).in_store(&self.path)?;
                    }
                }
                let mut a = txn.open_table(ACTIONS).in_store(&self.path)?;
                for key in &dead_actions {
                    a.remove(&key.0).in_store(&self.path)?;
                }
                let mut r = txn.open_table(ARTIFACTS).in_store(&self.path)?;
                for digest in &dead_artifacts {
                    r.remove(&digest.0).in_store(&self.path)?;
                }
                let mut c = txn.open_table(CHUNKS).in_store(&self.path)?;
                for digest in &dead_chunks {
                    c.remove(&digest.0).in_store(&self.path)?;
                }
            }
            txn.commit().in_store(&self.path)?;
            Ok(report)
        })
    }

    /// Reclaims free pages after a gc (redb needs exclusive access for this).
    pub fn compact(&mut self) -> StoreResult<()> {
        let path = self.path.clone();
        match &mut *self.handle {
            Handle::Writer(db) => {
                catch_store_panic(&path, || db.compact().map(|_| ()).in_store(&path))
            }
            Handle::Reader(_) => Err(self.err("store opened read-only")),
        }
    }
}

/// A read-only handle beside a running writer, if any. A writer that is creating or repairing
/// the file holds it exclusively for a moment, so that is retried for about a second.
fn open_shared(path: &Path) -> Result<ReadOnlyDatabase, DatabaseError> {
    let mut attempts = 0;
    loop {
        match Database::builder()
            .set_concurrency_mode(ConcurrencyMode::SingleWriter)
            .open_read_only(path)
        {
            Err(DatabaseError::DatabaseAlreadyOpen) if attempts < 20 => {
                attempts += 1;
                std::thread::sleep(std::time::Duration::from_millis(50));
            }
            other => return other,
        }
    }
}

/// Every finished stage of `from` that `present` does not know, with its outputs read and
/// verified, handed to `put` (one stage at a time); a stage whose outputs are missing or
/// corrupt in `from` is skipped and named. `import_actions` and `push` share it.
pub fn copy_actions<E: From<StoreError>>(
    from: &Store,
    mut present: impl FnMut(&Digest) -> Result<bool, E>,
    mut put: impl FnMut(&ActionRecord, &[Artifact]) -> Result<(), E>,
) -> Result<ImportReport, E> {
    let mut report = ImportReport::default();
    for action in from.actions()? {
        if present(&action.key)? {
            report.already_present += 1;
            continue;
        }
        let outputs = match from.verified_outputs(&action) {
            Ok(outputs) => outputs,
            Err(problem) => {
                report.skipped.push(format!(
                    "{} ({}): {problem}",
                    action.stage,
                    action.key.short()
                ));
                continue;
            }
        };
        put(&action, &outputs)?;
        report.copied += 1;
        report.bytes += outputs.iter().map(|a| a.bytes.len() as u64).sum::<u64>();
    }
    Ok(report)
}

/// The store error behind a failed artifact read (the reader wraps it in an `io::Error`).
fn read_error(digest: &Digest, e: std::io::Error) -> StoreError {
    match e
        .into_inner()
        .and_then(|inner| inner.downcast::<StoreError>().ok())
    {
        Some(store_err) => *store_err,
        None => StoreError::Corrupt {
            digest: *digest,
            detail: "read failed".into(),
        },
    }
}

fn map_open_error(path: &Path, e: DatabaseError) -> StoreError {
    match e {
        DatabaseError::DatabaseAlreadyOpen | DatabaseError::LockProtocolMismatch => {
            StoreError::Busy { path: path.into() }
        }
        other => guard::classify(path, other.into()),
    }
}

/// Streams an artifact's chunks, verifying as it goes (an `io::Error` wrapping
/// [`StoreError::Corrupt`] on mismatch).
pub struct ArtifactReader {
    table: redb::ReadOnlyTable<&'static [u8; 32], &'static [u8]>,
    path: PathBuf,
    record: ArtifactRecord,
    next_chunk: usize,
    buffer: Vec<u8>,
    pos: usize,
    hasher: blake3::Hasher,
    read: u64,
}

impl ArtifactReader {
    fn corrupt(&self, detail: String) -> std::io::Error {
        std::io::Error::other(StoreError::Corrupt {
            digest: self.record.digest,
            detail,
        })
    }

    fn fill(&mut self) -> std::io::Result<bool> {
        if self.next_chunk == self.record.chunks.len() {
            if self.read != self.record.size {
                return Err(self.corrupt(format!(
                    "{} bytes read, {} expected",
                    self.read, self.record.size
                )));
            }
            if Digest(*self.hasher.finalize().as_bytes()) != self.record.digest {
                return Err(self.corrupt("bytes do not match the artifact digest".into()));
            }
            return Ok(false);
        }
        let expected = self.record.chunks[self.next_chunk];
        let table = &self.table;
        let chunk = catch_store_panic(&self.path, || {
            Ok(table
                .get(&expected.0)
                .in_store(&self.path)?
                .map(|v| v.value().to_vec()))
        })
        .map_err(std::io::Error::other)?;
        let Some(bytes) = chunk else {
            return Err(self.corrupt(format!("chunk {} ({expected:?}) missing", self.next_chunk)));
        };
        let bytes = bytes.as_slice();
        if Digest::of(bytes) != expected {
            return Err(self.corrupt(format!(
                "chunk {} ({expected:?}) does not match its digest",
                self.next_chunk
            )));
        }
        self.hasher.update(bytes);
        self.read += bytes.len() as u64;
        self.buffer.clear();
        self.buffer.extend_from_slice(bytes);
        self.pos = 0;
        self.next_chunk += 1;
        Ok(true)
    }
}

impl Read for ArtifactReader {
    fn read(&mut self, out: &mut [u8]) -> std::io::Result<usize> {
        while self.pos == self.buffer.len() {
            if !self.fill()? {
                return Ok(0);
            }
        }
        let n = out.len().min(self.buffer.len() - self.pos);
        out[..n].copy_from_slice(&self.buffer[self.pos..self.pos + n]);
        self.pos += n;
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::artifact::{ArtifactHeader, ArtifactKind};

    fn artifact(bytes: Vec<u8>) -> Artifact {
        Artifact {
            header: ArtifactHeader::new(ArtifactKind::Tensor, "application/octet-stream", "bin"),
            bytes,
        }
    }

    #[test]
    fn empty_and_multi_chunk_artifacts_round_trip_and_dedupe() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open_writer(&dir.path().join("s.redb")).unwrap();
        let big: Vec<u8> = (0..9_000_000u32)
            .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
            .collect();
        let mut twin = big.clone();
        twin[8_999_999] ^= 1; // same first two chunks, different last one
        let digests = store
            .put_artifacts(&[
                artifact(vec![]),
                artifact(big.clone()),
                artifact(twin.clone()),
            ])
            .unwrap();
        assert_eq!(
            store.get_artifact(&digests[0]).unwrap().bytes,
            Vec::<u8>::new()
        );
        assert_eq!(store.get_artifact(&digests[1]).unwrap().bytes, big);
        assert_eq!(store.get_artifact(&digests[2]).unwrap().bytes, twin);
        let record = store.artifact_record(&digests[1]).unwrap().unwrap();
        assert_eq!(record.chunks.len(), 3);
        let twin_record = store.artifact_record(&digests[2]).unwrap().unwrap();
        assert_eq!(
            record.chunks[..2],
            twin_record.chunks[..2],
            "shared chunks are stored once"
        );
        assert_ne!(record.chunks[2], twin_record.chunks[2]);
        // Streaming reads in small pieces give the same bytes.
        let mut reader = store.reader(&record).unwrap();
        let mut buf = [0u8; 1000];
        let mut streamed = vec![];
        loop {
            let n = reader.read(&mut buf).unwrap();
            if n == 0 {
                break;
            }
            streamed.extend_from_slice(&buf[..n]);
        }
        assert_eq!(streamed, big);
        drop(reader);
        assert!(store.check().unwrap().problems.is_empty());
    }

    #[test]
    fn a_read_only_handle_follows_the_writer_and_never_writes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.redb");
        assert!(matches!(
            Store::open_read_only(&path),
            Err(StoreError::Missing { .. })
        ));
        let writer = Store::open_writer(&path).unwrap();
        let reader = Store::open_read_only(&path).unwrap();
        assert!(reader.runs().unwrap().is_empty());
        let mut stage = StageRunRecord::pending("b", "util.text");
        stage.deps = vec!["a".into()];
        let run = writer
            .begin_run("m.yaml", Digest::of(b"m"), &[stage])
            .unwrap();
        // The reader sees the commit made after it opened, deps included.
        assert_eq!(reader.runs().unwrap().len(), 1);
        assert_eq!(reader.stage_runs(run.id).unwrap()[0].deps, ["a"]);
        assert!(reader.put_artifacts(&[artifact(vec![1])]).is_err());
        assert!(reader.update_run(&run).is_err());
    }

    #[test]
    fn checkpoints_replace_in_place_and_detect_corruption_of_meta() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open_writer(&dir.path().join("s.redb")).unwrap();
        let key = Digest::of(b"stage");
        assert_eq!(store.load_checkpoint(&key).unwrap(), None);
        store.save_checkpoint(&key, &vec![7u8; 5_000_000]).unwrap();
        store.save_checkpoint(&key, b"small").unwrap();
        assert_eq!(store.load_checkpoint(&key).unwrap().unwrap(), b"small");
        assert_eq!(store.checkpoint_meta(&key).unwrap().unwrap().chunks, 1);
    }

    #[test]
    fn checkpoints_of_several_stages_commit_together_the_last_of_a_key_kept() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open_writer(&dir.path().join("s.redb")).unwrap();
        let (a, b) = (Digest::of(b"a"), Digest::of(b"b"));
        store.save_checkpoint(&a, &vec![1u8; 5_000_000]).unwrap();
        let big = vec![2u8; 5_000_000];
        store
            .save_checkpoints(&[(a, &b"first"[..]), (b, &big[..]), (a, &b"second"[..])])
            .unwrap();
        assert_eq!(store.load_checkpoint(&a).unwrap().unwrap(), b"second");
        assert_eq!(store.load_checkpoint(&b).unwrap().unwrap(), big);
        assert_eq!(store.checkpoint_meta(&a).unwrap().unwrap().chunks, 1);
    }
}
