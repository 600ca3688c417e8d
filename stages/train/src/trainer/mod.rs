//! The training loop shared by every method. A method is a [`BatchSource`]: it turns the
//! indices of a batch into pixels (one view, or clean + two augmented views for the
//! Jensen–Shannon loss) and targets. The loop does the rest: seeded shuffling per epoch,
//! cosine learning rate per step, one forward pass over all views (as AugMix does, so
//! BatchNorm sees them together), CE (+ λ·JSD), SGD, validation with early stopping, and a
//! checkpoint after every epoch from which a killed run resumes with the same result.
//!
//! Randomness is derived, never carried: epoch `e`'s order comes from `(seed, e)`, batch `s`'s
//! augmentation from `(seed, e, s)` and an image's from its position in the global batch, so a
//! resumed run needs no RNG state and per-image work can run on any number of threads (or
//! data-parallel ranks) with the same bytes.
//!
//! Prefetching: a source that does not consult the model ([`BatchSource::uses_model`]) builds
//! batches `s+1 … s+depth` on a producer thread while step `s` trains
//! ([`TrainConfig::prefetch`]); the batches are the same bytes either way.
//!
//! Data parallelism ([`train_data_parallel`]): N ranks (threads; each may own a GPU) each take a
//! contiguous shard of every global batch, average gradients with a
//! [`Collective`](deeprepair_collective::data_parallel::Collective) before every step, keep their
//! own BatchNorm statistics (PyTorch DDP's default; rank 0's are the ones saved) and take the
//! same early-stopping decisions (rank 0 validates and broadcasts them).

mod batches;
mod checkpoint;
mod config;
mod parallel;
mod rank_loop;

pub use batches::*;
use checkpoint::*;
pub use config::*;
pub use parallel::*;
use rank_loop::*;
