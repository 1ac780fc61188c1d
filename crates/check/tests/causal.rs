//! The causal checker: known answers for each bad pattern and session guarantee, histories
//! made by a simulated causal store (always accepted), and those histories with one stale
//! read slipped in (always refused).

use std::collections::{BTreeMap, BTreeSet};

use agentstore_check::causal::{CausalOp, CausalViolation, Guarantee, check_causal};
use proptest::prelude::*;

type Op = CausalOp<&'static str, u32>;

fn w(key: &'static str, value: u32) -> Op {
    CausalOp::Write { key, value }
}

fn r(key: &'static str, value: Option<u32>) -> Op {
    CausalOp::Read { key, value }
}

fn guarantee(sessions: &[Vec<Op>]) -> Option<Guarantee> {
    match check_causal(sessions) {
        Err(CausalViolation::StaleRead { guarantee, .. }) => Some(guarantee),
        Err(other) => panic!("expected a stale read, got {other}"),
        Ok(_) => None,
    }
}

#[test]
fn a_session_reads_its_own_writes() {
    assert_eq!(guarantee(&[vec![w("x", 1), r("x", Some(1))]]), None);
    assert_eq!(
        guarantee(&[vec![w("x", 1), r("x", None)]]),
        Some(Guarantee::ReadYourWrites)
    );
    assert_eq!(
        guarantee(&[vec![w("x", 1), w("x", 2), r("x", Some(1))]]),
        Some(Guarantee::ReadYourWrites)
    );
}

#[test]
fn reads_do_not_go_back() {
    let writer = vec![w("x", 1), w("x", 2)];
    assert_eq!(
        guarantee(&[writer.clone(), vec![r("x", Some(2)), r("x", Some(1))]]),
        Some(Guarantee::MonotonicReads)
    );
    assert_eq!(
        guarantee(&[writer, vec![r("x", Some(1)), r("x", Some(2))]]),
        None
    );
}

#[test]
fn a_task_is_never_seen_without_the_task_it_depends_on() {
    // A writes task a; B reads it and writes task b (which depends on a); C sees b, then
    // must see a.
    let a = vec![w("task:a", 1)];
    let b = vec![r("task:a", Some(1)), w("task:b", 2)];
    let fine = vec![r("task:b", Some(2)), r("task:a", Some(1))];
    let broken = vec![r("task:b", Some(2)), r("task:a", None)];
    assert_eq!(guarantee(&[a.clone(), b.clone(), fine]), None);
    assert_eq!(
        guarantee(&[a, b, broken]),
        Some(Guarantee::WritesFollowReads)
    );
}

#[test]
fn a_session_sees_another_sessions_writes_in_the_order_they_were_made() {
    // A writes step 1, then step 2; B sees step 2, then must see step 1.
    let a = vec![w("step:1", 1), w("step:2", 2)];
    let fine = vec![r("step:2", Some(2)), r("step:1", Some(1))];
    let broken = vec![r("step:2", Some(2)), r("step:1", None)];
    assert_eq!(guarantee(&[a.clone(), fine]), None);
    assert_eq!(guarantee(&[a, broken]), Some(Guarantee::MonotonicWrites));
}

#[test]
fn a_longer_chain_of_sessions_is_still_causality() {
    // A writes x; B reads it and writes y; C reads y and writes z; D sees z, then not x.
    let sessions = [
        vec![w("x", 1)],
        vec![r("x", Some(1)), w("y", 2)],
        vec![r("y", Some(2)), w("z", 3)],
        vec![r("z", Some(3)), r("x", None)],
    ];
    assert_eq!(guarantee(&sessions), Some(Guarantee::Causality));
}

#[test]
fn concurrent_writes_may_be_seen_in_either_order() {
    // Causal consistency alone lets a reader see concurrent writes in any order;
    // convergence is checked apart (final reads agree).
    let sessions = vec![
        vec![w("x", 1)],
        vec![w("x", 2)],
        vec![r("x", Some(2)), r("x", Some(1))],
    ];
    assert!(check_causal(&sessions).is_ok());
}

#[test]
fn thin_air_cycles_and_duplicates_are_caught() {
    assert!(matches!(
        check_causal(&[vec![r("x", Some(9))]]),
        Err(CausalViolation::ThinAir { read: (0, 0) })
    ));
    // Each session reads what the other writes only afterwards.
    let cycle = vec![
        vec![r("x", Some(2)), w("y", 1)],
        vec![r("y", Some(1)), w("x", 2)],
    ];
    assert!(matches!(
        check_causal(&cycle),
        Err(CausalViolation::Cycle { .. })
    ));
    assert!(matches!(
        check_causal(&[vec![w("x", 1)], vec![w("y", 1)]]),
        Err(CausalViolation::DuplicateValue { .. })
    ));
}

/// A causal store: replicas apply local writes at once and remote ones only after everything
/// the writer had seen (causal delivery); a session stays on a replica until it moves to one
/// that has caught up with the session's context (what a session token makes a node wait for).
struct Store {
    replicas: Vec<Replica>,
    /// Every write: (origin, dependencies: the writer's applied set, key, value).
    log: Vec<(usize, BTreeSet<u32>, &'static str, u32)>,
}

#[derive(Default, Clone)]
struct Replica {
    applied: BTreeSet<u32>,
    /// key → (lamport, value): the newest by (lamport, value) wins.
    values: BTreeMap<&'static str, (u64, u32)>,
    lamport: u64,
}

impl Store {
    fn apply(&mut self, replica: usize, write: usize) {
        let (_, _, key, value) = self.log[write].clone();
        let target = &mut self.replicas[replica];
        let stamp = (write as u64 + 1).max(target.lamport + 1);
        target.lamport = stamp;
        target.applied.insert(value);
        let newer = target
            .values
            .get(key)
            .is_none_or(|current| (stamp, value) > *current);
        if newer {
            target.values.insert(key, (stamp, value));
        }
    }

    /// Delivers one pending write to `replica` if one is deliverable.
    fn deliver(&mut self, replica: usize, pick: usize) {
        let ready: Vec<usize> = (0..self.log.len())
            .filter(|&i| {
                let (_, deps, _, value) = &self.log[i];
                let have = &self.replicas[replica].applied;
                !have.contains(value) && deps.is_subset(have)
            })
            .collect();
        if !ready.is_empty() {
            self.apply(replica, ready[pick % ready.len()]);
        }
    }
}

fn causal_history() -> impl Strategy<Value = Vec<Vec<Op>>> {
    let step = (0..3usize, 0..6u8, 0..3usize, any::<usize>(), 0..3usize);
    proptest::collection::vec(step, 10..80).prop_map(|steps| {
        const KEYS: [&str; 3] = ["k0", "k1", "k2"];
        let mut store = Store {
            replicas: vec![Replica::default(); 3],
            log: Vec::new(),
        };
        let mut home = [0usize, 1, 2];
        let mut context: [BTreeSet<u32>; 3] = Default::default();
        let mut sessions: Vec<Vec<Op>> = vec![Vec::new(); 3];
        let mut next_value = 1u32;
        for (session, action, key, pick, replica) in steps {
            let at = home[session];
            match action {
                0 | 1 => {
                    let value = next_value;
                    next_value += 1;
                    let deps = store.replicas[at].applied.clone();
                    store.log.push((at, deps, KEYS[key], value));
                    store.apply(at, store.log.len() - 1);
                    context[session].insert(value);
                    sessions[session].push(w(KEYS[key], value));
                }
                2 | 3 => {
                    let seen = store.replicas[at].values.get(KEYS[key]).map(|(_, v)| *v);
                    if let Some(v) = seen {
                        let (_, deps, _, _) = store.log.iter().find(|e| e.3 == v).unwrap().clone();
                        context[session].extend(deps);
                        context[session].insert(v);
                    }
                    sessions[session].push(r(KEYS[key], seen));
                }
                4 => store.deliver(replica, pick),
                _ => {
                    // Move to another replica once it has caught up with the session.
                    if context[session].is_subset(&store.replicas[replica].applied) {
                        home[session] = replica;
                    }
                }
            }
        }
        sessions
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(500))]

    #[test]
    fn a_causal_store_passes(history in causal_history()) {
        let result = check_causal(&history);
        prop_assert!(result.is_ok(), "{:?}", result);
    }

    #[test]
    fn a_session_that_misses_its_own_write_fails(history in causal_history(), pick in any::<prop::sample::Index>()) {
        let writes: Vec<(usize, usize)> = history
            .iter()
            .enumerate()
            .flat_map(|(s, ops)| ops.iter().enumerate().filter(|(_, op)| matches!(op, CausalOp::Write { .. })).map(move |(i, _)| (s, i)))
            .collect();
        prop_assume!(!writes.is_empty());
        let (s, i) = writes[pick.index(writes.len())];
        let CausalOp::Write { key, .. } = history[s][i].clone() else { unreachable!() };
        let mut broken = history.clone();
        broken[s].insert(i + 1, CausalOp::Read { key, value: None });
        let result = check_causal(&broken);
        prop_assert!(
            matches!(result, Err(CausalViolation::StaleRead { guarantee: Guarantee::ReadYourWrites, .. })),
            "{:?}",
            result
        );
    }
}
