//! Property tests of the semilattice laws and of convergence, for every CRDT in this crate.
//!
//! States are not arbitrary values of the types but states that replicas really reach: three
//! replicas apply random operations and merge from each other in random order, and the laws
//! are checked on the states they end with (and on intermediate snapshots).

use std::fmt::Debug;

use proptest::prelude::*;

use super::*;
use crate::hlc::Timestamp;
use crate::node::NodeId;
use crate::version::VersionVector;

const REPLICAS: usize = 3;

fn node(i: usize) -> NodeId {
    NodeId::new(format!("n{i}")).unwrap()
}

/// A CRDT under test: how to make one and which operations a replica can apply to it.
trait Model: Crdt + Clone + PartialEq + Debug + Default {
    type Op: Debug + Clone;
    fn op() -> BoxedStrategy<Self::Op>;
    fn apply(&mut self, replica: usize, step: u64, op: &Self::Op);
}

#[derive(Debug, Clone)]
enum Step<Op> {
    Apply { replica: usize, op: Op },
    Merge { into: usize, from: usize },
}

fn steps<M: Model>() -> impl Strategy<Value = Vec<Step<M::Op>>> {
    let step = prop_oneof![
        3 => (0..REPLICAS, M::op()).prop_map(|(replica, op)| Step::Apply { replica, op }),
        1 => (0..REPLICAS, 0..REPLICAS).prop_map(|(into, from)| Step::Merge { into, from }),
    ];
    prop::collection::vec(step, 0..40)
}

/// Runs the steps on three replicas; returns every replica state seen along the way.
fn run<M: Model>(steps: &[Step<M::Op>]) -> Vec<M> {
    let mut replicas = vec![M::default(); REPLICAS];
    let mut seen = Vec::new();
    for (i, step) in steps.iter().enumerate() {
        match step {
            Step::Apply { replica, op } => replicas[*replica].apply(*replica, i as u64, op),
            Step::Merge { into, from } => {
                let from = replicas[*from].clone();
                replicas[*into].merge(&from);
            }
        }
        if i % 7 == 0 {
            seen.extend(replicas.iter().cloned());
        }
    }
    seen.extend(replicas);
    seen
}

fn joined<M: Crdt + Clone>(a: &M, b: &M) -> M {
    let mut out = a.clone();
    out.merge(b);
    out
}

fn check_laws<M: Model>(states: &[M], picks: (usize, usize, usize)) -> Result<(), TestCaseError> {
    let a = &states[picks.0 % states.len()];
    let b = &states[picks.1 % states.len()];
    let c = &states[picks.2 % states.len()];
    prop_assert_eq!(joined(a, b), joined(b, a), "commutative");
    prop_assert_eq!(
        joined(&joined(a, b), c),
        joined(a, &joined(b, c)),
        "associative"
    );
    prop_assert_eq!(joined(a, a), a.clone(), "idempotent");
    Ok(())
}

/// Delivers every state to a fresh replica in the given order, with duplicates.
fn deliver<M: Model>(states: &[M], order: &[usize]) -> M {
    let mut replica = M::default();
    for &i in order {
        replica.merge(&states[i % states.len()]);
    }
    // Make sure every state was delivered at least once, whatever the order held.
    for state in states {
        replica.merge(state);
    }
    replica
}

fn check_convergence<M: Model>(
    states: &[M],
    order_a: &[usize],
    order_b: &[usize],
) -> Result<(), TestCaseError> {
    let reversed: Vec<M> = states.iter().rev().cloned().collect();
    let a = deliver(states, order_a);
    let b = deliver(&reversed, order_b);
    prop_assert_eq!(
        a,
        b,
        "replicas that saw the same states in different orders differ"
    );
    Ok(())
}

macro_rules! law_tests {
    ($name:ident, $model:ty) => {
        mod $name {
            use super::*;
            proptest! {
                #[test]
                fn merge_is_commutative_associative_idempotent(
                    steps in steps::<$model>(),
                    picks in (0usize..64, 0usize..64, 0usize..64),
                ) {
                    check_laws(&run::<$model>(&steps), picks)?;
                }

                #[test]
                fn replicas_converge_whatever_the_delivery_order(
                    steps in steps::<$model>(),
                    order_a in prop::collection::vec(0usize..64, 0..30),
                    order_b in prop::collection::vec(0usize..64, 0..30),
                ) {
                    check_convergence(&run::<$model>(&steps), &order_a, &order_b)?;
                }
            }
        }
    };
}

impl Model for GCounter {
    type Op = u8;
    fn op() -> BoxedStrategy<u8> {
        any::<u8>().boxed()
    }
    fn apply(&mut self, replica: usize, _step: u64, op: &u8) {
        self.increment(&node(replica), u64::from(*op));
    }
}

impl Model for PnCounter {
    type Op = i8;
    fn op() -> BoxedStrategy<i8> {
        any::<i8>().boxed()
    }
    fn apply(&mut self, replica: usize, _step: u64, op: &i8) {
        self.add(&node(replica), i64::from(*op));
    }
}

impl Model for GSet<u8> {
    type Op = u8;
    fn op() -> BoxedStrategy<u8> {
        (0u8..8).boxed()
    }
    fn apply(&mut self, _replica: usize, _step: u64, op: &u8) {
        self.insert(*op);
    }
}

#[derive(Debug, Clone)]
enum SetOp {
    Add(u8),
    Remove(u8),
}

impl Model for OrSet<u8> {
    type Op = SetOp;
    fn op() -> BoxedStrategy<SetOp> {
        prop_oneof![
            (0u8..6).prop_map(SetOp::Add),
            (0u8..6).prop_map(SetOp::Remove)
        ]
        .boxed()
    }
    fn apply(&mut self, replica: usize, _step: u64, op: &SetOp) {
        match op {
            SetOp::Add(e) => {
                self.add(&node(replica), *e);
            }
            SetOp::Remove(e) => {
                self.remove(e);
            }
        }
        assert_eq!(self.validate(), Ok(()));
    }
}

#[derive(Debug, Clone)]
enum RegisterOp {
    /// Write with the replica's whole context (a client that read first).
    WriteAfterRead(Option<u8>),
    /// Write without a context (a blind write).
    BlindWrite(u8),
}

impl Model for MvRegister<u8> {
    type Op = RegisterOp;
    fn op() -> BoxedStrategy<RegisterOp> {
        prop_oneof![
            prop::option::of(0u8..4).prop_map(RegisterOp::WriteAfterRead),
            (0u8..4).prop_map(RegisterOp::BlindWrite),
        ]
        .boxed()
    }
    fn apply(&mut self, replica: usize, _step: u64, op: &RegisterOp) {
        match op {
            RegisterOp::WriteAfterRead(value) => {
                let seen = self.context().clone();
                self.write(&node(replica), *value, &seen);
            }
            RegisterOp::BlindWrite(value) => {
                self.write(&node(replica), Some(*value), &VersionVector::new());
            }
        }
    }
}

/// An LWW register that starts empty, so it has a `Default` for the harness.
type Lww = Option<LwwRegister<u8>>;

impl Crdt for Lww {
    fn merge(&mut self, other: &Self) {
        match (self.as_mut(), other) {
            (Some(ours), Some(theirs)) => ours.merge(theirs),
            (None, Some(theirs)) => *self = Some(theirs.clone()),
            (_, None) => {}
        }
    }
}

impl Model for Lww {
    type Op = (u8, u64);
    fn op() -> BoxedStrategy<(u8, u64)> {
        // Small wall-clock range, so equal wall times (and node tiebreaks) are common.
        (0u8..4, 0u64..4).boxed()
    }
    fn apply(&mut self, replica: usize, step: u64, (value, wall): &(u8, u64)) {
        let stamp = Timestamp {
            wall_ms: *wall,
            logical: (step % 2) as u32,
            node: node(replica),
        };
        match self {
            Some(register) => register.set(*value, stamp),
            None => *self = Some(LwwRegister::new(*value, stamp)),
        }
    }
}

impl Model for VersionVector {
    type Op = ();
    fn op() -> BoxedStrategy<()> {
        Just(()).boxed()
    }
    fn apply(&mut self, replica: usize, _step: u64, _op: &()) {
        self.next_dot(&node(replica));
    }
}

law_tests!(g_counter, GCounter);
law_tests!(pn_counter, PnCounter);
law_tests!(g_set, GSet<u8>);
law_tests!(or_set, OrSet<u8>);
law_tests!(mv_register, MvRegister<u8>);
law_tests!(lww_register, Lww);
law_tests!(version_vector, VersionVector);

proptest! {
    /// After every replica merged every other, a PN-counter equals the sum of all deltas applied.
    #[test]
    fn counters_equal_the_sum_of_their_increments(deltas in prop::collection::vec((0..REPLICAS, any::<i16>()), 0..60)) {
        let mut replicas = vec![PnCounter::new(); REPLICAS];
        for (replica, delta) in &deltas {
            replicas[*replica].add(&node(*replica), i64::from(*delta));
        }
        let all = replicas.iter().fold(PnCounter::new(), |acc, r| joined(&acc, r));
        let expected: i64 = deltas.iter().map(|(_, d)| i64::from(*d)).sum();
        prop_assert_eq!(all.value(), expected);
    }
}

#[test]
fn or_set_add_wins_over_a_concurrent_remove() {
    let mut a = OrSet::new();
    a.add(&node(0), "x");
    let mut b = a.clone();
    b.remove(&"x");
    a.add(&node(0), "x"); // concurrent with b's remove
    let merged = joined(&a, &b);
    assert!(merged.contains(&"x"));
    // A remove that observed every add wins.
    let mut c = merged.clone();
    c.remove(&"x");
    assert!(!joined(&merged, &c).contains(&"x"));
}

#[test]
fn or_set_keeps_no_tombstones() {
    let mut set = OrSet::new();
    for i in 0..100u32 {
        set.add(&node(0), i);
        set.remove(&i);
    }
    assert!(set.is_empty());
    assert_eq!(
        set.context().len(),
        1,
        "one counter per node, whatever was removed"
    );
}

#[test]
fn mv_register_keeps_concurrent_writes_and_a_context_write_replaces_them() {
    let mut a = MvRegister::new();
    let mut b = MvRegister::new();
    a.write(&node(0), Some("from a"), &VersionVector::new());
    b.write(&node(1), Some("from b"), &VersionVector::new());
    let mut merged = joined(&a, &b);
    let mut siblings: Vec<_> = merged.values().copied().collect();
    siblings.sort();
    assert_eq!(siblings, ["from a", "from b"]);

    let context = merged.context().clone();
    merged.write(&node(2), Some("resolved"), &context);
    assert_eq!(merged.values().copied().collect::<Vec<_>>(), ["resolved"]);
    // Old siblings do not come back from replicas that still hold them.
    let again = joined(&joined(&merged, &a), &b);
    assert_eq!(again.values().copied().collect::<Vec<_>>(), ["resolved"]);
}

#[test]
fn mv_register_blind_writes_through_one_node_are_not_lost() {
    let mut register = MvRegister::new();
    register.write(&node(0), Some(1), &VersionVector::new());
    register.write(&node(0), Some(2), &VersionVector::new());
    assert_eq!(
        register.len(),
        2,
        "two clients without a context are concurrent"
    );
}

#[test]
fn mv_register_writing_back_the_context_never_adds_siblings() {
    let mut register = MvRegister::new();
    for i in 0..50 {
        let context = register.context().clone();
        register.write(&node(i % 3), Some(i), &context);
        assert_eq!(register.len(), 1);
    }
}
