//! Quorum math: what N replicas, W write acknowledgements and R read answers really give.

use std::fmt;

/// Replication factor and quorum sizes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QuorumSpec {
    /// Replicas of each key (N).
    pub n: u8,
    /// Replicas that must acknowledge a write before it is acknowledged (W).
    pub w: u8,
    /// Replicas a read asks before it answers (R).
    pub r: u8,
}

/// Numbers that cannot describe a quorum.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum QuorumError {
    /// N is zero.
    #[error("replicas must be at least 1")]
    NoReplicas,
    /// W is zero or greater than N.
    #[error("write_quorum ({w}) must be between 1 and replicas ({n})")]
    WriteQuorum {
        /// The write quorum given.
        w: u8,
        /// The replication factor.
        n: u8,
    },
    /// R is zero or greater than N.
    #[error("read_quorum ({r}) must be between 1 and replicas ({n})")]
    ReadQuorum {
        /// The read quorum given.
        r: u8,
        /// The replication factor.
        n: u8,
    },
}

/// What a valid quorum configuration guarantees.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QuorumGuarantee {
    /// W + R > N: every read quorum shares a replica with every write quorum, so a read that
    /// completes after a write was acknowledged sees that write (or a newer one). This is not
    /// linearizability: concurrent reads may disagree until read repair finishes.
    pub overlapping: bool,
    /// Replicas that may be down while writes still reach W.
    pub write_fault_tolerance: u8,
    /// Replicas that may be down while reads still reach R.
    pub read_fault_tolerance: u8,
}

impl QuorumSpec {
    /// Checks the numbers and computes what they guarantee.
    ///
    /// The guarantee comes from the numbers, not from a label: the spec's "Common
    /// Configurations" call W=N,R=1 and W=1,R=N eventual, but both overlap (W+R = N+1), so
    /// both are reported as overlapping.
    pub fn validate(&self) -> Result<QuorumGuarantee, QuorumError> {
        let QuorumSpec { n, w, r } = *self;
        if n == 0 {
            return Err(QuorumError::NoReplicas);
        }
        if w == 0 || w > n {
            return Err(QuorumError::WriteQuorum { w, n });
        }
        if r == 0 || r > n {
            return Err(QuorumError::ReadQuorum { r, n });
        }
        Ok(QuorumGuarantee {
            overlapping: u16::from(w) + u16::from(r) > u16::from(n),
            write_fault_tolerance: n - w,
            read_fault_tolerance: n - r,
        })
    }

    /// The smallest majority of `n` replicas.
    pub fn majority(n: u8) -> u8 {
        n / 2 + 1
    }
}

impl fmt::Display for QuorumSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "N={} W={} R={}", self.n, self.w, self.r)
    }
}

impl fmt::Display for QuorumGuarantee {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.overlapping {
            f.write_str(
                "overlapping quorums (W+R>N): a read sees every write acknowledged before it began",
            )?;
        } else {
            f.write_str(
                "non-overlapping quorums (W+R<=N): eventual; a read may miss an acknowledged write",
            )?;
        }
        write!(
            f,
            "; writes survive {} replica(s) down, reads {}",
            self.write_fault_tolerance, self.read_fault_tolerance
        )
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    #[test]
    fn the_specs_common_configurations() {
        let balanced = QuorumSpec { n: 3, w: 2, r: 2 }.validate().unwrap();
        assert!(balanced.overlapping);
        assert_eq!(
            (
                balanced.write_fault_tolerance,
                balanced.read_fault_tolerance
            ),
            (1, 1)
        );
        // The spec labels these two "eventual"; the numbers say they overlap.
        assert!(
            QuorumSpec { n: 3, w: 3, r: 1 }
                .validate()
                .unwrap()
                .overlapping
        );
        assert!(
            QuorumSpec { n: 3, w: 1, r: 3 }
                .validate()
                .unwrap()
                .overlapping
        );
        assert!(
            !QuorumSpec { n: 3, w: 1, r: 1 }
                .validate()
                .unwrap()
                .overlapping
        );
    }

    #[test]
    fn impossible_numbers_are_refused() {
        assert_eq!(
            QuorumSpec { n: 0, w: 0, r: 0 }.validate(),
            Err(QuorumError::NoReplicas)
        );
        assert_eq!(
            QuorumSpec { n: 3, w: 4, r: 1 }.validate(),
            Err(QuorumError::WriteQuorum { w: 4, n: 3 })
        );
        assert_eq!(
            QuorumSpec { n: 3, w: 1, r: 0 }.validate(),
            Err(QuorumError::ReadQuorum { r: 0, n: 3 })
        );
    }

    proptest! {
        /// Overlap is exactly pigeonhole: some W-set and R-set of N replicas are disjoint
        /// iff W + R <= N.
        #[test]
        fn overlap_is_pigeonhole(n in 1u8..=20, w in 1u8..=20, r in 1u8..=20) {
            prop_assume!(w <= n && r <= n);
            let guarantee = QuorumSpec { n, w, r }.validate().unwrap();
            // Writes go to replicas 0..w, reads to the last r replicas: disjoint iff w + r <= n.
            let disjoint = (0..w).all(|i| i < n - r);
            prop_assert_eq!(guarantee.overlapping, !disjoint);
        }
    }
}
