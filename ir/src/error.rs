//! Errors of the IR crate.

use tcc_runtime::Op;

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The graph breaks a structural rule (a cycle, an undefined value, a wrong arity...).
    #[error("invalid graph: {0}")]
    Verify(String),
    /// An op rejected the types of its inputs.
    #[error("node `{node}` ({op}): {message}")]
    Infer { node: String, op: String, message: String },
    /// The IR text could not be parsed.
    #[error("line {line}: {message}")]
    Parse { line: usize, message: String },
    /// Evaluation failed (reference interpreter).
    #[error(transparent)]
    Runtime(#[from] tcc_runtime::Error),
    /// Calibration (running the graph on the user's samples) failed or was not given.
    #[error("calibration: {0}")]
    Calibration(String),
    /// A pass cannot do what it was asked on this graph (the message says why).
    #[error("{0}")]
    Pass(String),
}

impl Error {
    pub fn infer(node: &str, op: &Op, e: tcc_runtime::Error) -> Error {
        let message = match e {
            tcc_runtime::Error::Op { message, .. } => message,
            e => e.to_string(),
        };
        Error::Infer { node: node.to_string(), op: op.name().to_string(), message }
    }
}
