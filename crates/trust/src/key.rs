//! ed25519 keys (ring's implementation, already compiled for rustls).

use std::fmt;
use std::path::Path;
use std::str::FromStr;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use ring::rand::SystemRandom;
use ring::signature::{ED25519, Ed25519KeyPair, KeyPair as _, UnparsedPublicKey};

use crate::{TrustError, files};

/// The text form's prefix: `ed25519:` then the 32 bytes in unpadded URL-safe base64.
const PREFIX: &str = "ed25519:";

/// An ed25519 public key. Its text form (`ed25519:…`) is how a node, an authority or an
/// agent is named in configuration and on the command line.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PublicKey([u8; 32]);

impl PublicKey {
    /// The key of these 32 bytes. Any 32 bytes are accepted here; a byte string that is not
    /// a point of the curve simply verifies no signature.
    pub fn from_bytes(bytes: [u8; 32]) -> Self {
        Self(bytes)
    }

    /// The key's 32 bytes.
    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    /// Whether `signature` is this key's signature of `message`.
    pub fn verifies(&self, message: &[u8], signature: &[u8]) -> bool {
        UnparsedPublicKey::new(&ED25519, &self.0)
            .verify(message, signature)
            .is_ok()
    }
}

impl fmt::Display for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{PREFIX}{}", URL_SAFE_NO_PAD.encode(self.0))
    }
}

impl fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl FromStr for PublicKey {
    type Err = TrustError;

    fn from_str(text: &str) -> Result<Self, TrustError> {
        let encoded = text
            .trim()
            .strip_prefix(PREFIX)
            .ok_or_else(|| TrustError::malformed("public key", format!("expected `{PREFIX}…`")))?;
        let bytes = URL_SAFE_NO_PAD
            .decode(encoded)
            .map_err(|e| TrustError::malformed("public key", e.to_string()))?;
        let bytes: [u8; 32] = bytes.try_into().map_err(|b: Vec<u8>| {
            TrustError::malformed("public key", format!("{} bytes, not 32", b.len()))
        })?;
        Ok(Self(bytes))
    }
}

/// An ed25519 key pair, kept on disk as PKCS#8 (v2, which carries the public key too) in a
/// file of mode 0600.
pub struct SecretKey {
    pkcs8: Vec<u8>,
    pair: Ed25519KeyPair,
}

impl fmt::Debug for SecretKey {
    /// Shows the public half only: a secret never reaches a log.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SecretKey")
            .field("public", &self.public())
            .finish_non_exhaustive()
    }
}

impl SecretKey {
    /// A new key from the operating system's random source.
    pub fn generate() -> Self {
        let document = Ed25519KeyPair::generate_pkcs8(&SystemRandom::new())
            .expect("the system random source works");
        Self::from_pkcs8(document.as_ref()).expect("ring reads what it wrote")
    }

    /// The key in a PKCS#8 document.
    pub fn from_pkcs8(pkcs8: &[u8]) -> Result<Self, TrustError> {
        let pair = Ed25519KeyPair::from_pkcs8(pkcs8)
            .map_err(|e| TrustError::malformed("ed25519 PKCS#8 key", e.to_string()))?;
        Ok(Self {
            pkcs8: pkcs8.to_vec(),
            pair,
        })
    }

    /// The PKCS#8 document (what the key file holds; what TLS loads).
    pub fn pkcs8(&self) -> &[u8] {
        &self.pkcs8
    }

    /// The public half.
    pub fn public(&self) -> PublicKey {
        let mut bytes = [0u8; 32];
        bytes.copy_from_slice(self.pair.public_key().as_ref());
        PublicKey(bytes)
    }

    /// Signs `message`.
    pub fn sign(&self, message: &[u8]) -> [u8; 64] {
        let mut signature = [0u8; 64];
        signature.copy_from_slice(self.pair.sign(message).as_ref());
        signature
    }

    /// Reads the key in `path`.
    pub fn load(path: &Path) -> Result<Self, TrustError> {
        let pkcs8 = std::fs::read(path).map_err(|e| TrustError::io(path, &e))?;
        Self::from_pkcs8(&pkcs8).map_err(|e| TrustError::File {
            path: path.to_owned(),
            reason: e.to_string(),
        })
    }

    /// Writes this key to a new file `path` (mode 0600; an existing file is never replaced).
    pub fn save(&self, path: &Path) -> Result<(), TrustError> {
        files::write_private_file(path, &self.pkcs8)
    }

    /// Reads the key in `path`, or creates one there if there is no file; says whether it
    /// was created.
    pub fn load_or_create(path: &Path) -> Result<(Self, bool), TrustError> {
        if path.exists() {
            return Ok((Self::load(path)?, false));
        }
        let key = Self::generate();
        match key.save(path) {
            Ok(()) => Ok((key, true)),
            // Another process created it first: use that one.
            Err(_) if path.exists() => Ok((Self::load(path)?, false)),
            Err(err) => Err(err),
        }
    }
}
