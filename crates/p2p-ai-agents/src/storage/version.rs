//! Version tokens: what a read returns and a conditional write or a sibling merge gives back.

use std::fmt;
use std::str::FromStr;

use agentstore_core::{NodeId, VersionVector};

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
        if self.0.is_empty() {
            return f.write_str("-");
        }
        for (i, (node, counter)) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            write!(f, "{node}:{counter}")?;
        }
        Ok(())
    }
}

/// A version token that does not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid version `{0}`: expected `node:counter[,node:counter...]` or `-`")]
pub struct InvalidVersion(pub String);

impl FromStr for Version {
    type Err = InvalidVersion;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s == "-" {
            return Ok(Self::default());
        }
        let invalid = || InvalidVersion(s.to_owned());
        let mut vv = VersionVector::new();
        for entry in s.split(',') {
            let (node, counter) = entry.rsplit_once(':').ok_or_else(invalid)?;
            let node = NodeId::new(node).map_err(|_| invalid())?;
            let counter: u64 = counter.parse().map_err(|_| invalid())?;
            if counter == 0 || vv.get(&node) != 0 {
                return Err(invalid());
            }
            vv.witness(&node, counter);
        }
        Ok(Self(vv))
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

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
