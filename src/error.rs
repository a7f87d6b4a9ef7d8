//! The crate's error type.

use std::fmt;
use std::path::PathBuf;

use crate::gpu::GpuError;

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
    /// The caller stopped the work (a server's job was cancelled).
    Cancelled,
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Gpu(e) => e.fmt(f),
            Error::Shape { op, msg } => write!(f, "{op}: {msg}"),
            Error::Graph(m) => f.write_str(m),
            Error::Weights(e) => e.fmt(f),
            Error::Io(m) => f.write_str(m),
            Error::Cancelled => f.write_str("cancelled"),
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

/// Errors reading weights, each naming the file or tensor and what was expected.
#[derive(Debug)]
pub enum WeightsError {
    /// The path does not exist or cannot be read.
    Io {
        /// The path.
        path: PathBuf,
        /// The OS error.
        err: String,
    },
    /// Not a safetensors file, or a truncated one, or a bad index.
    Format {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        msg: String,
    },
    /// A tensor the model needs is absent.
    Missing {
        /// The tensor's name in the file's own naming scheme.
        name: String,
        /// Where it was looked for.
        source: String,
    },
    /// A tensor has the wrong rank or shape.
    Shape {
        /// The file (or shards) holding it.
        file: String,
        /// Tensor name.
        name: String,
        /// What was expected, e.g. `[64]` or `rank 2 [out, in]`.
        expected: String,
        /// Shape found.
        found: Vec<usize>,
    },
    /// A tensor is stored in a dtype we cannot convert.
    Dtype {
        /// The file (or shards) holding it.
        file: String,
        /// Tensor name.
        name: String,
        /// The stored dtype.
        found: String,
    },
    /// The layout or model is not one we know, or a config value is out of range.
    Unsupported(String),
}

impl fmt::Display for WeightsError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            WeightsError::Io { path, err } => write!(f, "{}: {err}", path.display()),
            WeightsError::Format { path, msg } => {
                write!(
                    f,
                    "{}: not a readable safetensors file: {msg}",
                    path.display()
                )
            }
            WeightsError::Missing { name, source } => {
                write!(f, "tensor '{name}' is missing from {source}")
            }
            WeightsError::Shape {
                file,
                name,
                expected,
                found,
            } => write!(
                f,
                "{file}: tensor '{name}' has shape {found:?}, expected {expected}"
            ),
            WeightsError::Dtype { file, name, found } => write!(
                f,
                "{file}: tensor '{name}' is stored as {found}; supported: F32, F16, BF16, F8_E4M3, F8_E5M2"
            ),
            WeightsError::Unsupported(m) => f.write_str(m),
        }
    }
}

impl std::error::Error for WeightsError {}
