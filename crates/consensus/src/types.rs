//! The Raft type configuration: what openraft's generic machinery is instantiated with.

use std::fmt;

use serde::{Deserialize, Serialize};

/// A member of the Raft group: an agentstore node id.
#[derive(Clone, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct MemberId(pub String);

impl fmt::Display for MemberId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl From<&str> for MemberId {
    fn from(id: &str) -> Self {
        Self(id.to_owned())
    }
}

/// openraft's storage test suite names members by number.
impl From<u64> for MemberId {
    fn from(n: u64) -> Self {
        Self(format!("n{n}"))
    }
}

/// A log entry's application data: a batch of writes in [`command`](crate::command)'s
/// encoding, applied atomically by every replica's state machine.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Command(pub Vec<u8>);

impl fmt::Display for Command {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "command of {} bytes", self.0.len())
    }
}

/// What applying a [`Command`] answered, in [`command`](crate::command)'s outcome encoding.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Applied(pub Vec<u8>);

openraft::declare_raft_types!(
    /// agentstore's Raft types: members named by node id, reachable at their peer address.
    pub TypeConfig:
        D = Command,
        R = Applied,
        NodeId = MemberId,
        Node = openraft::BasicNode,
);

pub(crate) type LogId = openraft::alias::LogIdOf<TypeConfig>;
pub(crate) type Vote = openraft::alias::VoteOf<TypeConfig>;
pub(crate) type Entry = openraft::alias::EntryOf<TypeConfig>;
pub(crate) type StoredMembership = openraft::alias::StoredMembershipOf<TypeConfig>;
pub(crate) type SnapshotMeta = openraft::alias::SnapshotMetaOf<TypeConfig>;
pub(crate) type Snapshot = openraft::alias::SnapshotOf<TypeConfig, Vec<u8>>;

/// The format byte in front of every postcard value this crate persists.
pub(crate) const PERSISTED_FORMAT: u8 = 1;

/// Encodes a value for redb: the format byte, then postcard.
pub(crate) fn persist<T: Serialize>(value: &T) -> std::io::Result<Vec<u8>> {
    let mut out = vec![PERSISTED_FORMAT];
    let body = postcard::to_stdvec(value).map_err(std::io::Error::other)?;
    out.extend_from_slice(&body);
    Ok(out)
}

/// Decodes [`persist`]'s bytes.
pub(crate) fn restore<T: for<'de> Deserialize<'de>>(bytes: &[u8]) -> std::io::Result<T> {
    match bytes.split_first() {
        Some((&PERSISTED_FORMAT, body)) => postcard::from_bytes(body)
            .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e)),
        Some((format, _)) => Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("persisted Raft state of format {format}; this build reads {PERSISTED_FORMAT}"),
        )),
        None => Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            "empty persisted Raft state",
        )),
    }
}
