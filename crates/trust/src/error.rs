use std::path::{Path, PathBuf};

/// Why a key, an admission or a peer was not accepted.
#[derive(Debug, thiserror::Error)]
pub enum TrustError {
    /// A key, admission or signature is not in the expected encoding.
    #[error("malformed {what}: {reason}")]
    Malformed {
        /// What was being read.
        what: &'static str,
        /// What is wrong with it.
        reason: String,
    },
    /// A signature does not verify under the key it should.
    #[error("the {what} is not signed by {signer}")]
    BadSignature {
        /// What carried the signature.
        what: &'static str,
        /// Whose signature it should be.
        signer: String,
    },
    /// An admission names another key than the one that presents it.
    #[error("the admission is for key {admitted}, not for {node}")]
    AdmissionForAnotherKey {
        /// The key the admission was issued for.
        admitted: String,
        /// The key presenting it.
        node: String,
    },
    /// A node has no admission yet.
    #[error(
        "this node is not admitted: {path} is missing. Its key is {key}; admit it with \
         `agentstore admit --authority <authority key file> --node <name> --data-dir <this node's data dir>`"
    )]
    NotAdmitted {
        /// Where the admission should be.
        path: PathBuf,
        /// The node's public key.
        key: String,
    },
    /// A key or admission file could not be read or written.
    #[error("{path}: {reason}")]
    File {
        /// The file.
        path: PathBuf,
        /// What went wrong.
        reason: String,
    },
    /// A signed write's token did not allow it.
    #[error("{reason}")]
    NotAllowed {
        /// What the token did not allow.
        reason: String,
    },
    /// TLS could not be set up with this key.
    #[error("TLS setup: {0}")]
    Tls(String),
}

impl TrustError {
    pub(crate) fn io(path: &Path, err: &std::io::Error) -> Self {
        Self::File {
            path: path.to_owned(),
            reason: err.to_string(),
        }
    }

    pub(crate) fn malformed(what: &'static str, reason: impl Into<String>) -> Self {
        Self::Malformed {
            what,
            reason: reason.into(),
        }
    }
}
