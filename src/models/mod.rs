//! Forward passes of the SD3 components, built from [`crate::ops`] on a [`crate::graph::Graph`].

pub mod mmdit;
pub mod vae;
