//! The orchestrator: YAML manifests → a DAG of stage instances → a tokio executor that runs
//! them with results content-addressed in a redb store. Knows nothing of ML; stage kinds are
//! registered by the binary (see `stages/`). See ARCHITECTURE.md for the invariants.

pub mod artifact;
pub mod bench;
pub mod builtin;
pub mod dispatch;
pub mod executor;
pub mod key;
pub mod kind;
pub mod manifest;
pub mod plan;
pub mod progress;
pub mod render;
pub mod store;

pub use artifact::{Artifact, ArtifactHeader, ArtifactKind, Digest};
pub use dispatch::{Assignment, Dispatcher, RemoteOutcome};
pub use executor::{run_plan, RunOptions, RunSummary};
pub use kind::{
    ClusterRequest, Gang, InputSpec, ParamSpec, ParamType, Registry, Resources, StageCtx,
    StageError, StageKind,
};
pub use manifest::ManifestError;
pub use plan::{plan_file, plan_file_with_vars, plan_literal, Plan};
pub use store::{Store, StoreError};

/// "; did you mean 'x'?" when a known name is close to `word`, else "".
pub fn did_you_mean<'a>(word: &str, known: impl Iterator<Item = &'a str>) -> String {
    known
        .map(|k| (strsim::jaro_winkler(word, k), k))
        .filter(|(score, _)| *score > 0.8)
        .max_by(|a, b| a.0.total_cmp(&b.0))
        .map(|(_, k)| format!("; did you mean '{k}'?"))
        .unwrap_or_default()
}
