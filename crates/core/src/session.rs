//! Session tokens: a client's causal past, carried between the nodes it talks to.
//!
//! A token is the set of writes a session has seen or made, as a vector of causal writes per
//! origin node (see [`crate::causal`]), plus the highest Redis replication offset it has
//! observed. A node serves the session only once it has applied everything the token names,
//! and answers with the token grown by what the call saw, so a client that moves between
//! nodes keeps read-your-writes, monotonic reads, monotonic writes and writes-follow-reads.
//!
//! As text (an HTTP header): `origin=count` pairs in node order joined by `,`, then
//! `@redis=offset` when an offset was observed; the empty string is the empty token. Node
//! ids never contain `=`, `,` or `@`, so the form is unambiguous.

use std::fmt;
use std::str::FromStr;

use crate::crdt::Crdt;
use crate::node::NodeId;
use crate::version::VersionVector;

/// The longest token text accepted, in bytes (a vector of a few hundred nodes).
pub const MAX_TOKEN_LEN: usize = 16 * 1024;

/// A session's causal past.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SessionToken {
    /// Causal writes seen, per origin.
    pub causal: VersionVector,
    /// The highest Redis replication offset seen (0: none).
    pub redis_offset: u64,
}

/// Text that is not a session token.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid session token: {reason}")]
pub struct InvalidToken {
    /// What is wrong with it.
    pub reason: String,
}

impl SessionToken {
    /// The empty token: a session that has seen nothing.
    pub fn new() -> Self {
        Self::default()
    }

    /// Grows the token by what `other` has seen (a join: commutative, associative,
    /// idempotent).
    pub fn merge(&mut self, other: &SessionToken) {
        self.observe_causal(&other.causal);
        self.redis_offset = self.redis_offset.max(other.redis_offset);
    }

    /// Grows the token by the causal writes `applied` counts.
    pub fn observe_causal(&mut self, applied: &VersionVector) {
        self.causal.merge(applied);
    }

    /// Whether the token names nothing.
    pub fn is_empty(&self) -> bool {
        self.causal.is_empty() && self.redis_offset == 0
    }
}

impl fmt::Display for SessionToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut first = true;
        for (node, counter) in self.causal.iter() {
            if !first {
                f.write_str(",")?;
            }
            first = false;
            write!(f, "{}={counter}", node.as_str())?;
        }
        if self.redis_offset > 0 {
            if !first {
                f.write_str(",")?;
            }
            write!(f, "@redis={}", self.redis_offset)?;
        }
        Ok(())
    }
}

impl FromStr for SessionToken {
    type Err = InvalidToken;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let invalid = |reason: String| InvalidToken { reason };
        if text.len() > MAX_TOKEN_LEN {
            return Err(invalid(format!("longer than {MAX_TOKEN_LEN} bytes")));
        }
        let mut token = SessionToken::new();
        let mut previous: Option<NodeId> = None;
        for part in text.split(',').filter(|part| !part.is_empty()) {
            let (name, count) = part
                .split_once('=')
                .ok_or_else(|| invalid(format!("`{part}` is not name=count")))?;
            let count: u64 = count
                .parse()
                .map_err(|_| invalid(format!("`{count}` is not a count")))?;
            if name == "@redis" {
                token.redis_offset = count;
                continue;
            }
            let node = NodeId::new(name).map_err(|e| invalid(e.to_string()))?;
            if previous.as_ref().is_some_and(|p| *p >= node) {
                return Err(invalid("nodes are not in increasing order".into()));
            }
            if count == 0 {
                return Err(invalid(format!("`{part}` counts nothing")));
            }
            token.causal.witness(&node, count);
            previous = Some(node);
        }
        Ok(token)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn token(text: &str) -> SessionToken {
        text.parse().unwrap()
    }

    #[test]
    fn text_round_trips() {
        for text in ["", "a=1", "a=3,node-b.2=17", "a=1,@redis=99", "@redis=5"] {
            assert_eq!(token(text).to_string(), text);
        }
    }

    #[test]
    fn bad_text_is_refused_with_the_reason() {
        for (text, reason) in [
            ("a", "not name=count"),
            ("a=x", "not a count"),
            ("b=1,a=1", "increasing"),
            ("a=0", "counts nothing"),
            ("a b=1", "invalid node id"),
        ] {
            let err = text.parse::<SessionToken>().unwrap_err();
            assert!(err.to_string().contains(reason), "{text}: {err}");
        }
    }

    #[test]
    fn merge_is_a_join() {
        let (a, b) = (token("a=1,b=5,@redis=3"), token("a=4,c=2"));
        let mut ab = a.clone();
        ab.merge(&b);
        let mut ba = b.clone();
        ba.merge(&a);
        assert_eq!(ab, ba);
        assert_eq!(ab, token("a=4,b=5,c=2,@redis=3"));
        let mut again = ab.clone();
        again.merge(&ab);
        assert_eq!(again, ab);
    }
}
