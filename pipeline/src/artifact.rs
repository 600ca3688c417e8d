//! Artifacts: the typed values stages exchange, content-addressed by the BLAKE3 of their bytes.

use serde::{Deserialize, Serialize};
use std::fmt;

/// A 32-byte BLAKE3 digest: of an artifact's bytes, of a chunk, or of a stage key's encoding.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Digest(pub [u8; 32]);

impl Digest {
    pub fn of(bytes: &[u8]) -> Self {
        Digest(*blake3::hash(bytes).as_bytes())
    }
    pub fn hex(&self) -> String {
        self.0.iter().map(|b| format!("{b:02x}")).collect()
    }
    /// The first 12 hex digits: what the CLI prints and accepts as a prefix.
    pub fn short(&self) -> String {
        self.hex()[..12].to_string()
    }
    pub fn from_hex(s: &str) -> Option<Self> {
        if s.len() != 64 {
            return None;
        }
        let mut out = [0u8; 32];
        for (i, byte) in out.iter_mut().enumerate() {
            *byte = u8::from_str_radix(s.get(2 * i..2 * i + 2)?, 16).ok()?;
        }
        Some(Digest(out))
    }
}

impl fmt::Debug for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.short())
    }
}
impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.hex())
    }
}
impl Serialize for Digest {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.hex())
    }
}
impl<'de> Deserialize<'de> for Digest {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Digest::from_hex(&s).ok_or_else(|| serde::de::Error::custom(format!("bad digest '{s}'")))
    }
}

/// What an artifact is, so `inspect` and `export` can show it without knowing its stage.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ArtifactKind {
    Tensor,
    Dataset,
    Model,
    Metrics,
    Image,
    Report,
    Text,
    Checkpoint,
}

impl ArtifactKind {
    pub fn as_str(&self) -> &'static str {
        match self {
            ArtifactKind::Tensor => "tensor",
            ArtifactKind::Dataset => "dataset",
            ArtifactKind::Model => "model",
            ArtifactKind::Metrics => "metrics",
            ArtifactKind::Image => "image",
            ArtifactKind::Report => "report",
            ArtifactKind::Text => "text",
            ArtifactKind::Checkpoint => "checkpoint",
        }
    }
}

/// The typed header stored beside an artifact's bytes.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ArtifactHeader {
    pub kind: ArtifactKind,
    /// MIME type of the bytes, e.g. `application/json`, `image/png`, `application/x-safetensors`.
    pub media_type: String,
    /// File extension `export` uses, without the dot.
    pub extension: String,
    /// Small, kind-specific description (shape, dtype, class names, summary numbers).
    #[serde(default)]
    pub meta: serde_json::Value,
}

impl ArtifactHeader {
    pub fn new(kind: ArtifactKind, media_type: &str, extension: &str) -> Self {
        ArtifactHeader {
            kind,
            media_type: media_type.into(),
            extension: extension.into(),
            meta: serde_json::Value::Null,
        }
    }
    pub fn with_meta(mut self, meta: serde_json::Value) -> Self {
        self.meta = meta;
        self
    }
}

/// An artifact in memory: header plus bytes.
#[derive(Clone, Debug)]
pub struct Artifact {
    pub header: ArtifactHeader,
    pub bytes: Vec<u8>,
}

impl Artifact {
    pub fn json(kind: ArtifactKind, value: &impl Serialize) -> Self {
        let bytes = serde_json::to_vec_pretty(value).expect("serializing a Value cannot fail");
        Artifact {
            header: ArtifactHeader::new(kind, "application/json", "json"),
            bytes,
        }
    }
    pub fn text(text: impl Into<String>) -> Self {
        Artifact {
            header: ArtifactHeader::new(ArtifactKind::Text, "text/plain", "txt"),
            bytes: text.into().into_bytes(),
        }
    }
    pub fn digest(&self) -> Digest {
        Digest::of(&self.bytes)
    }
}
