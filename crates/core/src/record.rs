//! Records: what an engine stores under a key, and the mutations that change them.
//!
//! A record is a value (an LWW register, a multi-value register or a CRDT) plus the metadata
//! replication needs: the hybrid timestamp of its last change (which also names the node that
//! made it) and a version vector of every change it includes. Mutations are applied by
//! [`apply`] inside an engine's transaction, so read-modify-write operations such as a counter
//! increment are atomic on every engine.

use std::fmt;

use crate::crdt::{Crdt, GCounter, GSet, MvRegister, OrSet, PnCounter};
use crate::hlc::{HybridClock, Timestamp};
use crate::node::NodeId;
use crate::ot::{Document, EditRefused, TextOp};
use crate::version::{Causality, VersionVector};

/// Opaque value bytes.
pub type Bytes = Vec<u8>;

/// The value part of a record.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Value {
    /// A last-writer-wins register; `None` is a tombstone (the key was deleted).
    Register(Option<Bytes>),
    /// A multi-value register (siblings); empty after a delete.
    MultiValue(MvRegister<Bytes>),
    /// A grow-only counter.
    GCounter(GCounter),
    /// An increment/decrement counter.
    PnCounter(PnCounter),
    /// A grow-only set.
    GSet(GSet<Bytes>),
    /// An observed-remove (add-wins) set.
    OrSet(OrSet<Bytes>),
    /// A text document edited by operational transformation (its edits ordered by one
    /// writer: a Raft group or one ACID engine).
    Document(Document),
}

/// The kind of a value, in the order used to join records of different kinds.
///
/// A collection's conflict strategy is the kind of value its keys hold, so this is also
/// `config::ConflictStrategy`, named in configuration files as `lww`, `multi_value`,
/// `g_counter`, `pn_counter`, `g_set` and `or_set`.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    /// [`Value::Register`]: last writer wins.
    #[serde(rename = "lww")]
    Register,
    /// [`Value::MultiValue`].
    MultiValue,
    /// [`Value::GCounter`].
    GCounter,
    /// [`Value::PnCounter`].
    PnCounter,
    /// [`Value::GSet`].
    GSet,
    /// [`Value::OrSet`].
    OrSet,
    /// [`Value::Document`].
    #[serde(rename = "ot_text")]
    Document,
}

impl Kind {
    /// Every kind, in the order of their codes.
    pub const ALL: [Kind; 7] = [
        Kind::Register,
        Kind::MultiValue,
        Kind::GCounter,
        Kind::PnCounter,
        Kind::GSet,
        Kind::OrSet,
        Kind::Document,
    ];

    /// The kind's one-byte code in encoded refusals (stable: persisted and sent between
    /// nodes).
    pub fn code(self) -> u8 {
        Self::ALL.iter().position(|k| *k == self).unwrap_or(0) as u8
    }

    /// The kind of a [`Kind::code`].
    pub fn from_code(code: u8) -> Option<Self> {
        Self::ALL.get(usize::from(code)).copied()
    }

    /// The conflict-strategy name of this kind, as written in configuration files.
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Register => "lww",
            Kind::MultiValue => "multi_value",
            Kind::GCounter => "g_counter",
            Kind::PnCounter => "pn_counter",
            Kind::GSet => "g_set",
            Kind::OrSet => "or_set",
            Kind::Document => "ot_text",
        }
    }
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl Value {
    /// The kind of this value.
    pub fn kind(&self) -> Kind {
        match self {
            Value::Register(_) => Kind::Register,
            Value::MultiValue(_) => Kind::MultiValue,
            Value::GCounter(_) => Kind::GCounter,
            Value::PnCounter(_) => Kind::PnCounter,
            Value::GSet(_) => Kind::GSet,
            Value::OrSet(_) => Kind::OrSet,
            Value::Document(_) => Kind::Document,
        }
    }
}

/// A stored value with its replication metadata.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Record {
    /// Hybrid timestamp of the last change; its `node` is the node that made the change.
    pub stamp: Timestamp,
    /// Every change this record includes, per node. Compare-and-set compares it, and
    /// replicas compare it to tell a newer state from a concurrent one.
    pub version: VersionVector,
    /// The value.
    pub value: Value,
    /// The writer's signature over the value, key and time (an `agentstore_trust`
    /// attestation, opaque here): only on LWW registers of collections that require signed
    /// writes, where every replica checks it before storing the record (`crate::signing`).
    pub attestation: Option<Bytes>,
    /// When the value expires (Unix ms), on LWW values written with a time to live: from
    /// then on every replica reads the key as absent, and collection purges it once every
    /// replica holds it and the grace period has passed, as it purges a tombstone.
    pub expires_at_ms: Option<u64>,
}

impl Record {
    /// Whether the record holds an expiring value whose time has come at `now_ms`.
    pub fn expired(&self, now_ms: u64) -> bool {
        self.expires_at_ms.is_some_and(|at| at <= now_ms)
    }

    /// Since when the key reads as absent whatever the clock (a tombstone: since its
    /// deletion) or from a known time on (an expiring value: its expiry); `None` for a live
    /// value that does not expire. Collection measures its grace period from it.
    pub fn dead_since_ms(&self) -> Option<u64> {
        if self.is_tombstone() {
            Some(self.stamp.wall_ms)
        } else {
            self.expires_at_ms
        }
    }

    /// Whether the record says the key is deleted: an LWW tombstone, or a multi-value
    /// register whose values were all deleted.
    pub fn is_tombstone(&self) -> bool {
        match &self.value {
            Value::Register(value) => value.is_none(),
            Value::MultiValue(register) => register.is_empty(),
            _ => false,
        }
    }

    /// The node that made the last change.
    pub fn origin(&self) -> &NodeId {
        &self.stamp.node
    }

    /// How this record's version relates to `other`'s. `Concurrent` means a conflict that
    /// the value's strategy resolves on merge.
    pub fn causality(&self, other: &Record) -> Causality {
        self.version.compare(&other.version)
    }
}

impl Crdt for Record {
    /// Joins two states of the same key.
    ///
    /// - Same kind: LWW registers keep the greater `(stamp, value, attestation)`, whole; CRDT
    ///   values merge and the stamp is the greater of the two.
    /// - Different kinds (only after a collection changed its conflict strategy): the kind
    ///   later in [`Kind`]'s order wins whole. This ordinal sum keeps the join a semilattice.
    ///
    /// Versions always join. Laws: commutative, associative, idempotent.
    fn merge(&mut self, other: &Self) {
        self.version.merge(&other.version);
        let (ours, theirs) = (self.value.kind(), other.value.kind());
        if ours != theirs {
            if theirs > ours {
                self.value = other.value.clone();
                self.stamp = other.stamp.clone();
                self.attestation = other.attestation.clone();
                self.expires_at_ms = other.expires_at_ms;
            }
            return;
        }
        match (&mut self.value, &other.value) {
            (Value::Register(a), Value::Register(b)) => {
                let theirs = (&other.stamp, b, &other.attestation, other.expires_at_ms);
                if theirs > (&self.stamp, &*a, &self.attestation, self.expires_at_ms) {
                    *a = b.clone();
                    self.stamp = other.stamp.clone();
                    self.attestation = other.attestation.clone();
                    self.expires_at_ms = other.expires_at_ms;
                }
                return;
            }
            (Value::MultiValue(a), Value::MultiValue(b)) => a.merge(b),
            (Value::GCounter(a), Value::GCounter(b)) => a.merge(b),
            (Value::PnCounter(a), Value::PnCounter(b)) => a.merge(b),
            (Value::GSet(a), Value::GSet(b)) => a.merge(b),
            (Value::OrSet(a), Value::OrSet(b)) => a.merge(b),
            // One writer orders a document's edits, so two states of it differ only in how
            // far they got: the later revision wins whole (ties by stamp, then content, so
            // the join stays a semilattice).
            (Value::Document(a), Value::Document(b)) => {
                if (b, &other.stamp) > (&*a, &self.stamp) {
                    *a = b.clone();
                }
            }
            _ => unreachable!("kinds compared equal above"),
        }
        if other.stamp > self.stamp {
            self.stamp = other.stamp.clone();
        }
    }
}

/// A change to one key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Mutation {
    /// Write an LWW register.
    Put(Bytes),
    /// Write an LWW register whose value expires at `expires_at_ms` (Unix ms).
    PutExpiring {
        /// The value.
        value: Bytes,
        /// When it expires.
        expires_at_ms: u64,
    },
    /// Delete an LWW register (write a tombstone).
    Delete,
    /// Write (`Some`) or delete (`None`) an LWW register with the writer's signature: the
    /// record keeps the attestation, which replicas check (see `crate::signing`).
    Signed {
        /// The value, or `None` to delete.
        value: Option<Bytes>,
        /// The writer's attestation over the key, the value and its time.
        attestation: Bytes,
    },
    /// Write a multi-value register, replacing the values whose writes are in `context`
    /// (`None`: delete those values).
    PutSibling {
        /// The value, or `None` to delete.
        value: Option<Bytes>,
        /// The context the writer read; empty for a blind write that adds a sibling.
        context: VersionVector,
    },
    /// Increment a grow-only counter.
    GCounterAdd(u64),
    /// Add to an increment/decrement counter (negative to decrement).
    PnCounterAdd(i64),
    /// Add an element to a grow-only set.
    GSetAdd(Bytes),
    /// Add an element to an observed-remove set.
    OrSetAdd(Bytes),
    /// Remove an element from an observed-remove set.
    OrSetRemove(Bytes),
    /// Edit a text document: `op` was made against revision `base` and is transformed past
    /// the edits applied since (see [`crate::ot`]).
    Edit {
        /// The revision the writer read.
        base: u64,
        /// The edit, spanning the document at `base`.
        op: TextOp,
    },
    /// Join a whole record state into the stored one (replication, repair).
    Merge(Record),
}

impl Mutation {
    /// The kind of value this mutation applies to.
    pub fn kind(&self) -> Kind {
        match self {
            Mutation::Put(_)
            | Mutation::PutExpiring { .. }
            | Mutation::Delete
            | Mutation::Signed { .. } => Kind::Register,
            Mutation::PutSibling { .. } => Kind::MultiValue,
            Mutation::GCounterAdd(_) => Kind::GCounter,
            Mutation::PnCounterAdd(_) => Kind::PnCounter,
            Mutation::GSetAdd(_) => Kind::GSet,
            Mutation::OrSetAdd(_) | Mutation::OrSetRemove(_) => Kind::OrSet,
            Mutation::Edit { .. } => Kind::Document,
            Mutation::Merge(record) => record.value.kind(),
        }
    }
}

/// A mutation that cannot apply to the stored value.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("the key holds a {stored} value; a {requested} operation cannot apply to it")]
pub struct WrongKind {
    /// What the key holds.
    pub stored: Kind,
    /// What the mutation needs.
    pub requested: Kind,
}

/// Why a mutation did not apply. The stored record is unchanged.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refused {
    /// The key holds another kind of value.
    #[error(transparent)]
    WrongKind(#[from] WrongKind),
    /// A document edit that cannot apply (see [`EditRefused`]).
    #[error(transparent)]
    Edit(#[from] EditRefused),
}

/// Applies `mutation` to the stored record (if any) and returns the new record.
///
/// Local mutations are stamped by `clock` after the stored record's stamp (so a write always
/// supersedes what it overwrote, even if the physical clock went back) and add one event of
/// the clock's node to the version. A tombstone can be overwritten by any kind. `Merge` joins
/// without stamping.
pub fn apply(
    current: Option<&Record>,
    mutation: &Mutation,
    clock: &mut HybridClock,
    physical_ms: u64,
) -> Result<Record, Refused> {
    if let Mutation::Merge(remote) = mutation {
        let mut merged = current.cloned().unwrap_or_else(|| remote.clone());
        merged.merge(remote);
        return Ok(merged);
    }
    let requested = mutation.kind();
    let live =
        current.filter(|record| !(record.is_tombstone() && record.value.kind() != requested));
    if let Some(record) = live
        && record.value.kind() != requested
    {
        return Err(WrongKind {
            stored: record.value.kind(),
            requested,
        }
        .into());
    }
    let stamp = match current {
        Some(record) => clock.now_after(&record.stamp, physical_ms),
        None => clock.now(physical_ms),
    };
    let node = clock.node().clone();
    let mut version = current
        .map(|record| record.version.clone())
        .unwrap_or_default();
    version.next_dot(&node);
    let mut value = match live {
        Some(record) => record.value.clone(),
        None => empty_value(requested),
    };
    match (&mut value, mutation) {
        (Value::Register(v), Mutation::Put(bytes)) => *v = Some(bytes.clone()),
        (Value::Register(v), Mutation::PutExpiring { value, .. }) => *v = Some(value.clone()),
        (Value::Register(v), Mutation::Delete) => *v = None,
        (Value::Register(v), Mutation::Signed { value, .. }) => *v = value.clone(),
        (Value::MultiValue(register), Mutation::PutSibling { value, context }) => {
            register.write(&node, value.clone(), context);
        }
        (Value::GCounter(counter), Mutation::GCounterAdd(amount)) => {
            counter.increment(&node, *amount)
        }
        (Value::PnCounter(counter), Mutation::PnCounterAdd(delta)) => counter.add(&node, *delta),
        (Value::GSet(set), Mutation::GSetAdd(element)) => {
            set.insert(element.clone());
        }
        (Value::OrSet(set), Mutation::OrSetAdd(element)) => {
            set.add(&node, element.clone());
        }
        (Value::OrSet(set), Mutation::OrSetRemove(element)) => {
            set.remove(element);
        }
        (Value::Document(document), Mutation::Edit { base, op }) => {
            document.edit(*base, op)?;
        }
        _ => unreachable!(
            "value kind {} matches mutation kind {requested}",
            value.kind()
        ),
    }
    let attestation = match mutation {
        Mutation::Signed { attestation, .. } => Some(attestation.clone()),
        _ => None,
    };
    // Any other write of the key replaces an expiring value with one that does not expire.
    let expires_at_ms = match mutation {
        Mutation::PutExpiring { expires_at_ms, .. } => Some(*expires_at_ms),
        _ => None,
    };
    Ok(Record {
        stamp,
        version,
        value,
        attestation,
        expires_at_ms,
    })
}

fn empty_value(kind: Kind) -> Value {
    match kind {
        Kind::Register => Value::Register(None),
        Kind::MultiValue => Value::MultiValue(MvRegister::new()),
        Kind::GCounter => Value::GCounter(GCounter::new()),
        Kind::PnCounter => Value::PnCounter(PnCounter::new()),
        Kind::GSet => Value::GSet(GSet::new()),
        Kind::OrSet => Value::OrSet(OrSet::new()),
        Kind::Document => Value::Document(Document::default()),
    }
}

/// What a conditional write expects to find (compare-and-set).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Expect {
    /// No live value: the key is missing or deleted.
    Absent,
    /// A record with exactly this version (as returned by a read).
    Version(VersionVector),
}

/// The stored state did not match what a conditional write expected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("compare-and-set failed: expected {expected:?}, found version {actual:?}")]
pub struct ExpectationFailed {
    /// What the write expected.
    pub expected: Expect,
    /// The version found, `None` if the key had no live value.
    pub actual: Option<VersionVector>,
}

impl Expect {
    /// Checks the expectation against the stored record at `now_ms`: a value that expired by
    /// then counts as absent, as a tombstone does.
    pub fn check(&self, current: Option<&Record>, now_ms: u64) -> Result<(), ExpectationFailed> {
        let live = current.filter(|record| !record.is_tombstone() && !record.expired(now_ms));
        let holds = match (self, live) {
            (Expect::Absent, None) => true,
            (Expect::Absent, Some(_)) => false,
            (Expect::Version(version), Some(record)) => &record.version == version,
            (Expect::Version(version), None) => {
                current.is_some_and(|tombstone| &tombstone.version == version)
            }
        };
        if holds {
            Ok(())
        } else {
            Err(ExpectationFailed {
                expected: self.clone(),
                actual: live.map(|record| record.version.clone()),
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn clock(name: &str) -> HybridClock {
        HybridClock::new(NodeId::new(name).unwrap(), 500)
    }

    #[test]
    fn a_write_supersedes_a_record_stamped_in_the_future() {
        let mut far_ahead = clock("b");
        let stored = apply(
            None,
            &Mutation::Put(b"old".to_vec()),
            &mut far_ahead,
            1_000_000,
        )
        .unwrap();
        let mut behind = clock("a");
        let next = apply(
            Some(&stored),
            &Mutation::Put(b"new".to_vec()),
            &mut behind,
            5,
        )
        .unwrap();
        assert!(next.stamp > stored.stamp);
        assert_eq!(next.causality(&stored), Causality::After);
        let mut merged = stored.clone();
        merged.merge(&next);
        assert_eq!(merged.value, Value::Register(Some(b"new".to_vec())));
    }

    #[test]
    fn mutations_of_another_kind_are_refused_but_a_tombstone_can_be_replaced() {
        let mut c = clock("a");
        let counter = apply(None, &Mutation::PnCounterAdd(3), &mut c, 1).unwrap();
        assert_eq!(
            apply(Some(&counter), &Mutation::Put(vec![1]), &mut c, 2),
            Err(Refused::WrongKind(WrongKind {
                stored: Kind::PnCounter,
                requested: Kind::Register
            }))
        );
        let tombstone = apply(None, &Mutation::Delete, &mut c, 3).unwrap();
        assert!(tombstone.is_tombstone());
        let revived = apply(Some(&tombstone), &Mutation::GSetAdd(vec![7]), &mut c, 4).unwrap();
        assert_eq!(revived.value.kind(), Kind::GSet);
        assert!(revived.version.dominates(&tombstone.version));
    }

    #[test]
    fn compare_and_set_expectations() {
        let mut c = clock("a");
        assert_eq!(Expect::Absent.check(None, 0), Ok(()));
        let first = apply(None, &Mutation::Put(vec![1]), &mut c, 1).unwrap();
        assert!(Expect::Absent.check(Some(&first), 0).is_err());
        assert_eq!(
            Expect::Version(first.version.clone()).check(Some(&first), 0),
            Ok(())
        );
        let second = apply(Some(&first), &Mutation::Put(vec![2]), &mut c, 2).unwrap();
        let failed = Expect::Version(first.version.clone())
            .check(Some(&second), 0)
            .unwrap_err();
        assert_eq!(failed.actual, Some(second.version.clone()));
        let deleted = apply(Some(&second), &Mutation::Delete, &mut c, 3).unwrap();
        assert_eq!(Expect::Absent.check(Some(&deleted), 0), Ok(()));
    }
}
