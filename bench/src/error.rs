//! The benchmark's errors: what stops a configuration or the whole run.

use std::path::PathBuf;

/// An error that ends a configuration (recorded as a failure) or the whole benchmark.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A system call or file operation failed.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// The molt binary to benchmark does not exist.
    #[error(
        "molt binary {} not found: build it with `cargo build --release -p molt-vmm` \
         or pass --molt PATH",
        .0.display()
    )]
    NoMolt(PathBuf),
    /// molt's API answered something that is not an HTTP response with a JSON body.
    #[error("bad API response to {request}: {why}")]
    BadResponse {
        /// The request line.
        request: String,
        /// What is wrong with it.
        why: String,
    },
    /// Something did not happen in time.
    #[error("timed out after {secs} s waiting for {what}")]
    Timeout {
        /// What was awaited.
        what: String,
        /// How long.
        secs: u64,
    },
    /// The molt process ended while it should run.
    #[error("molt exited unexpectedly ({status}); its stderr: {stderr}")]
    MoltDied {
        /// Its exit status.
        status: String,
        /// The last lines of its standard error.
        stderr: String,
    },
    /// The host's huge page pool cannot supply what a configuration needs.
    #[error("{0}")]
    HugePages(String),
    /// A command-line value is malformed.
    #[error("{0}")]
    Usage(String),
    /// Drawing the plot failed.
    #[error("cannot draw {}: {why}", path.display())]
    Plot {
        /// The PNG file.
        path: PathBuf,
        /// The drawing backend's error.
        why: String,
    },
    /// Serializing the raw results failed.
    #[error("cannot encode the results as JSON: {0}")]
    Json(#[from] serde_json::Error),
    /// SIGINT or SIGTERM arrived.
    #[error("interrupted by a signal")]
    Interrupted,
}

impl Error {
    /// An [`Error::Io`] for `what`.
    pub fn io(what: impl Into<String>, source: std::io::Error) -> Error {
        Error::Io {
            what: what.into(),
            source,
        }
    }
}

/// Result with the benchmark's [`Error`].
pub type Result<T> = std::result::Result<T, Error>;
