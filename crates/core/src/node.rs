//! Node identifiers.

use std::fmt;

use serde::{Deserialize, Serialize};

/// The longest node id accepted, in bytes.
pub const MAX_NODE_ID_LEN: usize = 64;

/// The name of a node: 1 to 64 bytes of ASCII letters, digits, `_`, `-` or `.`.
///
/// Node ids order writes that carry the same hybrid timestamp (the spec's LWW tiebreak), and
/// they key version vectors, so every node of a deployment must have a distinct id.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct NodeId(String);

/// A node id that breaks the rules of [`NodeId`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid node id `{given}`: {reason}")]
pub struct InvalidNodeId {
    /// What was given.
    pub given: String,
    /// Which rule it breaks.
    pub reason: &'static str,
}

impl NodeId {
    /// Validates and wraps a node id.
    pub fn new(id: impl Into<String>) -> Result<Self, InvalidNodeId> {
        let id = id.into();
        let reason = if id.is_empty() {
            Some("it is empty")
        } else if id.len() > MAX_NODE_ID_LEN {
            Some("it is longer than 64 bytes")
        } else if !id.bytes().all(is_name_byte) {
            Some("only ASCII letters, digits, `_`, `-` and `.` are allowed")
        } else {
            None
        };
        match reason {
            Some(reason) => Err(InvalidNodeId { given: id, reason }),
            None => Ok(Self(id)),
        }
    }

    /// The id as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// Bytes allowed in node ids and collection names.
pub(crate) fn is_name_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.')
}

impl TryFrom<String> for NodeId {
    type Error = InvalidNodeId;
    fn try_from(value: String) -> Result<Self, Self::Error> {
        Self::new(value)
    }
}

impl From<NodeId> for String {
    fn from(id: NodeId) -> String {
        id.0
    }
}

impl fmt::Display for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_ids_are_validated() {
        assert!(NodeId::new("node-1.eu_west").is_ok());
        assert_eq!(NodeId::new("").unwrap_err().reason, "it is empty");
        assert!(NodeId::new("a b").is_err());
        assert!(NodeId::new("x".repeat(65)).is_err());
        assert!(NodeId::new("x".repeat(64)).is_ok());
    }
}
