//! What a stage kind declares (params, inputs, outputs, resources, code version) and the
//! context it runs in. A kind reaches its inputs, checkpoints and progress only through
//! [`StageCtx`], never through shared in-process state, so a task can later run on a remote
//! worker behind the same interface.

use crate::artifact::{Artifact, Digest};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

/// The type a param must have; checked when the manifest is planned.
#[derive(Clone, Debug)]
pub enum ParamType {
    Int,
    Float,
    Bool,
    Str,
    /// One of a fixed set of strings (checked with did-you-mean).
    Choice(&'static [&'static str]),
    List(Box<ParamType>),
    /// Any JSON value; the kind validates it itself.
    Any,
}

impl ParamType {
    pub fn describe(&self) -> String {
        match self {
            ParamType::Int => "an integer".into(),
            ParamType::Float => "a number".into(),
            ParamType::Bool => "true or false".into(),
            ParamType::Str => "a string".into(),
            ParamType::Choice(c) => format!("one of {}", c.join(", ")),
            ParamType::List(t) => format!("a list of {}", t.describe().trim_start_matches("a ")),
            ParamType::Any => "any value".into(),
        }
    }
}

#[derive(Clone, Debug)]
pub struct ParamSpec {
    pub name: &'static str,
    pub ty: ParamType,
    /// `None` means the param is required.
    pub default: Option<Value>,
    pub help: &'static str,
}

impl ParamSpec {
    pub fn required(name: &'static str, ty: ParamType, help: &'static str) -> Self {
        ParamSpec {
            name,
            ty,
            default: None,
            help,
        }
    }
    pub fn optional(name: &'static str, ty: ParamType, default: Value, help: &'static str) -> Self {
        ParamSpec {
            name,
            ty,
            default: Some(default),
            help,
        }
    }
}

#[derive(Clone, Debug)]
pub struct InputSpec {
    pub name: &'static str,
    /// Takes the outputs of many upstream stages (`{from: x, all: true}` in a manifest).
    pub many: bool,
    pub optional: bool,
    pub help: &'static str,
}

/// What a stage needs from the machine while it runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Resources {
    pub cpus: u32,
    pub gpus: u32,
    pub mem_mb: u64,
    /// Cooperating processes the stage may run as (a gang: data-parallel ranks, each given
    /// `gpus / ranks` of the GPUs), when a dispatcher can place them all; otherwise one
    /// process runs every rank. 1: the stage is one process.
    #[serde(default = "one_rank")]
    pub ranks: u32,
}

fn one_rank() -> u32 {
    1
}

impl Default for Resources {
    fn default() -> Self {
        Resources {
            cpus: 1,
            gpus: 0,
            mem_mb: 512,
            ranks: 1,
        }
    }
}

/// What a stage asks of a batch system (Slurm) beyond CPUs, memory and GPUs: the manifest's
/// `resources:` keys `time`, `partition`, `account`, `qos`, `constraint`, `gpu_type`, `nodes`,
/// `sbatch_args`. Only a dispatcher that submits jobs reads it; it is not part of a stage's
/// key (where a stage runs does not change what it computes).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterRequest {
    /// Wall-clock limit in seconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub time_s: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub partition: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub account: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub qos: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub constraint: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gpu_type: Option<String>,
    /// Nodes a gang's ranks spread over, evenly.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nodes: Option<u32>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub sbatch_args: Vec<String>,
}

impl ClusterRequest {
    pub fn is_empty(&self) -> bool {
        *self == ClusterRequest::default()
    }
}

/// Seconds in a Slurm time limit: `MM`, `MM:SS`, `HH:MM:SS`, `D-HH`, `D-HH:MM`,
/// `D-HH:MM:SS`. `None` for anything else, and for zero.
pub fn parse_slurm_time(text: &str) -> Option<u64> {
    let text = text.trim();
    let num = |s: &str| -> Option<u64> {
        (!s.is_empty() && s.len() <= 9 && s.bytes().all(|b| b.is_ascii_digit()))
            .then(|| s.parse().ok())
            .flatten()
    };
    let (days, rest) = match text.split_once('-') {
        Some((d, rest)) => (Some(num(d)?), rest),
        None => (None, text),
    };
    let parts: Vec<u64> = rest.split(':').map(num).collect::<Option<_>>()?;
    let seconds = match (days, parts.as_slice()) {
        (None, [m]) => m * 60,
        (None, [m, s]) => m * 60 + s,
        (None, [h, m, s]) => h * 3600 + m * 60 + s,
        (Some(d), [h]) => d * 86400 + h * 3600,
        (Some(d), [h, m]) => d * 86400 + h * 3600 + m * 60,
        (Some(d), [h, m, s]) => d * 86400 + h * 3600 + m * 60 + s,
        _ => return None,
    };
    (seconds > 0).then_some(seconds)
}

/// `D-HH:MM:SS`, as `sbatch --time` takes it.
pub fn format_slurm_time(seconds: u64) -> String {
    let (d, rest) = (seconds / 86400, seconds % 86400);
    format!(
        "{d}-{:02}:{:02}:{:02}",
        rest / 3600,
        rest % 3600 / 60,
        rest % 60
    )
}

/// How a stage failed.
#[derive(Debug, thiserror::Error)]
pub enum StageError {
    /// Worth retrying (with backoff): e.g. an I/O hiccup, a lost worker.
    #[error("transient: {0:#}")]
    Transient(anyhow::Error),
    #[error("{0:#}")]
    Fatal(anyhow::Error),
    #[error("cancelled")]
    Cancelled,
    /// A rank of a gang that stopped because another rank of its group failed: not the cause.
    /// A gang's failure is its failing rank's (`workers::coordinator::gang_failure`); on its own
    /// it is retried like a transient error.
    #[error("{0:#}")]
    Released(anyhow::Error),
}

impl From<anyhow::Error> for StageError {
    fn from(e: anyhow::Error) -> Self {
        StageError::Fatal(e)
    }
}

/// An input as the stage sees it: one upstream output, in the order the plan lists them.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct InputRef {
    pub stage: String,
    pub output: String,
    pub digest: Digest,
}

/// A serializable stage invocation: everything a worker needs besides store access.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Task {
    pub key: Digest,
    pub kind: String,
    pub stage: String,
    pub params: Value,
    pub inputs: BTreeMap<String, Vec<InputRef>>,
    pub attempt: u32,
}

/// The store operations a running stage may use.
pub trait TaskStore: Send + Sync {
    fn get_artifact(&self, digest: &Digest) -> anyhow::Result<Artifact>;
    fn save_checkpoint(&self, key: &Digest, bytes: &[u8]) -> anyhow::Result<()>;
    fn load_checkpoint(&self, key: &Digest) -> anyhow::Result<Option<Vec<u8>>>;
}

/// Where a stage reports progress and log lines.
pub trait ProgressSink: Send + Sync {
    fn progress(&self, stage: &str, done: u64, total: u64, unit: &str);
    fn log(&self, stage: &str, line: &str);
    /// The stage reached a final state for this run (cached, succeeded, failed, skipped).
    fn stage_finished(&self, _stage: &str, _state: crate::store::StageState) {}
}

/// This process is one member (rank) of a stage that runs as several cooperating processes
/// ([`Resources::ranks`]); the members meet through whoever dispatched them.
pub trait Gang: Send + Sync {
    fn rank(&self) -> usize;
    fn world_size(&self) -> usize;
    /// An address of this machine the other members can reach.
    fn address(&self) -> std::net::IpAddr;
    /// Every member posts a payload under `name`; returns all of them in rank order once
    /// every member has posted (blocks until then; fails if the gang is abandoned).
    fn exchange(&self, name: &str, payload: &[u8]) -> anyhow::Result<Vec<Vec<u8>>>;
}

pub struct StageCtx<'a> {
    pub task: &'a Task,
    store: &'a dyn TaskStore,
    progress: &'a dyn ProgressSink,
    cancel: Arc<AtomicBool>,
    log_tail: Vec<String>,
    /// Threads the stage may use (its resource slot).
    pub threads: usize,
    /// GPU ordinals assigned to this stage.
    pub gpus: Vec<u32>,
    gang: Option<&'a dyn Gang>,
}

const LOG_TAIL: usize = 50;

impl<'a> StageCtx<'a> {
    pub fn new(
        task: &'a Task,
        store: &'a dyn TaskStore,
        progress: &'a dyn ProgressSink,
        cancel: Arc<AtomicBool>,
        threads: usize,
        gpus: Vec<u32>,
    ) -> Self {
        StageCtx {
            task,
            store,
            progress,
            cancel,
            log_tail: vec![],
            threads,
            gpus,
            gang: None,
        }
    }

    /// This process runs one rank of the stage (see [`Gang`]).
    pub fn with_gang(mut self, gang: &'a dyn Gang) -> Self {
        self.gang = Some(gang);
        self
    }

    /// The gang this process is a member of, when the stage runs as several processes.
    pub fn gang(&self) -> Option<&'a dyn Gang> {
        self.gang
    }

    pub fn params(&self) -> &Value {
        &self.task.params
    }

    /// A param, deserialized (defaults were filled in at plan time).
    pub fn param<T: serde::de::DeserializeOwned>(&self, name: &str) -> anyhow::Result<T> {
        let value = self.task.params.get(name).cloned().unwrap_or(Value::Null);
        serde_json::from_value(value)
            .map_err(|e| anyhow::anyhow!("param '{name}' of stage {}: {e}", self.task.stage))
    }

    /// The single artifact bound to input `name`.
    pub fn input(&self, name: &str) -> anyhow::Result<Artifact> {
        let refs = self.input_refs(name)?;
        match refs {
            [one] => self.store.get_artifact(&one.digest),
            _ => anyhow::bail!(
                "input '{name}' of stage {} has {} artifacts, expected 1",
                self.task.stage,
                refs.len()
            ),
        }
    }

    pub fn input_refs(&self, name: &str) -> anyhow::Result<&[InputRef]> {
        self.task
            .inputs
            .get(name)
            .map(|v| v.as_slice())
            .ok_or_else(|| anyhow::anyhow!("stage {} has no input '{name}'", self.task.stage))
    }

    pub fn has_input(&self, name: &str) -> bool {
        self.task.inputs.get(name).is_some_and(|v| !v.is_empty())
    }

    pub fn artifact(&self, digest: &Digest) -> anyhow::Result<Artifact> {
        self.store.get_artifact(digest)
    }

    pub fn progress(&self, done: u64, total: u64, unit: &str) {
        self.progress.progress(&self.task.stage, done, total, unit);
    }

    pub fn log(&mut self, line: impl Into<String>) {
        let line = line.into();
        self.progress.log(&self.task.stage, &line);
        if self.log_tail.len() == LOG_TAIL {
            self.log_tail.remove(0);
        }
        self.log_tail.push(line);
    }

    pub fn log_tail(&self) -> &[String] {
        &self.log_tail
    }

    pub fn is_cancelled(&self) -> bool {
        self.cancel.load(Ordering::Relaxed)
    }

    /// The flag [`StageCtx::is_cancelled`] reads, for threads and blocking calls of the stage.
    pub fn cancel_flag(&self) -> Arc<AtomicBool> {
        self.cancel.clone()
    }

    /// Returns `Err(Cancelled)` when the run is being stopped: call it at safe points.
    pub fn check_cancelled(&self) -> Result<(), StageError> {
        if self.is_cancelled() {
            Err(StageError::Cancelled)
        } else {
            Ok(())
        }
    }

    /// Commits a checkpoint for this stage key (replacing the previous one).
    pub fn save_checkpoint(&self, bytes: &[u8]) -> anyhow::Result<()> {
        self.store.save_checkpoint(&self.task.key, bytes)
    }

    pub fn load_checkpoint(&self) -> anyhow::Result<Option<Vec<u8>>> {
        self.store.load_checkpoint(&self.task.key)
    }
}

/// A stage kind. Implementations live in `stages/` (ML) and [`crate::builtin`] (generic).
pub trait StageKind: Send + Sync + 'static {
    fn name(&self) -> &'static str;
    /// Bump when the kind's code changes its outputs: it is part of every stage key.
    fn version(&self) -> &'static str;
    fn description(&self) -> &'static str;
    fn params(&self) -> Vec<ParamSpec>;
    fn inputs(&self) -> Vec<InputSpec>;
    fn outputs(&self) -> Vec<&'static str>;
    fn resources(&self, _params: &Value) -> Resources {
        Resources::default()
    }
    /// Relative amount of work, for `plan`'s estimate (arbitrary units; 1 = trivial).
    fn estimate(&self, _params: &Value) -> f64 {
        1.0
    }
    /// Extra checks on the (type-checked, default-filled) params; errors name the param.
    fn validate(&self, _params: &Value) -> Result<(), (String, String)> {
        Ok(())
    }
    /// For kinds that read outside the store (a user's data folder): a cheap summary of what
    /// they will read (e.g. file names, sizes, mtimes), mixed into the stage key so edited
    /// files re-run the stage. `None` for kinds that read only their inputs.
    fn fingerprint(&self, _params: &Value) -> anyhow::Result<Option<String>> {
        Ok(None)
    }
    /// Runs the stage and returns one artifact per declared output, in declaration order.
    fn run(&self, ctx: &mut StageCtx) -> Result<Vec<Artifact>, StageError>;
}

/// Runs `kind` in `ctx`, turning a panic into a fatal stage error (in-process stages and
/// worker processes alike).
pub fn run_catching_panics(
    kind: &dyn StageKind,
    ctx: &mut StageCtx,
) -> Result<Vec<Artifact>, StageError> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| kind.run(ctx))).unwrap_or_else(
        |panic| {
            let msg = panic
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_else(|| "unknown panic".into());
            Err(StageError::Fatal(anyhow::anyhow!("stage panicked: {msg}")))
        },
    )
}

/// The stage kinds a binary knows.
#[derive(Default, Clone)]
pub struct Registry {
    kinds: BTreeMap<&'static str, Arc<dyn StageKind>>,
}

impl Registry {
    pub fn new() -> Self {
        Registry::default()
    }
    pub fn register(&mut self, kind: impl StageKind) {
        self.kinds.insert(kind.name(), Arc::new(kind));
    }
    pub fn get(&self, name: &str) -> Option<&Arc<dyn StageKind>> {
        self.kinds.get(name)
    }
    pub fn names(&self) -> Vec<&'static str> {
        self.kinds.keys().copied().collect()
    }
    pub fn iter(&self) -> impl Iterator<Item = &Arc<dyn StageKind>> {
        self.kinds.values()
    }
}

/// Checks one param value against its type, coercing integers to floats where a number is
/// expected (so `lr: 1` and `lr: 1.0` give the same key). Returns a message on mismatch.
pub fn check_param(ty: &ParamType, value: &Value) -> Result<Value, String> {
    let bad = || format!("expected {}, found {}", ty.describe(), short_json(value));
    match ty {
        ParamType::Int => value
            .as_i64()
            .map(Value::from)
            .or_else(|| value.as_u64().map(Value::from))
            .ok_or_else(bad),
        ParamType::Float => value.as_f64().map(Value::from).ok_or_else(bad),
        ParamType::Bool => value.as_bool().map(Value::from).ok_or_else(bad),
        ParamType::Str => value.as_str().map(Value::from).ok_or_else(bad),
        ParamType::Choice(choices) => {
            let s = value.as_str().ok_or_else(bad)?;
            if choices.contains(&s) {
                Ok(value.clone())
            } else {
                Err(format!(
                    "unknown value '{s}'{}; expected {}",
                    crate::did_you_mean(s, choices.iter().copied()),
                    ty.describe()
                ))
            }
        }
        ParamType::List(inner) => {
            let items = value.as_array().ok_or_else(bad)?;
            items
                .iter()
                .map(|v| check_param(inner, v))
                .collect::<Result<Vec<_>, _>>()
                .map(Value::from)
        }
        ParamType::Any => Ok(value.clone()),
    }
}

fn short_json(value: &Value) -> String {
    let s = value.to_string();
    if s.len() > 40 {
        format!("{}…", &s[..40])
    } else {
        s
    }
}

/// A fingerprint of a file or directory tree: relative names, sizes and modification times,
/// hashed (contents are not read: cheap enough to run at every plan). For
/// [`StageKind::fingerprint`].
pub fn fingerprint_path(path: &std::path::Path) -> anyhow::Result<String> {
    use anyhow::Context;
    fn walk(
        root: &std::path::Path,
        dir: &std::path::Path,
        hasher: &mut blake3::Hasher,
    ) -> anyhow::Result<()> {
        let mut entries: Vec<_> = std::fs::read_dir(dir)
            .with_context(|| format!("reading directory {}", dir.display()))?
            .collect::<Result<_, _>>()
            .with_context(|| format!("reading directory {}", dir.display()))?;
        entries.sort_by_key(|e| e.file_name());
        for entry in entries {
            let p = entry.path();
            let meta = entry
                .metadata()
                .with_context(|| format!("stat {}", p.display()))?;
            if meta.is_dir() {
                walk(root, &p, hasher)?;
            } else {
                hash_file_meta(root, &p, &meta, hasher);
            }
        }
        Ok(())
    }
    fn hash_file_meta(
        root: &std::path::Path,
        p: &std::path::Path,
        meta: &std::fs::Metadata,
        hasher: &mut blake3::Hasher,
    ) {
        let rel = p.strip_prefix(root).unwrap_or(p);
        let mtime = meta
            .modified()
            .ok()
            .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        hasher.update(rel.to_string_lossy().as_bytes());
        hasher.update(&[0]);
        hasher.update(&meta.len().to_le_bytes());
        hasher.update(&mtime.to_le_bytes());
    }
    let meta =
        std::fs::metadata(path).with_context(|| format!("{} does not exist", path.display()))?;
    let mut hasher = blake3::Hasher::new();
    if meta.is_dir() {
        walk(path, path, &mut hasher)?;
    } else {
        hash_file_meta(path, path, &meta, &mut hasher);
    }
    Ok(hasher.finalize().to_hex().to_string())
}

#[cfg(test)]
mod slurm_time_tests {
    use super::*;

    #[test]
    fn slurm_time_formats() {
        assert_eq!(parse_slurm_time("90"), Some(5400));
        assert_eq!(parse_slurm_time("1:30"), Some(90));
        assert_eq!(parse_slurm_time("2:00:00"), Some(7200));
        assert_eq!(parse_slurm_time("1-12"), Some(129_600));
        assert_eq!(parse_slurm_time("1-0:30"), Some(88_200));
        assert_eq!(parse_slurm_time("0-0:0:5"), Some(5));
        for bad in [
            "", "0", "0:00", "1:2:3:4", "1h", "-5", "1-", "a:b", "1--2", " : ",
        ] {
            assert_eq!(parse_slurm_time(bad), None, "{bad:?}");
        }
        assert_eq!(format_slurm_time(129_600), "1-12:00:00");
        assert_eq!(format_slurm_time(90), "0-00:01:30");
        assert_eq!(parse_slurm_time(&format_slurm_time(88_205)), Some(88_205));
    }
}
