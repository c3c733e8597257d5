//! The runtime's error type. Every failure on a user's artifact or input is one of these, never
//! a panic.

use std::path::PathBuf;

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The artifact file is not a valid `.tcc` file of a version this runtime reads.
    #[error("invalid artifact: {0}")]
    Artifact(String),
    /// The inputs given to `run` do not fit the model.
    #[error("invalid input: {0}")]
    Input(String),
    /// An `.npz`/`.npy`/`.json` tensor file could not be read or written.
    #[error("tensor file: {0}")]
    TensorFile(String),
    #[error("dtype mismatch: {0}")]
    DType(String),
    #[error("shape error: {0}")]
    Shape(String),
    /// An operator rejected its inputs.
    #[error("{op}: {message}")]
    Op { op: String, message: String },
    #[error("tokenizer: {0}")]
    Tokenizer(String),
}

impl Error {
    pub fn op(op: impl Into<String>, message: impl Into<String>) -> Error {
        Error::Op { op: op.into(), message: message.into() }
    }

    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Error {
        Error::Io { path: path.into(), source }
    }
}
