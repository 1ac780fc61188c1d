//! Encryption at rest for collections that ask for it (`encrypted: true`).
//!
//! A value is sealed before it leaves the `Storage` that writes it: the engine, Redis,
//! PostgreSQL, the node's disk and every replica hold only ciphertext, and only a `Storage`
//! with the key reads it back. AES-256-GCM (ring) with a fresh random nonce per value and the
//! key's name as associated data, so a sealed value moved to another key does not open.
//!
//! Sealed form: `0xA5` (format) | nonce (12) | ciphertext and tag.
//!
//! The key never comes from the YAML: `AGENTSTORE_ENCRYPTION_KEY` (32 bytes in unpadded
//! URL-safe base64) or `AGENTSTORE_ENCRYPTION_KEY_FILE` (a file holding that text, or the 32
//! raw bytes).

use std::path::Path;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use ring::aead::{AES_256_GCM, Aad, LessSafeKey, NONCE_LEN, Nonce, UnboundKey};
use ring::rand::{SecureRandom, SystemRandom};

use super::StorageError;

const FORMAT: u8 = 0xA5;
/// The environment variable holding the key itself.
pub const KEY_ENV: &str = "AGENTSTORE_ENCRYPTION_KEY";
/// The environment variable naming a file that holds the key.
pub const KEY_FILE_ENV: &str = "AGENTSTORE_ENCRYPTION_KEY_FILE";

/// Seals and opens the values of encrypted collections.
pub(crate) struct Sealer {
    key: LessSafeKey,
    random: SystemRandom,
}

impl std::fmt::Debug for Sealer {
    /// The key is never shown.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Sealer")
    }
}

fn invalid(why: String) -> StorageError {
    StorageError::InvalidConfig(why)
}

impl Sealer {
    /// A sealer with these 32 bytes as its key.
    pub(crate) fn new(key: &[u8]) -> Result<Self, StorageError> {
        let key = UnboundKey::new(&AES_256_GCM, key)
            .map_err(|_| invalid(format!("an encryption key has 32 bytes, not {}", key.len())))?;
        Ok(Self {
            key: LessSafeKey::new(key),
            random: SystemRandom::new(),
        })
    }

    /// The sealer the environment names, for a store whose `collections` are encrypted.
    pub(crate) fn from_env(collections: &[String]) -> Result<Self, StorageError> {
        let missing = || {
            invalid(format!(
                "collection(s) {} are encrypted: give the key in {KEY_ENV} (32 random bytes in \
                 unpadded URL-safe base64) or in a file named by {KEY_FILE_ENV}",
                collections.join(", ")
            ))
        };
        let text = match (std::env::var(KEY_ENV), std::env::var_os(KEY_FILE_ENV)) {
            (Ok(text), _) => text.into_bytes(),
            (Err(_), Some(path)) => std::fs::read(Path::new(&path)).map_err(|e| {
                invalid(format!(
                    "{KEY_FILE_ENV} ({}): {e}",
                    Path::new(&path).display()
                ))
            })?,
            (Err(_), None) => return Err(missing()),
        };
        if text.len() == 32 {
            return Self::new(&text);
        }
        let decoded = std::str::from_utf8(&text)
            .ok()
            .and_then(|t| URL_SAFE_NO_PAD.decode(t.trim()).ok())
            .ok_or_else(|| {
                invalid("the encryption key is not 32 bytes in unpadded URL-safe base64".into())
            })?;
        Self::new(&decoded)
    }

    /// `value`, sealed for `key`.
    pub(crate) fn seal(&self, key: &[u8], mut value: Vec<u8>) -> Vec<u8> {
        let mut nonce = [0u8; NONCE_LEN];
        self.random
            .fill(&mut nonce)
            .expect("the system random source works");
        self.key
            .seal_in_place_append_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(key),
                &mut value,
            )
            .expect("AES-GCM seals any value under 64 GiB");
        let mut sealed = Vec::with_capacity(1 + NONCE_LEN + value.len());
        sealed.push(FORMAT);
        sealed.extend_from_slice(&nonce);
        sealed.extend_from_slice(&value);
        sealed
    }

    /// The value sealed for `key` in `sealed`; `None` if it is not sealed with this key for
    /// this key name (another key, another name, altered, or never sealed).
    pub(crate) fn open(&self, key: &[u8], sealed: &[u8]) -> Option<Vec<u8>> {
        let rest = sealed.strip_prefix(&[FORMAT])?;
        if rest.len() < NONCE_LEN {
            return None;
        }
        let (nonce, ciphertext) = rest.split_at(NONCE_LEN);
        let nonce = Nonce::try_assume_unique_for_key(nonce).ok()?;
        let mut buffer = ciphertext.to_vec();
        let plain = self
            .key
            .open_in_place(nonce, Aad::from(key), &mut buffer)
            .ok()?;
        Some(plain.to_vec())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sealed_value_opens_only_with_its_key_for_its_name() {
        let sealer = Sealer::new(&[7; 32]).unwrap();
        let sealed = sealer.seal(b"keys:a", b"secret".to_vec());
        assert!(!sealed.windows(6).any(|w| w == b"secret"));
        assert_eq!(sealer.open(b"keys:a", &sealed).unwrap(), b"secret");
        assert_ne!(
            sealed,
            sealer.seal(b"keys:a", b"secret".to_vec()),
            "fresh nonces"
        );
        assert!(
            sealer.open(b"keys:b", &sealed).is_none(),
            "moved to another key"
        );
        let other = Sealer::new(&[8; 32]).unwrap();
        assert!(
            other.open(b"keys:a", &sealed).is_none(),
            "another encryption key"
        );
        for i in 0..sealed.len() {
            let mut altered = sealed.clone();
            altered[i] ^= 1;
            assert!(
                sealer.open(b"keys:a", &altered).is_none(),
                "byte {i} altered"
            );
        }
        assert!(sealer.open(b"keys:a", b"\"plain\"").is_none());
    }
}
