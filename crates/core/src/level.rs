//! Consistency levels, ordered from weakest to strongest.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// How strongly a read or write is ordered against other operations.
///
/// The derived order is meaningful: `Eventual < Causal < Strong`, so the effective level of a
/// call is `max(call, collection)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ConsistencyLevel {
    /// Replicas converge; no ordering between updates.
    Eventual,
    /// Causally related operations are seen in the same order everywhere.
    Causal,
    /// Linearizable: every operation appears to happen at one instant between call and return.
    Strong,
}

impl ConsistencyLevel {
    /// All levels, weakest first.
    pub const ALL: [ConsistencyLevel; 3] = [Self::Eventual, Self::Causal, Self::Strong];

    /// The name used in configuration files and on the command line.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Eventual => "eventual",
            Self::Causal => "causal",
            Self::Strong => "strong",
        }
    }
}

impl Default for ConsistencyLevel {
    /// Eventual, as the specification makes it the default.
    fn default() -> Self {
        Self::Eventual
    }
}

impl fmt::Display for ConsistencyLevel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A level name that is not `eventual`, `causal` or `strong`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown consistency level `{given}` (expected eventual, causal or strong)")]
pub struct UnknownLevel {
    /// What was given.
    pub given: String,
}

impl FromStr for ConsistencyLevel {
    type Err = UnknownLevel;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::ALL
            .into_iter()
            .find(|level| level.as_str() == s)
            .ok_or_else(|| UnknownLevel {
                given: s.to_owned(),
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn levels_are_ordered_weakest_to_strongest() {
        assert!(ConsistencyLevel::Eventual < ConsistencyLevel::Causal);
        assert!(ConsistencyLevel::Causal < ConsistencyLevel::Strong);
        assert_eq!(
            ConsistencyLevel::Eventual.max(ConsistencyLevel::Strong),
            ConsistencyLevel::Strong
        );
    }

    #[test]
    fn names_round_trip_through_from_str_and_display() {
        for level in ConsistencyLevel::ALL {
            assert_eq!(level.to_string().parse::<ConsistencyLevel>(), Ok(level));
        }
        assert_eq!(
            "Strong".parse::<ConsistencyLevel>(),
            Err(UnknownLevel {
                given: "Strong".into()
            })
        );
    }
}
