//! Control plane model.
