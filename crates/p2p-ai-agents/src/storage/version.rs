//! Version tokens: what a read returns and a conditional write or a sibling merge gives back.

use std::fmt;
use std::str::FromStr;

use agentstore_core::VersionVector;
pub use agentstore_core::version::InvalidVersion;

/// The version of a key as read: a version vector, printable and parsable as
/// `node-a:3,node-b:1` (empty: `-`). Compare-and-set expects it; a multi-value write passes
/// it back as its context.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub struct Version(pub(crate) VersionVector);

impl Version {
    /// The version vector.
    pub fn vector(&self) -> &VersionVector {
        &self.0
    }
}

impl From<VersionVector> for Version {
    fn from(vv: VersionVector) -> Self {
        Self(vv)
    }
}

impl fmt::Display for Version {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

impl FromStr for Version {
    type Err = InvalidVersion;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        s.parse().map(Self)
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;
    use agentstore_core::NodeId;

    proptest! {
        #[test]
        fn versions_round_trip_through_text(entries in prop::collection::btree_map("[a-z0-9_.-]{1,8}", 1u64..1000, 0..5)) {
            let vv: VersionVector = entries.into_iter().map(|(n, c)| (NodeId::new(n).unwrap(), c)).collect();
            let version = Version(vv);
            prop_assert_eq!(version.to_string().parse::<Version>(), Ok(version));
        }
    }

    #[test]
    fn bad_tokens_are_refused() {
        for bad in ["", "a", "a:0", "a:1,a:2", "a b:1", "a:x"] {
            assert!(bad.parse::<Version>().is_err(), "{bad}");
        }
    }
}
