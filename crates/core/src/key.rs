//! Keys and the collections they belong to.
//!
//! A key is `collection[:rest]`: its collection is the first `:`-separated segment
//! (`agent:identity:123` is in `agent`). The collection picks the backend, the consistency
//! level and the conflict strategy of every key in it, so it must be a plain name; the rest of
//! the key may be any bytes, which lets binary keys live under a readable collection.

use std::fmt;

use crate::node::is_name_byte;

/// The longest key accepted, in bytes.
pub const MAX_KEY_LEN: usize = 1024;
/// The longest collection name accepted, in bytes.
pub const MAX_COLLECTION_LEN: usize = 64;

/// Why a key or collection name was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyError {
    /// The key has no bytes.
    #[error("the key is empty")]
    Empty,
    /// The key is longer than [`MAX_KEY_LEN`].
    #[error("the key is {len} bytes long; the limit is {MAX_KEY_LEN}")]
    TooLong {
        /// The key's length in bytes.
        len: usize,
    },
    /// The collection segment (before the first `:`) is empty: the key starts with `:`.
    #[error("the key starts with `:`, so it names no collection")]
    EmptyCollection,
    /// The collection segment is longer than [`MAX_COLLECTION_LEN`].
    #[error("the collection name is {len} bytes long; the limit is {MAX_COLLECTION_LEN}")]
    CollectionTooLong {
        /// The collection's length in bytes.
        len: usize,
    },
    /// The collection segment holds a byte other than ASCII letters, digits, `_`, `-`, `.`.
    #[error(
        "the collection name has the forbidden byte {byte:#04x} at offset {offset} \
         (only ASCII letters, digits, `_`, `-` and `.` are allowed before the first `:`)"
    )]
    ForbiddenByte {
        /// The offending byte.
        byte: u8,
        /// Its offset in the key.
        offset: usize,
    },
}

/// A validated key.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Key {
    bytes: Vec<u8>,
    /// Length of the collection segment, so `collection()` needs no search.
    collection_len: usize,
}

impl Key {
    /// Validates a key given as bytes.
    pub fn new(bytes: impl Into<Vec<u8>>) -> Result<Self, KeyError> {
        let bytes = bytes.into();
        if bytes.is_empty() {
            return Err(KeyError::Empty);
        }
        if bytes.len() > MAX_KEY_LEN {
            return Err(KeyError::TooLong { len: bytes.len() });
        }
        let collection_len = bytes.iter().position(|&b| b == b':').unwrap_or(bytes.len());
        validate_collection(&bytes[..collection_len])?;
        Ok(Self {
            bytes,
            collection_len,
        })
    }

    /// The key's bytes.
    pub fn as_bytes(&self) -> &[u8] {
        &self.bytes
    }

    /// The collection: the first `:`-separated segment.
    pub fn collection(&self) -> &str {
        // Validated as ASCII in `new`, so this cannot fail.
        std::str::from_utf8(&self.bytes[..self.collection_len]).unwrap_or_default()
    }

    /// The key as text when it is UTF-8.
    pub fn as_str(&self) -> Option<&str> {
        std::str::from_utf8(&self.bytes).ok()
    }
}

/// Checks that `name` can be a collection name.
pub fn validate_collection(name: &[u8]) -> Result<(), KeyError> {
    if name.is_empty() {
        return Err(KeyError::EmptyCollection);
    }
    if name.len() > MAX_COLLECTION_LEN {
        return Err(KeyError::CollectionTooLong { len: name.len() });
    }
    if let Some(offset) = name.iter().position(|&b| !is_name_byte(b)) {
        return Err(KeyError::ForbiddenByte {
            byte: name[offset],
            offset,
        });
    }
    Ok(())
}

impl std::str::FromStr for Key {
    type Err = KeyError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::new(s.as_bytes())
    }
}

impl TryFrom<&str> for Key {
    type Error = KeyError;
    fn try_from(s: &str) -> Result<Self, Self::Error> {
        Self::new(s.as_bytes())
    }
}

impl fmt::Display for Key {
    /// UTF-8 keys print as they are; other bytes print escaped (`\xNN`).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.as_str() {
            Some(s) => f.write_str(s),
            None => write!(f, "{}", self.bytes.escape_ascii()),
        }
    }
}

impl fmt::Debug for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Key({:?})", self.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn collection_is_the_first_segment() {
        let key: Key = "agent:identity:123".parse().unwrap();
        assert_eq!(key.collection(), "agent");
        let key: Key = "metrics".parse().unwrap();
        assert_eq!(key.collection(), "metrics");
    }

    #[test]
    fn bad_keys_get_typed_errors() {
        assert_eq!(Key::new(Vec::new()), Err(KeyError::Empty));
        assert_eq!(Key::new(":x"), Err(KeyError::EmptyCollection));
        assert_eq!(
            Key::new(vec![b'a'; MAX_KEY_LEN + 1]),
            Err(KeyError::TooLong {
                len: MAX_KEY_LEN + 1
            })
        );
        assert_eq!(
            Key::new("bad name:1"),
            Err(KeyError::ForbiddenByte {
                byte: b' ',
                offset: 3
            })
        );
        assert_eq!(
            Key::new(vec![b'c'; MAX_COLLECTION_LEN + 1]),
            Err(KeyError::CollectionTooLong {
                len: MAX_COLLECTION_LEN + 1
            })
        );
    }

    #[test]
    fn the_rest_of_a_key_may_be_binary_or_unicode() {
        let key = Key::new(b"blobs:\x00\xff\x10".to_vec()).unwrap();
        assert_eq!(key.collection(), "blobs");
        assert_eq!(key.to_string(), "blobs:\\x00\\xff\\x10");
        let key: Key = "notes:日本語 ✓".parse().unwrap();
        assert_eq!(key.collection(), "notes");
    }
}

/// `%XX`-escaped text as the bytes it stands for (URL paths and queries). A `%` not followed
/// by two hex digits stays as it is.
pub fn percent_decode(text: &str) -> Vec<u8> {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = bytes
            .get(i + 1..i + 3)
            .and_then(|h| std::str::from_utf8(h).ok())
            .and_then(|h| u8::from_str_radix(h, 16).ok());
        match (bytes[i], hex) {
            (b'%', Some(byte)) => {
                out.push(byte);
                i += 3;
            }
            (byte, _) => {
                out.push(byte);
                i += 1;
            }
        }
    }
    out
}

#[cfg(test)]
mod percent_tests {
    use super::percent_decode;

    #[test]
    fn escapes_decode_to_bytes_and_a_stray_percent_stays() {
        assert_eq!(percent_decode("a%3Ab%00%FF"), b"a:b\x00\xff");
        assert_eq!(percent_decode("100%"), b"100%");
        assert_eq!(percent_decode("%zz%4"), b"%zz%4");
    }
}
