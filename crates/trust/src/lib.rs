//! Who may take part in an agentstore cluster.
//!
//! Every node has an ed25519 key of its own ([`SecretKey`], created at first start in its data
//! directory, readable by its owner alone). A cluster has an **authority**: another ed25519 key,
//! kept by whoever runs the cluster, whose public half every node's configuration names. The
//! authority admits a node by signing its name together with its public key
//! ([`Admission`]); nothing else makes a process a member.
//!
//! Two nodes talk only over mutual TLS 1.3 in which each side proves possession of its node
//! key (raw public keys, RFC 7250: no X.509, no certificate authority to run). The first
//! thing each side sends over the encrypted link is its admission, and each side checks it
//! ([`PeerTrust::check_hello`]): signed by the cluster's authority, for the very key that
//! signed the TLS handshake. So a hello naming another node's id without that node's key is
//! refused, and so is a process the authority never admitted.
//!
//! Clients present a [`Capability`]: rights (read, write, admin on key prefixes) and an expiry
//! granted by the same authority, which any holder can narrow further offline. A client may
//! also sign a write with its token ([`Capability::sign_write`]); the [`Attestation`] travels
//! with the record, and every replica checks it against the authority before storing it.

mod admission;
mod attestation;
mod capability;
mod certificates;
mod error;
mod files;
mod key;
mod tls;

pub use admission::{Admission, MAX_NAME};
pub use attestation::Attestation;
pub use capability::{Capability, Operation, Right};
pub use certificates::{
    authority_certificate, client_api_certificate, client_api_client, client_api_server,
};
pub use error::TrustError;
use files::replace_private_file;
pub use files::write_private_file;
pub use key::{PublicKey, SecretKey};
pub use tls::{PeerTls, peer_key};

use std::path::{Path, PathBuf};
use std::sync::Arc;

/// The name of a node's key file in its data directory.
pub const NODE_KEY_FILE: &str = "node.key";
/// The name of a node's admission file in its data directory.
pub const ADMISSION_FILE: &str = "admission.token";
/// The name of a node's client-API certificate chain in its data directory.
pub const CLIENT_CERT_FILE: &str = "client-api.crt";

/// Where a node keeps its key.
pub fn node_key_path(data_dir: &Path) -> PathBuf {
    data_dir.join(NODE_KEY_FILE)
}

/// Where a node keeps its client API's certificate chain.
pub fn client_cert_path(data_dir: &Path) -> PathBuf {
    data_dir.join(CLIENT_CERT_FILE)
}

/// Where a node keeps its admission.
pub fn admission_path(data_dir: &Path) -> PathBuf {
    data_dir.join(ADMISSION_FILE)
}

/// Admits the node `name` whose data directory is `data_dir`: creates its key if it has none
/// and writes its admission there (replacing an earlier one). With `hosts` (the names and
/// addresses clients reach the node by), also writes the certificate its client API serves
/// over TLS, signed by the authority. Returns the node's public key. This is what
/// `agentstore admit` does; the authority's key never leaves the machine that runs it.
pub fn admit(
    authority: &SecretKey,
    name: &str,
    data_dir: &Path,
    hosts: &[String],
) -> Result<PublicKey, TrustError> {
    let (key, _) = SecretKey::load_or_create(&node_key_path(data_dir))?;
    let admission = Admission::issue(authority, name, key.public())?;
    replace_private_file(&admission_path(data_dir), admission.to_text().as_bytes())?;
    if !hosts.is_empty() {
        let chain = client_api_certificate(authority, &key, hosts)?;
        replace_private_file(&client_cert_path(data_dir), chain.as_bytes())?;
    }
    Ok(key.public())
}

/// The authority a configuration names: its public key (`ed25519:…`), or the path of a file
/// holding it (what `agentstore authority new` writes beside the secret key).
pub fn authority_from(text: &str) -> Result<PublicKey, TrustError> {
    let text = text.trim();
    if text.starts_with("ed25519:") {
        return text.parse();
    }
    let path = Path::new(text);
    let contents = std::fs::read_to_string(path).map_err(|e| TrustError::io(path, &e))?;
    contents.parse().map_err(|e: TrustError| TrustError::File {
        path: path.to_owned(),
        reason: e.to_string(),
    })
}

/// Everything a node needs to open and accept authenticated peer links: its key, its
/// admission, the authority that admits its peers, and the TLS settings built from them.
#[derive(Debug, Clone)]
pub struct PeerTrust {
    admission: Admission,
    authority: PublicKey,
    tls: Arc<PeerTls>,
}

impl PeerTrust {
    /// A node's trust from its key and admission. Refuses an admission that is not for `key`
    /// or not signed by `authority`, so a misconfigured node fails at start, not at its
    /// first connection.
    pub fn new(
        key: &SecretKey,
        admission: Admission,
        authority: PublicKey,
    ) -> Result<Self, TrustError> {
        if admission.key() != &key.public() {
            return Err(TrustError::AdmissionForAnotherKey {
                admitted: admission.key().to_string(),
                node: key.public().to_string(),
            });
        }
        admission.verify(&authority)?;
        Ok(Self {
            tls: Arc::new(PeerTls::new(key)?),
            admission,
            authority,
        })
    }

    /// A node with a fresh key, admitted as `name` by `authority` at once (when the same
    /// process holds both, as in tests and tools).
    pub fn generate(authority: &SecretKey, name: &str) -> Result<Self, TrustError> {
        let key = SecretKey::generate();
        let admission = Admission::issue(authority, name, key.public())?;
        Self::new(&key, admission, authority.public())
    }

    /// Loads the trust of the node whose data directory is `data_dir`: its key (created if
    /// there is none yet) and its admission. A node without an admission is told how to get
    /// one, with its public key.
    pub fn load(data_dir: &Path, authority: PublicKey) -> Result<Self, TrustError> {
        let (key, _) = SecretKey::load_or_create(&node_key_path(data_dir))?;
        let path = admission_path(data_dir);
        let admission = match std::fs::read_to_string(&path) {
            Ok(text) => Admission::from_text(&text).map_err(|err| TrustError::File {
                path: path.clone(),
                reason: err.to_string(),
            })?,
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => {
                return Err(TrustError::NotAdmitted {
                    path,
                    key: key.public().to_string(),
                });
            }
            Err(err) => return Err(TrustError::io(&path, &err)),
        };
        Self::new(&key, admission, authority)
    }

    /// The name this node was admitted under.
    pub fn name(&self) -> &str {
        self.admission.name()
    }

    /// This node's public key.
    pub fn key(&self) -> &PublicKey {
        self.admission.key()
    }

    /// The authority that admits this cluster's nodes (and grants its clients' tokens).
    pub fn authority(&self) -> &PublicKey {
        &self.authority
    }

    /// The TLS settings for peer links.
    pub fn tls(&self) -> &PeerTls {
        &self.tls
    }

    /// What this node sends first on a peer link: its admission.
    pub fn hello(&self) -> Vec<u8> {
        self.admission.encode()
    }

    /// Checks a peer's hello: an admission signed by this cluster's authority for the key that
    /// signed the link's handshake (`link_key`). Returns the name the peer was admitted under.
    pub fn check_hello(&self, hello: &[u8], link_key: &PublicKey) -> Result<String, TrustError> {
        let admission = Admission::decode(hello)?;
        admission.verify(&self.authority)?;
        if admission.key() != link_key {
            return Err(TrustError::AdmissionForAnotherKey {
                admitted: admission.key().to_string(),
                node: link_key.to_string(),
            });
        }
        Ok(admission.name().to_owned())
    }
}
