//! Stage keys: BLAKE3 over a canonical encoding of (kind, code version, params, input digests).

use crate::artifact::Digest;
use serde_json::{json, Value};
use std::collections::BTreeMap;

/// Bump to invalidate every key (e.g. when this encoding changes).
const KEY_SCHEMA: &str = "deeprepair-stage-key-v1";

/// Canonical JSON: object keys sorted (explicitly: a dependency enabling serde_json's
/// `preserve_order` must not change keys), no whitespace, numbers as serde_json prints them
/// (ints stay ints; floats were normalized by param checking).
pub fn canonical_json(value: &Value) -> Vec<u8> {
    let mut out = Vec::new();
    write_canonical(value, &mut out);
    out
}

fn write_canonical(value: &Value, out: &mut Vec<u8>) {
    match value {
        Value::Object(map) => {
            let mut entries: Vec<_> = map.iter().collect();
            entries.sort_by(|a, b| a.0.cmp(b.0));
            out.push(b'{');
            for (i, (k, v)) in entries.into_iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                out.extend(serde_json::to_vec(k).expect("a string serializes"));
                out.push(b':');
                write_canonical(v, out);
            }
            out.push(b'}');
        }
        Value::Array(items) => {
            out.push(b'[');
            for (i, v) in items.iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                write_canonical(v, out);
            }
            out.push(b']');
        }
        scalar => out.extend(serde_json::to_vec(scalar).expect("a scalar serializes")),
    }
}

pub fn stage_key(
    kind: &str,
    version: &str,
    params: &Value,
    inputs: &BTreeMap<String, Vec<Digest>>,
) -> Digest {
    stage_key_with_fingerprint(kind, version, params, inputs, None)
}

/// The key of a stage that also reads outside the store (see `StageKind::fingerprint`).
pub fn stage_key_with_fingerprint(
    kind: &str,
    version: &str,
    params: &Value,
    inputs: &BTreeMap<String, Vec<Digest>>,
    fingerprint: Option<&str>,
) -> Digest {
    let inputs: BTreeMap<&String, Vec<String>> = inputs
        .iter()
        .map(|(name, digests)| (name, digests.iter().map(|d| d.hex()).collect()))
        .collect();
    let mut encoding = json!({
        "schema": KEY_SCHEMA,
        "kind": kind,
        "version": version,
        "params": params,
        "inputs": inputs,
    });
    if let Some(f) = fingerprint {
        encoding["external"] = json!(f);
    }
    Digest::of(&canonical_json(&encoding))
}
