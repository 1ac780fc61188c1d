//! Conflict-free replicated data types (state-based).
//!
//! Every type here is a join-semilattice under [`Crdt::merge`]: for all states `a`, `b`, `c`
//! that replicas can reach,
//!
//! - commutative: `a ⊔ b = b ⊔ a`
//! - associative: `(a ⊔ b) ⊔ c = a ⊔ (b ⊔ c)`
//! - idempotent: `a ⊔ a = a`
//!
//! so replicas that receive the same states in any order, any number of times, end equal.
//! The property tests in `laws` check exactly these, for every type, on states produced by
//! random operations at several replicas.

mod gcounter;
mod gset;
mod lww;
mod mvreg;
mod orset;
mod pncounter;

#[cfg(test)]
mod laws;

pub use gcounter::GCounter;
pub use gset::GSet;
pub use lww::LwwRegister;
pub use mvreg::MvRegister;
pub use orset::OrSet;
pub use pncounter::PnCounter;

/// A state-based CRDT: `merge` is the join of a semilattice (see the module documentation).
pub trait Crdt {
    /// Joins `other` into `self`.
    fn merge(&mut self, other: &Self);
}

/// Keeps the dots of one element or value that survive a merge of two dotted states.
///
/// A dot present on both sides survives. A dot present on one side only survives when the
/// other side has not seen it (it is not in the other side's context); if the other side
/// has seen it and no longer holds it, it was removed there, and the removal wins.
pub(crate) fn surviving<'a, D: Ord + Clone + 'a>(
    ours: impl Iterator<Item = &'a D>,
    theirs: impl Iterator<Item = &'a D>,
    in_both: impl Fn(&D) -> bool,
    seen_by_them: impl Fn(&D) -> bool,
    seen_by_us: impl Fn(&D) -> bool,
) -> std::collections::BTreeSet<D> {
    let mut keep = std::collections::BTreeSet::new();
    for dot in ours {
        if in_both(dot) || !seen_by_them(dot) {
            keep.insert(dot.clone());
        }
    }
    for dot in theirs {
        if in_both(dot) || !seen_by_us(dot) {
            keep.insert(dot.clone());
        }
    }
    keep
}
