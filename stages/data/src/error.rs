//! The crate's error type.

use std::path::PathBuf;

/// Everything that can go wrong while reading, writing, decoding or fetching data.
///
/// Every variant names the file (or URL) concerned and says what was wrong or expected.
#[derive(Debug, thiserror::Error)]
pub enum DataError {
    /// An I/O operation on a file or directory failed.
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A file or directory exists but its content or layout is not what was expected.
    #[error("{}: {message}", path.display())]
    Format { path: PathBuf, message: String },
    /// An in-memory dataset (or its parts) is inconsistent.
    #[error("invalid dataset: {0}")]
    Invalid(String),
    /// Bytes given to [`crate::Dataset::from_bytes`] are not a valid encoded dataset.
    #[error("invalid encoded dataset: {0}")]
    Encoding(String),
    /// Image bytes could not be decoded or encoded.
    #[error("image: {0}")]
    Image(String),
    /// The network location could not be reached at all.
    #[error(
        "cannot reach {url}: {message}. This machine may have no internet access: download \
         cifar-10-binary.tar.gz on another machine and pass its unpacked folder with --data PATH"
    )]
    Unreachable { url: String, message: String },
    /// The server answered, but the download failed.
    #[error("download of {url} failed: {message}")]
    Download { url: String, message: String },
    /// A downloaded file does not have the expected SHA-256 digest.
    #[error("checksum mismatch for {source_name}: expected sha256 {expected}, got {actual}")]
    Checksum {
        source_name: String,
        expected: String,
        actual: String,
    },
}

impl DataError {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        DataError::Io {
            path: path.into(),
            source,
        }
    }

    pub(crate) fn format(path: impl Into<PathBuf>, message: impl Into<String>) -> Self {
        DataError::Format {
            path: path.into(),
            message: message.into(),
        }
    }
}
