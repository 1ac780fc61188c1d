//! A node's admission: the cluster authority's signature over the node's name and key.
//!
//! Binary form (what a hello carries), canonical and prefix-free:
//!
//! ```text
//! format (1 byte, 1) | name length (1 byte, 1..=64) | name (UTF-8) | key (32) | signature (64)
//! ```
//!
//! The signature covers `agentstore admission v1\0` followed by every byte before it, so an
//! admission cannot be mistaken for any other signed message of agentstore's.
//! Text form (the `admission.token` file): `agentstore-admission-v1:` and the binary form in
//! unpadded URL-safe base64.

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;

use crate::{PublicKey, SecretKey, TrustError};

/// The longest node name an admission carries.
pub const MAX_NAME: usize = 64;
const FORMAT: u8 = 1;
const DOMAIN: &[u8] = b"agentstore admission v1\0";
const TEXT_PREFIX: &str = "agentstore-admission-v1:";

/// The authority's word that the node `name` is the holder of `key`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Admission {
    name: String,
    key: PublicKey,
    signature: [u8; 64],
}

impl Admission {
    /// The authority admits the node `name` holding `key`.
    pub fn issue(authority: &SecretKey, name: &str, key: PublicKey) -> Result<Self, TrustError> {
        check_name(name)?;
        let mut admission = Self {
            name: name.to_owned(),
            key,
            signature: [0; 64],
        };
        admission.signature = authority.sign(&admission.signed_message());
        Ok(admission)
    }

    /// The admitted node's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The admitted node's key.
    pub fn key(&self) -> &PublicKey {
        &self.key
    }

    /// Checks that `authority` signed this admission.
    pub fn verify(&self, authority: &PublicKey) -> Result<(), TrustError> {
        if authority.verifies(&self.signed_message(), &self.signature) {
            Ok(())
        } else {
            Err(TrustError::BadSignature {
                what: "admission",
                signer: format!("this cluster's authority ({authority})"),
            })
        }
    }

    fn unsigned(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(2 + self.name.len() + 32 + 64);
        out.push(FORMAT);
        out.push(self.name.len() as u8);
        out.extend_from_slice(self.name.as_bytes());
        out.extend_from_slice(self.key.as_bytes());
        out
    }

    fn signed_message(&self) -> Vec<u8> {
        let mut message = DOMAIN.to_vec();
        message.extend_from_slice(&self.unsigned());
        message
    }

    /// The binary form.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = self.unsigned();
        out.extend_from_slice(&self.signature);
        out
    }

    /// Reads the binary form; refuses anything but exactly one admission (no trailing bytes).
    /// Says nothing of the signature: see [`Admission::verify`].
    pub fn decode(bytes: &[u8]) -> Result<Self, TrustError> {
        let malformed = |reason: &str| TrustError::malformed("admission", reason);
        let (&format, rest) = bytes.split_first().ok_or_else(|| malformed("empty"))?;
        if format != FORMAT {
            return Err(malformed(&format!("unknown format {format}")));
        }
        let (&len, rest) = rest.split_first().ok_or_else(|| malformed("truncated"))?;
        let len = usize::from(len);
        if rest.len() != len + 32 + 64 {
            return Err(malformed(&format!(
                "{} bytes after a {len}-byte name's length, expected {}",
                rest.len(),
                len + 96
            )));
        }
        let (name, rest) = rest.split_at(len);
        let name = std::str::from_utf8(name).map_err(|_| malformed("the name is not UTF-8"))?;
        check_name(name)?;
        let (key, signature) = rest.split_at(32);
        Ok(Self {
            name: name.to_owned(),
            key: PublicKey::from_bytes(key.try_into().expect("split at 32")),
            signature: signature.try_into().expect("64 bytes left"),
        })
    }

    /// The text form (what `agentstore admit` writes).
    pub fn to_text(&self) -> String {
        format!("{TEXT_PREFIX}{}\n", URL_SAFE_NO_PAD.encode(self.encode()))
    }

    /// Reads the text form.
    pub fn from_text(text: &str) -> Result<Self, TrustError> {
        let encoded = text.trim().strip_prefix(TEXT_PREFIX).ok_or_else(|| {
            TrustError::malformed("admission", format!("expected `{TEXT_PREFIX}…`"))
        })?;
        let bytes = URL_SAFE_NO_PAD
            .decode(encoded)
            .map_err(|e| TrustError::malformed("admission", e.to_string()))?;
        Self::decode(&bytes)
    }
}

fn check_name(name: &str) -> Result<(), TrustError> {
    if name.is_empty() || name.len() > MAX_NAME {
        return Err(TrustError::malformed(
            "admission",
            format!("a node name has 1 to {MAX_NAME} bytes, not {}", name.len()),
        ));
    }
    Ok(())
}
