//! Causal replication, the pure part: causal writes, their delivery order, and what a peer
//! lacks.
//!
//! Every member of a cluster holds every causal key (full replication), so causal delivery is
//! a causal broadcast. Each node numbers the causal writes it originates 1, 2, 3, … and
//! stamps each with its *dependencies*: the vector of writes (per origin, how many) the node
//! had applied when it wrote — everything the writer could have seen, sessions included. A
//! replica applies write `(origin, seq)` only once it has applied `origin`'s write `seq - 1`
//! and everything in the dependencies ([`CausalWrite::deliverable`]); until then the write
//! waits in a bounded buffer ([`Delivery`]). So every node applies causally related writes in
//! the same order, and a node's *applied vector* always names a causally closed set of writes:
//! a session token (see [`crate::session`]) is such a vector.
//!
//! The state each write carries is the whole record of its keys after the write, which
//! replicas join ([`crate::Crdt::merge`]): concurrent writes converge by the collection's
//! strategy whatever order they arrive in, and a write delivered twice changes nothing.

use std::collections::BTreeMap;

use crate::codec::{self, DecodeError, Reader, put_bytes, put_node, put_uvarint, put_version};
use crate::crdt::Crdt;
use crate::key::Key;
use crate::node::NodeId;
use crate::record::Record;
use crate::version::{Dot, VersionVector};

/// One causal write: the `seq`-th write `origin` made, the writes it depends on, and the
/// records of its keys after it (a batch of keys applies as one write, atomically).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CausalWrite {
    /// The node that made the write.
    pub origin: NodeId,
    /// Its number among `origin`'s causal writes, from 1.
    pub seq: u64,
    /// What `origin` had applied when it wrote (its own entry is `seq - 1`).
    pub deps: VersionVector,
    /// The records after the write, by key (keys strictly increasing).
    pub entries: Vec<(Key, Record)>,
}

impl CausalWrite {
    /// The write's dot: `(origin, seq)`.
    pub fn dot(&self) -> Dot {
        Dot {
            node: self.origin.clone(),
            counter: self.seq,
        }
    }

    /// Whether a replica that has applied `applied` may apply this write now: it holds the
    /// origin's previous write and every dependency, and not this write yet.
    pub fn deliverable(&self, applied: &VersionVector) -> bool {
        applied.get(&self.origin) + 1 == self.seq && applied.dominates(&self.deps)
    }

    /// The canonical encoding:
    /// `origin:node seq:uvarint deps:vector count:uvarint (key:bytes record:bytes)*`.
    pub fn encode(&self, out: &mut Vec<u8>) {
        put_node(out, &self.origin);
        put_uvarint(out, self.seq);
        put_version(out, &self.deps);
        put_uvarint(out, self.entries.len() as u64);
        for (key, record) in &self.entries {
            put_bytes(out, key.as_bytes());
            put_bytes(out, &codec::encode(record));
        }
    }

    /// Reads what [`CausalWrite::encode`] wrote; refuses a write that breaks the rules above
    /// (seq 0, dependencies that do not end at `seq - 1` for the origin, no keys, keys out of
    /// order).
    pub fn decode(r: &mut Reader<'_>) -> Result<Self, DecodeError> {
        let origin = r.node()?;
        let seq = r.uvarint()?;
        let deps = r.version_vector()?;
        if seq == 0 || deps.get(&origin) + 1 != seq {
            return Err(r.malformed("causal write numbering does not follow its dependencies"));
        }
        let count = r.uvarint()?;
        if count == 0 {
            return Err(r.malformed("causal write without keys"));
        }
        // Each entry takes at least two bytes: never allocate more than the input could hold.
        let mut entries: Vec<(Key, Record)> =
            Vec::with_capacity(usize::try_from(count).unwrap_or(0).min(r.remaining() / 2));
        for _ in 0..count {
            let key =
                Key::new(r.slice()?).map_err(|_| r.malformed("invalid key in a causal write"))?;
            if entries.last().is_some_and(|(last, _)| *last >= key) {
                return Err(r.malformed("causal write keys are not strictly increasing"));
            }
            let record = codec::decode(r.slice()?)?;
            entries.push((key, record));
        }
        Ok(Self {
            origin,
            seq,
            deps,
            entries,
        })
    }
}

/// What became of a write offered to a [`Delivery`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Offered {
    /// Already applied or already waiting: nothing to do (duplicates are harmless).
    Duplicate,
    /// Waiting in the buffer for its dependencies (or deliverable at once).
    Buffered,
    /// The buffer is full and the write cannot be applied yet: it is dropped. The peer's next
    /// sync sends it again, so a replica that falls behind pulls at the pace it applies
    /// (back-pressure) instead of holding an unbounded backlog.
    Full,
}

/// A write taken from the buffer to apply, with how long it waited there.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Delivered {
    /// The write.
    pub write: CausalWrite,
    /// Milliseconds between its arrival and its delivery (its dependency wait).
    pub waited_ms: u64,
}

/// A replica's causal delivery: what it has applied, and the writes waiting for their
/// dependencies.
///
/// Invariant: `applied` is causally closed (every write it counts had its dependencies
/// counted first), because only [`Delivery::take_ready`] and [`Delivery::local_write`]
/// advance it, one deliverable write at a time.
#[derive(Debug, Clone)]
pub struct Delivery {
    applied: VersionVector,
    /// Waiting writes by dot, with their arrival time.
    pending: BTreeMap<Dot, (CausalWrite, u64)>,
    capacity: usize,
}

impl Delivery {
    /// A replica that has applied `applied`, buffering at most `capacity` writes.
    pub fn new(applied: VersionVector, capacity: usize) -> Self {
        Self {
            applied,
            pending: BTreeMap::new(),
            capacity: capacity.max(1),
        }
    }

    /// What this replica has applied (or will have, once the writes taken are stored).
    pub fn applied(&self) -> &VersionVector {
        &self.applied
    }

    /// Writes waiting in the buffer.
    pub fn buffered(&self) -> usize {
        self.pending.len()
    }

    /// Offers a write received at `now_ms`. A write that can be applied now is always taken,
    /// even when the buffer is full: a buffer full of writes that wait for others must not
    /// refuse the one they wait for. So after each offer, take what is ready
    /// ([`Delivery::take_ready`]), and the buffer holds at most `capacity` writes plus that
    /// one.
    pub fn offer(&mut self, write: CausalWrite, now_ms: u64) -> Offered {
        let dot = write.dot();
        if self.applied.contains(&dot) || self.pending.contains_key(&dot) {
            return Offered::Duplicate;
        }
        if self.pending.len() >= self.capacity && !write.deliverable(&self.applied) {
            return Offered::Full;
        }
        self.pending.insert(dot, (write, now_ms));
        Offered::Buffered
    }

    /// Takes every write that can be applied now, in an order that respects causality (each
    /// after its dependencies), and counts them as applied. The caller stores them in that
    /// order, atomically; if storing fails it must start again from what it stored
    /// ([`Delivery::new`]), and the peers send the writes again.
    pub fn take_ready(&mut self, now_ms: u64) -> Vec<Delivered> {
        let mut out = Vec::new();
        loop {
            let before = out.len();
            let origins: Vec<NodeId> = self
                .pending
                .keys()
                .map(|dot| dot.node.clone())
                .collect::<std::collections::BTreeSet<_>>()
                .into_iter()
                .collect();
            for origin in origins {
                // An origin's writes apply in sequence: only its next one can be ready.
                loop {
                    let next = Dot {
                        node: origin.clone(),
                        counter: self.applied.get(&origin) + 1,
                    };
                    let ready = self
                        .pending
                        .get(&next)
                        .is_some_and(|(write, _)| write.deliverable(&self.applied));
                    if !ready {
                        break;
                    }
                    let Some((write, arrived)) = self.pending.remove(&next) else {
                        break;
                    };
                    self.applied.witness(&origin, write.seq);
                    out.push(Delivered {
                        write,
                        waited_ms: now_ms.saturating_sub(arrived),
                    });
                }
            }
            // Writes an origin already applied (a snapshot or a relay got there first) are
            // dead weight: drop them.
            let applied = &self.applied;
            self.pending.retain(|dot, _| !applied.contains(dot));
            if out.len() == before {
                return out;
            }
        }
    }

    /// Numbers a write this replica makes now: its sequence number and dependencies (what it
    /// has applied), counting it as applied.
    pub fn local_write(&mut self, me: &NodeId) -> (u64, VersionVector) {
        let deps = self.applied.clone();
        let seq = self.applied.get(me) + 1;
        self.applied.witness(me, seq);
        (seq, deps)
    }

    /// Counts as applied a causally closed set of writes stored by other means (a snapshot
    /// of a peer's state), and lets the buffered writes it makes deliverable go through
    /// [`Delivery::take_ready`].
    pub fn absorb(&mut self, applied: &VersionVector) {
        self.applied.merge(applied);
    }
}

/// The writes a peer that has applied `theirs` lacks from one that has applied `mine`: per
/// origin, the first and last sequence number missing (inclusive).
pub fn missing(mine: &VersionVector, theirs: &VersionVector) -> Vec<(NodeId, u64, u64)> {
    mine.iter()
        .filter(|(node, counter)| theirs.get(node) < *counter)
        .map(|(node, counter)| (node.clone(), theirs.get(node) + 1, counter))
        .collect()
}

/// The writes every vector of `applied` counts (the pointwise minimum): what every member
/// holds, so no member will ask for them again. Empty when `applied` is.
pub fn stable<'a>(mut applied: impl Iterator<Item = &'a VersionVector>) -> VersionVector {
    let Some(first) = applied.next() else {
        return VersionVector::new();
    };
    let mut floor: BTreeMap<NodeId, u64> = first.iter().map(|(n, c)| (n.clone(), c)).collect();
    for vector in applied {
        for (node, counter) in floor.iter_mut() {
            *counter = (*counter).min(vector.get(node));
        }
    }
    let mut out = VersionVector::new();
    for (node, counter) in floor {
        out.witness(&node, counter);
    }
    out
}

/// Whether `applied` counts every write of `token`: a replica that has applied `applied` may
/// serve a session whose causal past is `token`.
pub fn covers(applied: &VersionVector, token: &VersionVector) -> bool {
    applied.dominates(token)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hlc::Timestamp;
    use crate::record::Value;

    fn node(name: &str) -> NodeId {
        NodeId::new(name).unwrap()
    }

    fn vector(entries: &[(&str, u64)]) -> VersionVector {
        let mut v = VersionVector::new();
        for (n, c) in entries {
            v.witness(&node(n), *c);
        }
        v
    }

    fn write(origin: &str, seq: u64, deps: &[(&str, u64)]) -> CausalWrite {
        let mut deps = vector(deps);
        deps.witness(&node(origin), seq - 1);
        CausalWrite {
            origin: node(origin),
            seq,
            deps,
            entries: vec![(
                Key::new(format!("t:{origin}{seq}")).unwrap(),
                Record {
                    stamp: Timestamp::zero(node(origin)),
                    version: VersionVector::new(),
                    value: Value::Register(Some(vec![1])),
                    attestation: None,
                    expires_at_ms: None,
                },
            )],
        }
    }

    fn dots(delivered: &[Delivered]) -> Vec<(String, u64)> {
        delivered
            .iter()
            .map(|d| (d.write.origin.as_str().to_owned(), d.write.seq))
            .collect()
    }

    #[test]
    fn a_write_waits_for_its_dependencies_and_its_origins_earlier_writes() {
        let mut delivery = Delivery::new(VersionVector::new(), 16);
        // b's first write depends on a's first; a's second follows a's first.
        assert_eq!(
            delivery.offer(write("b", 1, &[("a", 1)]), 0),
            Offered::Buffered
        );
        assert_eq!(delivery.offer(write("a", 2, &[]), 1), Offered::Buffered);
        assert!(delivery.take_ready(2).is_empty());
        assert_eq!(delivery.buffered(), 2);
        assert_eq!(delivery.offer(write("a", 1, &[]), 5), Offered::Buffered);
        let ready = delivery.take_ready(7);
        let order = dots(&ready);
        let position = |d: (&str, u64)| order.iter().position(|x| x.0 == d.0 && x.1 == d.1);
        assert_eq!(order.len(), 3);
        assert!(position(("a", 1)) < position(("b", 1)));
        assert!(position(("a", 1)) < position(("a", 2)));
        assert_eq!(ready[0].waited_ms, 2, "a1 arrived at 5, delivered at 7");
        assert_eq!(delivery.applied(), &vector(&[("a", 2), ("b", 1)]));
        assert_eq!(delivery.buffered(), 0);
    }

    #[test]
    fn duplicates_and_applied_writes_are_ignored() {
        let mut delivery = Delivery::new(vector(&[("a", 1)]), 16);
        assert_eq!(delivery.offer(write("a", 1, &[]), 0), Offered::Duplicate);
        assert_eq!(delivery.offer(write("a", 2, &[]), 0), Offered::Buffered);
        assert_eq!(delivery.offer(write("a", 2, &[]), 0), Offered::Duplicate);
        assert_eq!(dots(&delivery.take_ready(0)), vec![("a".into(), 2)]);
    }

    #[test]
    fn a_full_buffer_drops_writes_that_must_wait_but_takes_the_one_they_wait_for() {
        let mut delivery = Delivery::new(VersionVector::new(), 2);
        assert_eq!(delivery.offer(write("a", 3, &[]), 0), Offered::Buffered);
        assert_eq!(delivery.offer(write("a", 4, &[]), 0), Offered::Buffered);
        assert_eq!(delivery.offer(write("a", 2, &[]), 0), Offered::Full);
        assert!(delivery.take_ready(0).is_empty());
        assert_eq!(delivery.offer(write("a", 1, &[]), 0), Offered::Buffered);
        assert_eq!(dots(&delivery.take_ready(0)), vec![("a".into(), 1)]);
        assert_eq!(delivery.offer(write("a", 2, &[]), 0), Offered::Buffered);
        assert_eq!(delivery.take_ready(0).len(), 3, "a2 releases a3 and a4");
    }

    #[test]
    fn local_writes_depend_on_everything_applied() {
        let mut delivery = Delivery::new(vector(&[("a", 4)]), 4);
        let (seq, deps) = delivery.local_write(&node("b"));
        assert_eq!((seq, deps), (1, vector(&[("a", 4)])));
        let (seq, deps) = delivery.local_write(&node("b"));
        assert_eq!((seq, deps), (2, vector(&[("a", 4), ("b", 1)])));
    }

    #[test]
    fn absorbing_a_snapshot_releases_what_waited_on_it() {
        let mut delivery = Delivery::new(VersionVector::new(), 4);
        delivery.offer(write("b", 1, &[("a", 3)]), 0);
        delivery.offer(write("a", 2, &[]), 0);
        delivery.absorb(&vector(&[("a", 3)]));
        assert_eq!(dots(&delivery.take_ready(0)), vec![("b".into(), 1)]);
        assert_eq!(delivery.buffered(), 0, "a2 is in the snapshot");
    }

    #[test]
    fn missing_ranges_and_the_stable_floor() {
        let mine = vector(&[("a", 5), ("b", 2)]);
        let theirs = vector(&[("a", 3), ("c", 9)]);
        assert_eq!(
            missing(&mine, &theirs),
            vec![(node("a"), 4, 5), (node("b"), 1, 2)]
        );
        let all = [mine.clone(), theirs.clone()];
        assert_eq!(stable(all.iter()), vector(&[("a", 3)]));
        assert!(covers(&mine, &vector(&[("a", 5)])));
        assert!(!covers(&mine, &vector(&[("c", 1)])));
    }

    #[test]
    fn the_encoding_round_trips_and_refuses_broken_numbering() {
        let original = write("a", 3, &[("b", 7)]);
        let mut bytes = Vec::new();
        original.encode(&mut bytes);
        let decoded = CausalWrite::decode(&mut Reader::new(&bytes)).unwrap();
        assert_eq!(decoded, original);
        let mut broken = original.clone();
        broken.deps = vector(&[("b", 7)]);
        let mut bytes = Vec::new();
        broken.encode(&mut bytes);
        assert!(CausalWrite::decode(&mut Reader::new(&bytes)).is_err());
    }
}
