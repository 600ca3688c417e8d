//! Worker runtime: stages running outside the coordinator's process. (The training
//! collectives ranks reduce over are `deeprepair-collective`.)
//!
//! - [`protocol`], [`coordinator`], [`worker`]: the HTTP protocol, its server (in front of the
//!   run's store) and its client (`deeprepair worker`); [`cache`]: the worker-side cache of
//!   input artifacts, keyed by digest; [`serve`]: a store served read-only, and pulling from it.
//! - [`local`]: worker processes on this machine, one per GPU or N on the CPU.
//! - [`slurm`]: one Slurm job per stage.
//! - [`backend`]: which of those a run uses, and each one's policy (listen address, what
//!   workers are told, the dispatcher).

pub mod backend;
pub mod cache;
pub mod coordinator;
pub mod local;
pub mod protocol;
pub mod serve;
pub mod slurm;
pub mod worker;

use thiserror::Error;

/// 32 hex digits (128 bits) from the operating system's random number generator: worker
/// tokens, lease secrets, a gang's TCP secret. Fails closed: when the OS cannot supply
/// randomness there is no fallback to guessable inputs (pid, clock), the caller refuses.
pub(crate) fn unguessable_hex() -> anyhow::Result<String> {
    let mut bytes = [0u8; 16];
    getrandom::fill(&mut bytes).map_err(|e| {
        anyhow::anyhow!(
            "the operating system's random number generator is unavailable ({e}); \
             refusing to make a guessable secret"
        )
    })?;
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}

/// A fresh 128-bit secret (32 hex digits) from the OS RNG, for tokens made outside this crate.
pub fn new_secret() -> anyhow::Result<String> {
    unguessable_hex()
}

/// Compares two secrets in time that does not depend on where they differ.
pub(crate) fn same_secret(given: &[u8], expected: &[u8]) -> bool {
    use subtle::ConstantTimeEq;
    // Lengths are public (every secret is 32 hex digits); the contents are compared in
    // constant time.
    given.len() == expected.len() && bool::from(given.ct_eq(expected))
}

#[derive(Debug, Error, PartialEq)]
pub enum GpuListError {
    #[error("bad GPU list '{list}': '{item}' is not a GPU ordinal (expected e.g. 0,1,2)")]
    NotAnOrdinal { list: String, item: String },
    #[error("bad GPU list '{list}': GPU {gpu} is listed twice")]
    Duplicate { list: String, gpu: u32 },
}

/// Parses `0,1,3` (spaces allowed; empty means none).
pub fn parse_gpu_list(list: &str) -> Result<Vec<u32>, GpuListError> {
    let mut out: Vec<u32> = vec![];
    for item in list.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        let gpu: u32 = item.parse().map_err(|_| GpuListError::NotAnOrdinal {
            list: list.into(),
            item: item.into(),
        })?;
        if out.contains(&gpu) {
            return Err(GpuListError::Duplicate {
                list: list.into(),
                gpu,
            });
        }
        out.push(gpu);
    }
    Ok(out)
}

/// GPUs for a run: the explicit list if given; otherwise none (CPU): using a GPU is a choice
/// the user makes with `--gpus`.
pub fn gpus_for_run(explicit: Option<&str>) -> Result<Vec<u32>, GpuListError> {
    match explicit {
        Some(list) => parse_gpu_list(list),
        None => Ok(vec![]),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_lists_and_rejects_bad_ones() {
        assert_eq!(parse_gpu_list("0,1, 3"), Ok(vec![0, 1, 3]));
        assert_eq!(parse_gpu_list(""), Ok(vec![]));
        assert!(matches!(
            parse_gpu_list("0,x"),
            Err(GpuListError::NotAnOrdinal { .. })
        ));
        assert_eq!(
            parse_gpu_list("1,1"),
            Err(GpuListError::Duplicate {
                list: "1,1".into(),
                gpu: 1
            })
        );
        assert_eq!(gpus_for_run(None), Ok(vec![]));
    }

    #[test]
    fn secrets_are_random_and_compared_whole() {
        let a = unguessable_hex().unwrap();
        let b = unguessable_hex().unwrap();
        assert_eq!(a.len(), 32);
        assert!(a.bytes().all(|c| c.is_ascii_hexdigit()));
        assert_ne!(a, b);
        assert!(same_secret(a.as_bytes(), a.clone().as_bytes()));
        assert!(!same_secret(a.as_bytes(), b.as_bytes()));
        assert!(!same_secret(&a.as_bytes()[..31], a.as_bytes()));
        assert!(!same_secret(b"", a.as_bytes()));
    }
}
