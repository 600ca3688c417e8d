//! The HTTP protocol between the coordinator (the process that owns the store and the plan)
//! and workers (processes that run stages). JSON for control messages; artifacts travel as a
//! frame: `[u32 LE length of a JSON head][JSON head][bytes of every artifact, in order]`,
//! each verified against its digest on arrival.
//!
//! | request | answer |
//! | --- | --- |
//! | `POST /v1/claim` [`ClaimRequest`] | 200 [`Claim`], or 204 after `wait_ms` without work |
//! | `POST /v1/leases/{id}/heartbeat` [`Heartbeat`] | 200 [`HeartbeatReply`]; 410 when the lease was revoked |
//! | `GET /v1/leases/{id}/artifacts/{digest}` | 200 frame of one artifact (an input of the lease's task only: 403 otherwise); 404 |
//! | `GET /v1/leases/{id}/checkpoint` | 200 bytes; 204 when there is none |
//! | `PUT /v1/leases/{id}/checkpoint` bytes | 200 (committed in the store); 413 over the upload limit |
//! | `POST /v1/leases/{id}/complete` frame of the outputs | 200; 400 malformed or corrupt, 413 too large: either way the lease is released and the job fails at once |
//! | `POST /v1/leases/{id}/fail` [`Failure`] | 200 |
//! | `POST /v1/leases/{id}/exchange` [`ExchangePost`] (gang members) | 200 [`ExchangeReply`] once every rank posted; 204 not yet (post again); 409 the gang was abandoned |
//!
//! Every request carries `Authorization: Bearer <token>` (401 without it, answered before any
//! of the body is read); the coordinator makes the token and hands it to the workers it starts
//! through [`TOKEN_ENV`]. Every `/v1/leases/{id}/…` request also carries the lease's own secret,
//! [`Claim::secret`], in [`LEASE_HEADER`] (403 without it): holding the token lets a worker claim
//! work, not touch another worker's lease.

use deeprepair_pipeline::kind::Task;
use deeprepair_pipeline::{Artifact, ArtifactHeader, Digest};
use serde::{Deserialize, Serialize};

/// Environment variable a worker reads its bearer token from.
pub const TOKEN_ENV: &str = "DEEPREPAIR_WORKER_TOKEN";

/// Environment variable naming a PEM file of the certificates a worker trusts for an
/// `https://` coordinator (`run --tls-cert` sets it to its certificate for the workers it starts).
pub const TLS_CA_ENV: &str = "DEEPREPAIR_TLS_CA";

/// Request header carrying a lease's secret on every `/v1/leases/{id}/…` request.
pub const LEASE_HEADER: &str = "x-deeprepair-lease";

/// The most a frame head (the JSON before the artifact bytes) may take.
pub const MAX_FRAME_HEAD: usize = 16 << 20;

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
    /// The lease's own secret (128 random bits): required, with the token, on every request
    /// about this lease.
    pub secret: String,
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
    /// The latest progress report.
    pub progress: Option<StageProgress>,
}

/// How far a stage is: `done` of `total` `unit`s (e.g. 3 of 10 epochs).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StageProgress {
    pub done: u64,
    pub total: u64,
    pub unit: String,
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
    /// A gang rank released by another rank's failure (`StageError::Released`), not the cause.
    #[serde(default)]
    pub released: bool,
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

fn frame_head(artifacts: &[Artifact], log_tail: &[String]) -> Vec<u8> {
    let described: Vec<(ArtifactHeader, Digest, u64)> = artifacts
        .iter()
        .map(|a| (a.header.clone(), a.digest(), a.bytes.len() as u64))
        .collect();
    frame_head_of(&described, log_tail)
}

/// The head of a frame whose artifacts are described by (header, digest, length): what goes
/// before their bytes when they are streamed from elsewhere (the store's chunks).
pub fn frame_head_of(artifacts: &[(ArtifactHeader, Digest, u64)], log_tail: &[String]) -> Vec<u8> {
    let head = FrameHead {
        log_tail: log_tail.to_vec(),
        artifacts: artifacts
            .iter()
            .map(|(header, digest, len)| FramedArtifact {
                header: header.clone(),
                digest: *digest,
                len: *len,
            })
            .collect(),
    };
    let head = serde_json::to_vec(&head).expect("frame heads serialize");
    let mut out = Vec::with_capacity(4 + head.len());
    out.extend_from_slice(&(head.len() as u32).to_le_bytes());
    out.extend_from_slice(&head);
    out
}

/// Encodes artifacts (and a log tail) as one frame.
pub fn encode_frame(artifacts: &[Artifact], log_tail: &[String]) -> Vec<u8> {
    let mut out = frame_head(artifacts, log_tail);
    out.reserve(artifacts.iter().map(|a| a.bytes.len()).sum());
    for a in artifacts {
        out.extend_from_slice(&a.bytes);
    }
    out
}

/// A frame as pieces to send one after another without copying the artifacts' bytes: the
/// head, then each artifact's bytes. Their lengths sum to the frame's length.
pub fn frame_parts<'a>(artifacts: &'a [Artifact], log_tail: &[String]) -> (Vec<u8>, Vec<&'a [u8]>) {
    (
        frame_head(artifacts, log_tail),
        artifacts.iter().map(|a| a.bytes.as_slice()).collect(),
    )
}

/// Why a frame was refused.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    #[error("artifact frame of more than {limit} bytes refused (the upload limit)")]
    TooLarge { limit: u64 },
    #[error("{0}")]
    Malformed(String),
}

fn malformed(message: impl Into<String>) -> FrameError {
    FrameError::Malformed(message.into())
}

/// Decodes a frame as it arrives, chunk by chunk: each artifact's bytes go straight into
/// their own buffer (sized from the head, within the limit) and are hashed on the way, so a
/// frame is held once, never twice, and a frame larger than `limit` is refused as soon as
/// its head says so or its bytes pass the limit.
pub struct FrameDecoder {
    limit: u64,
    seen: u64,
    prefix: Vec<u8>,
    head: Option<FrameHead>,
    /// Artifacts finished, verified.
    done: Vec<Artifact>,
    current: Vec<u8>,
    hasher: blake3::Hasher,
}

impl FrameDecoder {
    pub fn new(limit: u64) -> FrameDecoder {
        FrameDecoder {
            limit,
            seen: 0,
            prefix: vec![],
            head: None,
            done: vec![],
            current: vec![],
            hasher: blake3::Hasher::new(),
        }
    }

    /// Feeds the next bytes of the frame.
    pub fn push(&mut self, mut data: &[u8]) -> Result<(), FrameError> {
        self.seen += data.len() as u64;
        if self.seen > self.limit {
            return Err(FrameError::TooLarge { limit: self.limit });
        }
        while !data.is_empty() {
            let Some(head) = &self.head else {
                let need = match self.head_len()? {
                    None => 4,
                    Some(head_len) => 4 + head_len,
                };
                let take = (need - self.prefix.len()).min(data.len());
                self.prefix.extend_from_slice(&data[..take]);
                data = &data[take..];
                if self
                    .head_len()?
                    .is_some_and(|head_len| self.prefix.len() == 4 + head_len)
                {
                    self.start()?;
                }
                continue;
            };
            let Some(a) = head.artifacts.get(self.done.len()) else {
                return Err(malformed(format!(
                    "artifact frame has {} trailing bytes",
                    data.len()
                )));
            };
            let take = ((a.len as usize) - self.current.len()).min(data.len());
            self.current.extend_from_slice(&data[..take]);
            self.hasher.update(&data[..take]);
            data = &data[take..];
            self.finish_complete_artifacts()?;
        }
        Ok(())
    }

    /// The head's length, once its 4 bytes are in.
    fn head_len(&self) -> Result<Option<usize>, FrameError> {
        if self.prefix.len() < 4 {
            return Ok(None);
        }
        let head_len = u32::from_le_bytes(self.prefix[..4].try_into().expect("4 bytes")) as usize;
        if head_len > MAX_FRAME_HEAD {
            return Err(malformed(format!(
                "artifact frame head of {head_len} bytes is larger than {MAX_FRAME_HEAD}"
            )));
        }
        Ok(Some(head_len))
    }

    /// The head arrived: parse it, check what it declares against the limit.
    fn start(&mut self) -> Result<(), FrameError> {
        let head: FrameHead = serde_json::from_slice(&self.prefix[4..])
            .map_err(|e| malformed(format!("artifact frame head: {e}")))?;
        let declared = head
            .artifacts
            .iter()
            .try_fold(self.prefix.len() as u64, |sum, a| sum.checked_add(a.len));
        match declared {
            Some(total) if total <= self.limit => {}
            _ => return Err(FrameError::TooLarge { limit: self.limit }),
        }
        self.prefix = vec![];
        self.head = Some(head);
        self.begin_artifact()?;
        self.finish_complete_artifacts()
    }

    fn begin_artifact(&mut self) -> Result<(), FrameError> {
        let len = self
            .head
            .as_ref()
            .and_then(|h| h.artifacts.get(self.done.len()))
            .map_or(0, |a| a.len);
        // Within the limit (checked against the head's total in `start`), and allocated once
        // for the whole artifact; memory that cannot be had is an error, not an abort.
        self.current = Vec::new();
        usize::try_from(len)
            .ok()
            .and_then(|len| self.current.try_reserve_exact(len).ok())
            .ok_or_else(|| {
                malformed(format!(
                    "cannot allocate {len} bytes for an artifact of the frame"
                ))
            })?;
        self.hasher = blake3::Hasher::new();
        Ok(())
    }

    /// Verifies and keeps every artifact whose bytes are all in (zero-length ones at once).
    fn finish_complete_artifacts(&mut self) -> Result<(), FrameError> {
        loop {
            let head = self.head.as_mut().expect("head parsed");
            let i = self.done.len();
            let Some(a) = head.artifacts.get(i) else {
                return Ok(());
            };
            if (self.current.len() as u64) < a.len {
                return Ok(());
            }
            let actual = Digest(*self.hasher.finalize().as_bytes());
            if actual != a.digest {
                return Err(malformed(format!(
                    "artifact {i} arrived corrupt: digest {} but the sender said {}",
                    actual.short(),
                    a.digest.short()
                )));
            }
            let header = a.header.clone();
            let bytes = std::mem::take(&mut self.current);
            self.done.push(Artifact { header, bytes });
            self.begin_artifact()?;
        }
    }

    /// The frame ended: its artifacts (each verified) and log tail.
    pub fn finish(self) -> Result<(Vec<Artifact>, Vec<String>), FrameError> {
        let Some(head) = self.head else {
            return Err(if self.prefix.len() < 4 {
                malformed(format!(
                    "artifact frame of {} bytes has no head",
                    self.prefix.len()
                ))
            } else {
                malformed(format!(
                    "artifact frame head of {} bytes is cut short",
                    u32::from_le_bytes(self.prefix[..4].try_into().expect("4"))
                ))
            });
        };
        if self.done.len() < head.artifacts.len() {
            return Err(malformed(format!(
                "artifact {} of the frame is cut short",
                self.done.len()
            )));
        }
        Ok((self.done, head.log_tail))
    }
}

/// Decodes a frame, checking every artifact's bytes against its digest.
pub fn decode_frame(frame: &[u8]) -> anyhow::Result<(Vec<Artifact>, Vec<String>)> {
    let mut decoder = FrameDecoder::new(u64::MAX);
    decoder.push(frame)?;
    Ok(decoder.finish()?)
}

/// Reads a frame from `reader` (e.g. an HTTP body) in 1 MiB pieces, at most `limit` bytes.
pub fn read_frame(
    reader: &mut impl std::io::Read,
    limit: u64,
) -> anyhow::Result<(Vec<Artifact>, Vec<String>)> {
    let mut decoder = FrameDecoder::new(limit);
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = match reader.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(anyhow::Error::new(e).context("reading an artifact frame")),
        };
        decoder.push(&buf[..n])?;
    }
    Ok(decoder.finish()?)
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
        let mut long = frame.clone();
        long.push(0);
        let err = decode_frame(&long).unwrap_err().to_string();
        assert!(err.contains("trailing"), "{err}");
    }

    #[test]
    fn frames_decode_in_any_pieces_and_respect_the_limit() {
        let artifacts = vec![
            Artifact::text(""),
            Artifact::text("x".repeat(1000)),
            Artifact::text(""),
            Artifact::text("tail"),
        ];
        let frame = encode_frame(&artifacts, &["log".into()]);
        let (head, parts) = frame_parts(&artifacts, &["log".into()]);
        let joined: Vec<u8> = parts.iter().fold(head, |mut v, p| {
            v.extend_from_slice(p);
            v
        });
        assert_eq!(joined, frame);
        for piece in [1, 3, 7, 64, 5000] {
            let mut decoder = FrameDecoder::new(frame.len() as u64);
            for chunk in frame.chunks(piece) {
                decoder.push(chunk).unwrap();
            }
            let (back, tail) = decoder.finish().unwrap();
            assert_eq!(back.len(), 4, "pieces of {piece}");
            for (a, b) in back.iter().zip(&artifacts) {
                assert_eq!(a.bytes, b.bytes);
            }
            assert_eq!(tail, vec!["log".to_string()]);
        }
        // One byte under the frame's size: refused once the head declares more.
        let mut decoder = FrameDecoder::new(frame.len() as u64 - 1);
        let refused = frame
            .chunks(100)
            .map(|c| decoder.push(c))
            .find_map(Result::err)
            .expect("over the limit");
        assert!(matches!(refused, FrameError::TooLarge { .. }), "{refused}");
        // A head claiming an absurd length is refused before anything is allocated.
        let mut bad = (u32::MAX).to_le_bytes().to_vec();
        bad.extend_from_slice(b"{}");
        let err = decode_frame(&bad).unwrap_err().to_string();
        assert!(err.contains("larger than"), "{err}");
        // A head declaring an artifact of 2^60 bytes: an error, not an aborted process.
        let a = Artifact::text("x");
        let (header, digest) = (a.header.clone(), a.digest());
        let huge = frame_head_of(&[(header, digest, 1 << 60)], &[]);
        let err = decode_frame(&huge).unwrap_err().to_string();
        assert!(err.contains("cannot allocate"), "{err}");
    }
}
