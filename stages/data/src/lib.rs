//! Datasets and corruptions.
