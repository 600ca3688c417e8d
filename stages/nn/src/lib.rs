//! Models and training.
