//! Forward passes of the SD3 components, built from [`crate::ops`] on a [`crate::graph::Graph`].

pub mod clip;
pub mod mmdit;
pub mod t5;
pub mod vae;
