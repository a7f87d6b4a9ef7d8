//! The crate's error type.

use std::fmt;

use crate::gpu::GpuError;
use crate::weights::WeightsError;

/// Everything that can go wrong in the engine, each with a message that names
/// the op, tensor or file and what was expected.
#[derive(Debug)]
pub enum Error {
    /// Adapter, device, limits, readback.
    Gpu(GpuError),
    /// An op was given tensors it cannot take.
    Shape {
        /// The op's label, e.g. `mmdit.block3.x.attn.qkv.linear`.
        op: String,
        /// What was expected and what was found.
        msg: String,
    },
    /// Misuse of a graph or plan (unknown value, value not kept, wrong data length).
    Graph(String),
    /// A checkpoint could not be read or does not fit the model.
    Weights(WeightsError),
    /// Reading or writing an image or data file failed (the message names the path).
    Io(String),
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Gpu(e) => e.fmt(f),
            Error::Shape { op, msg } => write!(f, "{op}: {msg}"),
            Error::Graph(m) => f.write_str(m),
            Error::Weights(e) => e.fmt(f),
            Error::Io(m) => f.write_str(m),
        }
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Error::Gpu(e) => Some(e),
            Error::Weights(e) => Some(e),
            _ => None,
        }
    }
}

impl From<GpuError> for Error {
    fn from(e: GpuError) -> Self {
        Error::Gpu(e)
    }
}

/// Result with the crate's [`Error`].
pub type Result<T> = std::result::Result<T, Error>;

impl From<WeightsError> for Error {
    fn from(e: WeightsError) -> Self {
        Error::Weights(e)
    }
}
