//! The collectives data-parallel ranks reduce over, apart from any process or network layer:
//!
//! - [`data_parallel`]: the `Collective` interface, its thread backend, bucketed DDP-style
//!   gradient averaging, the abort protocol ([`data_parallel::GroupAborted`]).
//! - [`socket_collective`]: its TCP backend for ranks in separate processes (a star around
//!   rank 0, joined through a gang's exchange).
//! - [`nccl`] (feature `nccl`): the NCCL backend on GPUs.

pub mod data_parallel;
#[cfg(feature = "nccl")]
pub mod nccl;
pub mod socket_collective;

/// 32 hex digits from the operating system's random source (a gang's TCP secret); an error,
/// never a guessable fallback, when that source is unavailable.
pub(crate) fn unguessable_hex() -> anyhow::Result<String> {
    let mut bytes = [0u8; 16];
    getrandom::fill(&mut bytes)
        .map_err(|e| anyhow::anyhow!("the operating system's random source failed: {e}"))?;
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}

/// Compares two secrets in time that does not depend on where they differ.
pub(crate) fn same_secret(given: &[u8], expected: &[u8]) -> bool {
    use subtle::ConstantTimeEq;
    // Lengths are public (every secret is 32 hex digits); the contents are compared in
    // constant time.
    given.len() == expected.len() && bool::from(given.ct_eq(expected))
}
