//! Signed writes: an agent's signature over one write, checkable by anyone who knows the
//! cluster's authority.
//!
//! A writer signs with its capability token's proof ([`crate::Capability::sign_write`]). The
//! attestation carries the token's blocks (not its proof) and the signature, so a replica
//! checks, with nothing but the authority's public key, that the chain comes from the
//! authority, that it let its holder write this key when the write was signed, and that the
//! holder signed exactly this key and value. The holder's key is the write's **author**.
//!
//! Binary form, canonical:
//!
//! ```text
//! attestation = format (1 byte, 1) | chain (the token's blocks, as in a token)
//!               | signed_at_ms (8, big-endian) | signature (64)
//! ```
//!
//! The signature covers `agentstore signed write v1\0`, the chain's last block signature (so
//! it cannot move onto another chain), `signed_at_ms`, the key (4-byte big-endian length and
//! bytes) and the value (`0` for a delete, or `1`, a 4-byte length and the bytes). Text form:
//! `agentstore-attestation-v1:` and the binary form in unpadded URL-safe base64.

use std::fmt;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;

use crate::capability::{Chain, Reader};
use crate::{Operation, PublicKey, TrustError};

const FORMAT: u8 = 1;
const DOMAIN: &[u8] = b"agentstore signed write v1\0";
const TEXT_PREFIX: &str = "agentstore-attestation-v1:";

/// An agent's signature over one write (see the module's doc).
#[derive(Clone, PartialEq, Eq)]
pub struct Attestation {
    chain: Chain,
    signed_at_ms: u64,
    signature: [u8; 64],
}

impl fmt::Debug for Attestation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Attestation")
            .field("author", &self.author().to_string())
            .field("signed_at_ms", &self.signed_at_ms)
            .finish_non_exhaustive()
    }
}

impl Attestation {
    pub(crate) fn new(chain: Chain, signed_at_ms: u64, signature: [u8; 64]) -> Self {
        Self {
            chain,
            signed_at_ms,
            signature,
        }
    }

    /// What the writer signs.
    pub(crate) fn message(
        chain: &Chain,
        key: &str,
        value: Option<&[u8]>,
        signed_at_ms: u64,
    ) -> Vec<u8> {
        let mut message = Vec::with_capacity(
            DOMAIN.len() + 64 + 8 + 4 + key.len() + 5 + value.map_or(0, <[u8]>::len),
        );
        message.extend_from_slice(DOMAIN);
        message.extend_from_slice(chain.last_signature());
        message.extend_from_slice(&signed_at_ms.to_be_bytes());
        message.extend_from_slice(&(key.len() as u32).to_be_bytes());
        message.extend_from_slice(key.as_bytes());
        match value {
            None => message.push(0),
            Some(value) => {
                message.push(1);
                message.extend_from_slice(&(value.len() as u32).to_be_bytes());
                message.extend_from_slice(value);
            }
        }
        message
    }

    /// The key that signed: the writer's identity.
    pub fn author(&self) -> PublicKey {
        self.chain.holder()
    }

    /// When the writer signed (milliseconds since the Unix epoch, by the writer's clock).
    pub fn signed_at_ms(&self) -> u64 {
        self.signed_at_ms
    }

    /// Checks that this attestation signs `value` (`None`: a delete) under `key`, by a
    /// writer whose chain from `authority` allowed writing `key` when it signed. Returns the
    /// author. The same as [`Attestation::verify_chain`] then
    /// [`Attestation::verify_write`].
    pub fn verify(
        &self,
        authority: &PublicKey,
        key: &str,
        value: Option<&[u8]>,
    ) -> Result<PublicKey, TrustError> {
        self.verify_chain(authority)?;
        self.verify_write(key, value)
    }

    /// Checks only the token chain: every block signed, the first by `authority`. Its
    /// outcome depends on [`Attestation::chain_bytes`] alone, so a verifier may remember it
    /// for those bytes (a writer signs many writes with one chain).
    pub fn verify_chain(&self, authority: &PublicKey) -> Result<PublicKey, TrustError> {
        self.chain.verify(authority, "attestation's token")
    }

    /// Checks the write, given a chain already verified: the chain allowed writing `key`
    /// when the write was signed, and its holder signed exactly this key and value.
    pub fn verify_write(&self, key: &str, value: Option<&[u8]>) -> Result<PublicKey, TrustError> {
        let author = self.chain.holder();
        if !self.chain.allows(Operation::Write, key, self.signed_at_ms) {
            return Err(TrustError::NotAllowed {
                reason: format!(
                    "the writer's token did not allow write on '{key}' at {} ms",
                    self.signed_at_ms
                ),
            });
        }
        let message = Self::message(&self.chain, key, value, self.signed_at_ms);
        if !author.verifies(&message, &self.signature) {
            return Err(TrustError::BadSignature {
                what: "write",
                signer: format!("its author ({author}) over this key and value"),
            });
        }
        Ok(author)
    }

    /// The chain's bytes: what [`Attestation::verify_chain`] depends on.
    pub fn chain_bytes(&self) -> Vec<u8> {
        let mut out = Vec::new();
        self.chain.encode_into(&mut out);
        out
    }

    /// The binary form.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = vec![FORMAT];
        self.chain.encode_into(&mut out);
        out.extend_from_slice(&self.signed_at_ms.to_be_bytes());
        out.extend_from_slice(&self.signature);
        out
    }

    /// Reads the binary form; refuses trailing bytes. Says nothing of the signatures: see
    /// [`Attestation::verify`].
    pub fn decode(bytes: &[u8]) -> Result<Self, TrustError> {
        let mut reader = Reader::new(bytes, "attestation");
        let format = reader.u8()?;
        if format != FORMAT {
            return Err(TrustError::malformed(
                "attestation",
                format!("unknown format {format}"),
            ));
        }
        let chain = Chain::decode_from(&mut reader)?;
        let signed_at_ms = u64::from_be_bytes(reader.array()?);
        let signature = reader.array()?;
        reader.finish()?;
        Ok(Self {
            chain,
            signed_at_ms,
            signature,
        })
    }

    /// The text form.
    pub fn to_text(&self) -> String {
        format!("{TEXT_PREFIX}{}", URL_SAFE_NO_PAD.encode(self.encode()))
    }

    /// Reads the text form.
    pub fn from_text(text: &str) -> Result<Self, TrustError> {
        let encoded = text.trim().strip_prefix(TEXT_PREFIX).ok_or_else(|| {
            TrustError::malformed("attestation", format!("expected `{TEXT_PREFIX}…`"))
        })?;
        let bytes = URL_SAFE_NO_PAD
            .decode(encoded)
            .map_err(|e| TrustError::malformed("attestation", e.to_string()))?;
        Self::decode(&bytes)
    }
}
