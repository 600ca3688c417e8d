//! Worker runtime: stages running outside the coordinator's process. (The training
//! collectives ranks reduce over are `deeprepair-collective`.)
//!
//! - [`protocol`], [`coordinator`], [`worker`]: the HTTP protocol, its server (in front of the
//!   run's store) and its client (`deeprepair worker`).
//! - [`local`]: worker processes on this machine, one per GPU or N on the CPU.
//! - [`slurm`]: one Slurm job per stage.

pub mod coordinator;
pub mod local;
pub mod protocol;
pub mod slurm;
pub mod worker;

use thiserror::Error;

/// 32 hex digits no one outside this process can guess (worker tokens, a gang's TCP secret):
/// BLAKE3 over the kernel's random UUID, the pid, the clock and an address.
pub(crate) fn unguessable_hex() -> String {
    let mut hasher = blake3::Hasher::new();
    hasher.update(&std::process::id().to_le_bytes());
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    hasher.update(&now.as_nanos().to_le_bytes());
    // Address-space layout adds entropy the clock and pid lack.
    let stack_probe = 0u8;
    hasher.update(&(&stack_probe as *const u8 as usize).to_le_bytes());
    if let Ok(bytes) = std::fs::read("/proc/sys/kernel/random/uuid") {
        hasher.update(&bytes);
    }
    hasher.finalize().to_hex()[..32].to_string()
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
}
