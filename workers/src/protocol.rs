//! The HTTP protocol between the coordinator (the process that owns the store and the plan)
//! and workers (processes that run stages). JSON for control messages; artifacts travel as a
//! frame: `[u32 LE length of a JSON head][JSON head][bytes of every artifact, in order]`,
//! each verified against its digest on arrival.
//!
//! | request | answer |
//! | --- | --- |
//! | `POST /v1/claim` [`ClaimRequest`] | 200 [`Claim`], or 204 after `wait_ms` without work |
//! | `POST /v1/leases/{id}/heartbeat` [`Heartbeat`] | 200 [`HeartbeatReply`]; 410 when the lease was revoked |
//! | `GET /v1/artifacts/{digest}` | 200 frame of one artifact; 404 |
//! | `GET /v1/leases/{id}/checkpoint` | 200 bytes; 204 when there is none |
//! | `PUT /v1/leases/{id}/checkpoint` bytes | 200 (committed in the store) |
//! | `POST /v1/leases/{id}/complete` frame of the outputs | 200 |
//! | `POST /v1/leases/{id}/fail` [`Failure`] | 200 |
//! | `POST /v1/leases/{id}/exchange` [`ExchangePost`] (gang members) | 200 [`ExchangeReply`] once every rank posted; 204 not yet (post again); 409 the gang was abandoned |
//!
//! Every request carries `Authorization: Bearer <token>`; the coordinator makes the token and
//! hands it to the workers it starts through [`TOKEN_ENV`].

use anyhow::{bail, Context};
use deeprepair_pipeline::kind::Task;
use deeprepair_pipeline::{Artifact, ArtifactHeader, Digest};
use serde::{Deserialize, Serialize};

/// Environment variable a worker reads its bearer token from.
pub const TOKEN_ENV: &str = "DEEPREPAIR_WORKER_TOKEN";

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct WorkerInfo {
    pub name: String,
    pub host: String,
    pub pid: u32,
    /// The GPU this worker owns (as the coordinator numbers them), if any.
    pub gpu: Option<u32>,
}

impl WorkerInfo {
    pub fn label(&self) -> String {
        match self.gpu {
            Some(g) => format!("{}(gpu{g})@{}", self.name, self.host),
            None => format!("{}@{}", self.name, self.host),
        }
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ClaimRequest {
    pub worker: WorkerInfo,
    /// Only this task (a Slurm job started for one stage).
    pub task: Option<Digest>,
    /// Long-poll: how long the coordinator may hold the request waiting for work.
    pub wait_ms: u64,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Claim {
    pub lease: u64,
    pub task: Task,
    /// CPU threads the stage may use.
    pub threads: usize,
    /// GPU ordinals as the worker's process sees them (after `CUDA_VISIBLE_DEVICES`).
    pub gpus: Vec<u32>,
    /// Set when this job is one rank of a stage that runs as several processes.
    #[serde(default)]
    pub gang: Option<GangMember>,
}

/// One rank of a gang: the jobs of one stage run by `world` workers at once.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct GangMember {
    /// The gang's id (its rank 0's job id).
    pub gang: u64,
    pub rank: u32,
    pub world: u32,
}

/// A gang member's contribution to a named exchange (e.g. rank 0's address or NCCL id).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ExchangePost {
    pub name: String,
    pub payload: Vec<u8>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ExchangeReply {
    /// Every rank's payload, in rank order.
    pub payloads: Vec<Vec<u8>>,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Heartbeat {
    /// Log lines since the last heartbeat.
    pub lines: Vec<String>,
    /// Latest (done, total, unit).
    pub progress: Option<(u64, u64, String)>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct HeartbeatReply {
    /// The run is stopping: end the stage at its next safe point.
    pub cancel: bool,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Failure {
    pub error: String,
    pub transient: bool,
    pub cancelled: bool,
    pub log_tail: Vec<String>,
}

#[derive(Serialize, Deserialize)]
struct FrameHead {
    log_tail: Vec<String>,
    artifacts: Vec<FramedArtifact>,
}

#[derive(Serialize, Deserialize)]
struct FramedArtifact {
    header: ArtifactHeader,
    digest: Digest,
    len: u64,
}

/// Encodes artifacts (and a log tail) as one frame.
pub fn encode_frame(artifacts: &[Artifact], log_tail: &[String]) -> Vec<u8> {
    let head = FrameHead {
        log_tail: log_tail.to_vec(),
        artifacts: artifacts
            .iter()
            .map(|a| FramedArtifact {
                header: a.header.clone(),
                digest: a.digest(),
                len: a.bytes.len() as u64,
            })
            .collect(),
    };
    let head = serde_json::to_vec(&head).expect("frame heads serialize");
    let total: usize = artifacts.iter().map(|a| a.bytes.len()).sum();
    let mut out = Vec::with_capacity(4 + head.len() + total);
    out.extend_from_slice(&(head.len() as u32).to_le_bytes());
    out.extend_from_slice(&head);
    for a in artifacts {
        out.extend_from_slice(&a.bytes);
    }
    out
}

/// Decodes a frame, checking every artifact's bytes against its digest.
pub fn decode_frame(frame: &[u8]) -> anyhow::Result<(Vec<Artifact>, Vec<String>)> {
    if frame.len() < 4 {
        bail!("artifact frame of {} bytes has no head", frame.len());
    }
    let head_len = u32::from_le_bytes(frame[..4].try_into().expect("4 bytes")) as usize;
    let head_end = 4usize
        .checked_add(head_len)
        .filter(|&e| e <= frame.len())
        .with_context(|| format!("artifact frame head of {head_len} bytes is cut short"))?;
    let head: FrameHead =
        serde_json::from_slice(&frame[4..head_end]).context("artifact frame head")?;
    let mut at = head_end;
    let mut artifacts = Vec::with_capacity(head.artifacts.len());
    for (i, a) in head.artifacts.into_iter().enumerate() {
        let end = at
            .checked_add(a.len as usize)
            .filter(|&e| e <= frame.len())
            .with_context(|| format!("artifact {i} of the frame is cut short"))?;
        let bytes = frame[at..end].to_vec();
        let actual = Digest::of(&bytes);
        if actual != a.digest {
            bail!(
                "artifact {i} arrived corrupt: digest {} but the sender said {}",
                actual.short(),
                a.digest.short()
            );
        }
        artifacts.push(Artifact {
            header: a.header,
            bytes,
        });
        at = end;
    }
    if at != frame.len() {
        bail!("artifact frame has {} trailing bytes", frame.len() - at);
    }
    Ok((artifacts, head.log_tail))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_round_trip_and_catch_corruption() {
        let artifacts = vec![Artifact::text("hello"), Artifact::text("")];
        let frame = encode_frame(&artifacts, &["a line".into()]);
        let (back, tail) = decode_frame(&frame).unwrap();
        assert_eq!(back.len(), 2);
        assert_eq!(back[0].bytes, b"hello");
        assert_eq!(back[0].header, artifacts[0].header);
        assert_eq!(tail, vec!["a line".to_string()]);

        let mut bad = frame.clone();
        let n = bad.len();
        bad[n - 1] ^= 1; // last byte of "hello"
        let err = decode_frame(&bad).unwrap_err().to_string();
        assert!(err.contains("arrived corrupt"), "{err}");
        let err = decode_frame(&frame[..frame.len() - 2])
            .unwrap_err()
            .to_string();
        assert!(err.contains("cut short"), "{err}");
        assert!(decode_frame(&[1, 0]).is_err());
    }
}
