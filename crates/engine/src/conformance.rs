//! The conformance suite: the [`Engine`] obligations as executable checks.
//!
//! Every engine runs the same checks through [`conformance_tests!`](crate::conformance_tests):
//!
//! ```ignore
//! async fn make() -> (LocalEngine, tempfile::TempDir) { ... }
//! agentstore_engine::conformance_tests!(make);
//! ```
//!
//! Each check works in its own fresh collection (see [`namespace`]), so checks can share one
//! server and leftovers of earlier runs do not matter. A failing check panics with a message
//! that names what broke.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use agentstore_core::record::{Kind, Value};
use agentstore_core::{Causality, Crdt, HybridClock, NodeId, VersionVector};

use crate::{Engine, EngineError, Expect, Fence, Key, Mutation, Write};

/// Generates the conformance tests.
///
/// - `conformance_tests!(make)`: one `#[tokio::test]` per check of the sets every engine with
///   one point that orders writes passes (`every`, `batches`, `conditions`); `make` is an
///   async fn returning the engine and a guard kept alive for the test (a temporary
///   directory, a server handle, ...).
/// - `conformance_tests!(two_phase: make)`: the two-phase participant checks.
/// - `conformance_tests!(in_one test_name, make, [set, ...])`: one test that runs every check
///   of the sets on one engine (for engines that are costly to start, such as a cluster),
///   each in a fresh collection, and fails naming every check that failed. The sets:
///   `every`, `batches` (multi-key batches apply atomically), `conditions` (compare-and-set
///   and fences hold), `refuses_conditions` and `refuses_batches` (for engines that cannot
///   make those hold: they are refused as `Unsupported`), `two_phase`.
#[macro_export]
macro_rules! conformance_tests {
    ($make:path) => {
        $crate::conformance_tests!(@list every, @each $make;);
        $crate::conformance_tests!(@list batches, @each $make;);
        $crate::conformance_tests!(@list conditions, @each $make;);
    };
    (two_phase: $make:path) => {
        $crate::conformance_tests!(@list two_phase, @each $make;);
    };
    (in_one $test:ident, $make:path, [$($set:ident),* $(,)?]) => {
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn $test() {
            let (engine, _guard) = $make().await;
            let mut failed: Vec<&str> = Vec::new();
            $( $crate::conformance_tests!(@list $set, @run engine, failed;); )*
            assert!(failed.is_empty(), "failed checks: {failed:?}");
        }
    };
    (@list every, $($then:tt)*) => {
        $crate::conformance_tests!($($then)*
            missing_key_reads_as_none,
            binary_and_unicode_keys_and_values_round_trip,
            delete_leaves_a_tombstone,
            scan_returns_a_prefix_in_key_order_with_paging,
            concurrent_counter_increments_are_exact,
            concurrent_lww_writers_keep_the_newest_stamp,
            multi_value_keeps_siblings_until_a_context_write,
            sets_add_and_remove,
            a_mutation_of_the_wrong_kind_is_refused,
            merging_a_remote_state_joins_it
        );
    };
    (@list batches, $($then:tt)*) => {
        $crate::conformance_tests!($($then)* a_batch_sees_its_own_writes);
    };
    (@list conditions, $($then:tt)*) => {
        $crate::conformance_tests!($($then)*
            compare_and_set_checks_the_version,
            a_failed_expectation_writes_nothing_of_its_batch,
            a_write_with_an_older_fencing_token_is_rejected
        );
    };
    (@list refuses_conditions, $($then:tt)*) => {
        $crate::conformance_tests!($($then)* conditions_and_fences_are_refused_typed);
    };
    (@list refuses_batches, $($then:tt)*) => {
        $crate::conformance_tests!($($then)* multi_key_batches_are_refused_typed);
    };
    (@list two_phase, $($then:tt)*) => {
        $crate::conformance_tests!($($then)*
            a_prepared_transaction_locks_its_keys_until_it_commits,
            an_aborted_transaction_leaves_nothing_and_unlocks,
            a_prepare_whose_condition_fails_locks_nothing
        );
    };
    (@each $make:path; $($check:ident),*) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $check() {
                let (engine, _guard) = $make().await;
                $crate::conformance::$check(&engine, &$crate::conformance::namespace()).await;
            }
        )*
    };
    (@run $engine:ident, $failed:ident; $($check:ident),*) => {
        $(
            let engine = $engine.clone();
            let ns = $crate::conformance::namespace();
            // A failed check panics on its own task: the others still run.
            let outcome = tokio::spawn(async move {
                $crate::conformance::$check(&engine, &ns).await;
            })
            .await;
            if outcome.is_err() {
                $failed.push(stringify!($check));
            }
        )*
    };
}

/// A collection name no other check, test process or earlier run uses.
pub fn namespace() -> String {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    format!(
        "conf{}x{}x{}",
        std::process::id(),
        nanos % 1_000_000_000_000,
        NEXT.fetch_add(1, Ordering::Relaxed)
    )
}

fn key(ns: &str, rest: impl AsRef<[u8]>) -> Key {
    let mut bytes = ns.as_bytes().to_vec();
    bytes.push(b':');
    bytes.extend_from_slice(rest.as_ref());
    Key::new(bytes).expect("valid test key")
}

fn register(record: &crate::Record) -> Option<&[u8]> {
    match &record.value {
        Value::Register(value) => value.as_deref(),
        other => panic!("expected an LWW register, found {:?}", other.kind()),
    }
}

/// A key never written reads as `None`.
pub async fn missing_key_reads_as_none<E: Engine + Clone>(engine: &E, ns: &str) {
    assert_eq!(engine.get(&key(ns, "nothing")).await.unwrap(), None);
}

/// Binary and Unicode keys and values, empty and large values, come back byte for byte.
pub async fn binary_and_unicode_keys_and_values_round_trip<E: Engine + Clone>(
    engine: &E,
    ns: &str,
) {
    let all_bytes: Vec<u8> = (0..=255).collect();
    let large: Vec<u8> = (0..1 << 20)
        .map(|i: u32| (i.wrapping_mul(2_654_435_761) >> 24) as u8)
        .collect();
    let cases: Vec<(Key, Vec<u8>)> = vec![
        (key(ns, [0u8, 255, b':', 10, 13]), all_bytes.clone()),
        (key(ns, "日本語:ключ:🔑"), "värde ✓ 値".as_bytes().to_vec()),
        (key(ns, "empty"), Vec::new()),
        (key(ns, "large"), large),
    ];
    for (k, v) in &cases {
        engine
            .apply(k.clone(), Mutation::Put(v.clone()))
            .await
            .unwrap();
    }
    for (k, v) in &cases {
        let record = engine
            .get(k)
            .await
            .unwrap()
            .unwrap_or_else(|| panic!("{k} is missing"));
        assert_eq!(register(&record), Some(v.as_slice()), "value of {k}");
    }
}

/// A delete stores a tombstone that supersedes the value and is still readable.
pub async fn delete_leaves_a_tombstone<E: Engine + Clone>(engine: &E, ns: &str) {
    let k = key(ns, "doomed");
    let live = engine
        .apply(k.clone(), Mutation::Put(b"v".to_vec()))
        .await
        .unwrap();
    let tombstone = engine.apply(k.clone(), Mutation::Delete).await.unwrap();
    assert!(tombstone.is_tombstone());
    assert_eq!(tombstone.causality(&live), Causality::After);
    let stored = engine
        .get(&k)
        .await
        .unwrap()
        .expect("the tombstone is stored");
    assert!(stored.is_tombstone());
    let scanned = engine.scan(k.as_bytes(), None, 10).await.unwrap();
    assert_eq!(scanned.len(), 1, "scan returns tombstones too");
}

/// Scan returns exactly the keys with the prefix, in byte order, and pages with `start_after`.
pub async fn scan_returns_a_prefix_in_key_order_with_paging<E: Engine + Clone>(
    engine: &E,
    ns: &str,
) {
    let other = format!("{ns}z");
    engine
        .apply(key(&other, "outside"), Mutation::Put(vec![0]))
        .await
        .unwrap();
    let mut expected = Vec::new();
    for i in (0..25u8).rev() {
        let k = key(ns, format!("item:{i:03}"));
        engine
            .apply(k.clone(), Mutation::Put(vec![i]))
            .await
            .unwrap();
        expected.push(k);
    }
    expected.sort();
    let prefix = format!("{ns}:");
    let mut seen = Vec::new();
    let mut after: Option<Key> = None;
    loop {
        let page = engine
            .scan(prefix.as_bytes(), after.as_ref(), 10)
            .await
            .unwrap();
        assert!(page.len() <= 10, "a page holds at most `limit` records");
        let Some((last, _)) = page.last() else { break };
        after = Some(last.clone());
        seen.extend(page.into_iter().map(|(k, _)| k));
    }
    assert_eq!(seen, expected);
}

/// Compare-and-set writes only over the version it expects.
pub async fn compare_and_set_checks_the_version<E: Engine + Clone>(engine: &E, ns: &str) {
    let k = key(ns, "cas");
    let first = engine
        .apply_if(k.clone(), Mutation::Put(b"1".to_vec()), Expect::Absent)
        .await
        .unwrap();
    let again = engine
        .apply_if(k.clone(), Mutation::Put(b"x".to_vec()), Expect::Absent)
        .await;
    assert!(
        matches!(again, Err(EngineError::ExpectationFailed { .. })),
        "{again:?}"
    );
    let second = engine
        .apply_if(
            k.clone(),
            Mutation::Put(b"2".to_vec()),
            Expect::Version(first.version.clone()),
        )
        .await
        .unwrap();
    let stale = engine
        .apply_if(
            k.clone(),
            Mutation::Put(b"stale".to_vec()),
            Expect::Version(first.version.clone()),
        )
        .await;
    match stale {
        Err(EngineError::ExpectationFailed {
            key: failed,
            source,
        }) => {
            assert_eq!(failed, k);
            assert_eq!(source.actual, Some(second.version.clone()));
        }
        other => panic!("a stale version must fail, got {other:?}"),
    }
    assert_eq!(
        register(&engine.get(&k).await.unwrap().unwrap()),
        Some(&b"2"[..])
    );
}

/// A batch whose later expectation fails writes none of its earlier writes.
pub async fn a_failed_expectation_writes_nothing_of_its_batch<E: Engine + Clone>(
    engine: &E,
    ns: &str,
) {
    let (a, b) = (key(ns, "a"), key(ns, "b"));
    engine
        .apply(b.clone(), Mutation::Put(b"taken".to_vec()))
        .await
        .unwrap();
    let result = engine
        .commit(vec![
            Write::new(a.clone(), Mutation::Put(b"1".to_vec())),
            Write::expecting(b.clone(), Mutation::Put(b"2".to_vec()), Expect::Absent),
        ])
        .await;
    assert!(
        matches!(result, Err(EngineError::ExpectationFailed { ref key, .. }) if *key == b),
        "{result:?}"
    );
    assert_eq!(
        engine.get(&a).await.unwrap(),
        None,
        "nothing of a failed batch is written"
    );
}

/// Later writes of a batch apply to the results of earlier ones.
pub async fn a_batch_sees_its_own_writes<E: Engine + Clone>(engine: &E, ns: &str) {
    let k = key(ns, "counter");
    let records = engine
        .commit(vec![
            Write::new(k.clone(), Mutation::PnCounterAdd(5)),
            Write::new(k.clone(), Mutation::PnCounterAdd(-2)),
            Write::new(key(ns, "other"), Mutation::Put(vec![1])),
        ])
        .await
        .unwrap();
    assert_eq!(records.len(), 3);
    match &engine.get(&k).await.unwrap().unwrap().value {
        Value::PnCounter(counter) => assert_eq!(counter.value(), 3),
        other => panic!("expected a counter, found {:?}", other.kind()),
    }
}

/// Increments from many concurrent tasks are all counted.
pub async fn concurrent_counter_increments_are_exact<E: Engine + Clone>(engine: &E, ns: &str) {
    let k = key(ns, "hits");
    let (tasks, per_task) = (16, 25);
    let mut set = tokio::task::JoinSet::new();
    for t in 0..tasks {
        let (engine, k) = (engine.clone(), k.clone());
        set.spawn(async move {
            for _ in 0..per_task {
                engine
                    .apply(
                        k.clone(),
                        Mutation::PnCounterAdd(if t % 4 == 0 { -1 } else { 2 }),
                    )
                    .await
                    .unwrap();
            }
        });
    }
    while let Some(done) = set.join_next().await {
        done.unwrap();
    }
    let expected = (0..tasks)
        .map(|t| if t % 4 == 0 { -per_task } else { 2 * per_task })
        .sum::<i64>();
    match &engine.get(&k).await.unwrap().unwrap().value {
        Value::PnCounter(counter) => assert_eq!(counter.value(), expected),
        other => panic!("expected a counter, found {:?}", other.kind()),
    }
}

/// Concurrent LWW writers: the stored value is the one with the greatest stamp, and every
/// acknowledged write's stamp is below it.
pub async fn concurrent_lww_writers_keep_the_newest_stamp<E: Engine + Clone>(engine: &E, ns: &str) {
    let k = key(ns, "contended");
    let mut set = tokio::task::JoinSet::new();
    for writer in 0..2u8 {
        let (engine, k) = (engine.clone(), k.clone());
        set.spawn(async move {
            let mut acked = Vec::new();
            for i in 0..50u8 {
                let record = engine
                    .apply(k.clone(), Mutation::Put(vec![writer, i]))
                    .await
                    .unwrap();
                acked.push(record);
            }
            acked
        });
    }
    let mut acked = Vec::new();
    while let Some(done) = set.join_next().await {
        acked.extend(done.unwrap());
    }
    let newest = acked.iter().max_by(|a, b| a.stamp.cmp(&b.stamp)).unwrap();
    let stored = engine.get(&k).await.unwrap().unwrap();
    assert_eq!(
        stored.stamp, newest.stamp,
        "the newest acknowledged write wins"
    );
    assert_eq!(register(&stored), register(newest));
    let stamps: std::collections::BTreeSet<_> = acked.iter().map(|r| r.stamp.clone()).collect();
    assert_eq!(
        stamps.len(),
        acked.len(),
        "every write got a distinct stamp"
    );
}

/// Blind writes to a multi-value register become siblings; writing with the read context
/// replaces them all.
pub async fn multi_value_keeps_siblings_until_a_context_write<E: Engine + Clone>(
    engine: &E,
    ns: &str,
) {
    let k = key(ns, "doc");
    for v in [b"one", b"two"] {
        let put = Mutation::PutSibling {
            value: Some(v.to_vec()),
            context: VersionVector::new(),
        };
        engine.apply(k.clone(), put).await.unwrap();
    }
    let stored = engine.get(&k).await.unwrap().unwrap();
    let Value::MultiValue(register) = &stored.value else {
        panic!("expected a multi-value register")
    };
    let mut siblings: Vec<&[u8]> = register.values().map(Vec::as_slice).collect();
    siblings.sort();
    assert_eq!(siblings, [&b"one"[..], &b"two"[..]]);
    let resolve = Mutation::PutSibling {
        value: Some(b"merged".to_vec()),
        context: register.context().clone(),
    };
    let resolved = engine.apply(k.clone(), resolve).await.unwrap();
    let Value::MultiValue(register) = &resolved.value else {
        panic!("expected a multi-value register")
    };
    assert_eq!(register.values().collect::<Vec<_>>(), [&b"merged".to_vec()]);
}

/// OR-Set adds and removes, and G-Set adds.
pub async fn sets_add_and_remove<E: Engine + Clone>(engine: &E, ns: &str) {
    let k = key(ns, "tags");
    for tag in ["a", "b", "c"] {
        engine
            .apply(k.clone(), Mutation::OrSetAdd(tag.into()))
            .await
            .unwrap();
    }
    let record = engine
        .apply(k.clone(), Mutation::OrSetRemove(b"b".to_vec()))
        .await
        .unwrap();
    let Value::OrSet(set) = &record.value else {
        panic!("expected an OR-Set")
    };
    assert_eq!(
        set.iter().cloned().collect::<Vec<_>>(),
        [b"a".to_vec(), b"c".to_vec()]
    );
    let g = key(ns, "seen");
    engine
        .apply(g.clone(), Mutation::GSetAdd(b"x".to_vec()))
        .await
        .unwrap();
    let record = engine
        .apply(g.clone(), Mutation::GSetAdd(b"x".to_vec()))
        .await
        .unwrap();
    let Value::GSet(set) = &record.value else {
        panic!("expected a G-Set")
    };
    assert_eq!(set.len(), 1);
}

/// A mutation for another kind of value is refused with a typed error and changes nothing.
pub async fn a_mutation_of_the_wrong_kind_is_refused<E: Engine + Clone>(engine: &E, ns: &str) {
    let k = key(ns, "typed");
    let before = engine
        .apply(k.clone(), Mutation::GCounterAdd(1))
        .await
        .unwrap();
    match engine.apply(k.clone(), Mutation::Put(vec![1])).await {
        Err(EngineError::WrongKind { source, .. }) => {
            assert_eq!(
                (source.stored, source.requested),
                (Kind::GCounter, Kind::Register)
            );
        }
        other => panic!("expected a wrong-kind error, got {other:?}"),
    }
    assert_eq!(engine.get(&k).await.unwrap(), Some(before));
}

/// Merging a state written elsewhere joins it with the stored state.
pub async fn merging_a_remote_state_joins_it<E: Engine + Clone>(engine: &E, ns: &str) {
    let k = key(ns, "shared");
    let local = engine
        .apply(k.clone(), Mutation::GCounterAdd(3))
        .await
        .unwrap();
    let mut remote_clock = HybridClock::new(NodeId::new("remote-node").unwrap(), 500);
    let remote =
        agentstore_core::record::apply(None, &Mutation::GCounterAdd(4), &mut remote_clock, 1)
            .unwrap();
    let merged = engine
        .apply(k.clone(), Mutation::Merge(remote.clone()))
        .await
        .unwrap();
    let mut expected = local.clone();
    expected.merge(&remote);
    assert_eq!(merged, expected);
    assert_eq!(merged.causality(&local), Causality::After);
    let Value::GCounter(counter) = &merged.value else {
        panic!("expected a G-Counter")
    };
    assert_eq!(counter.value(), 7);
    // Merging the same state again changes nothing (idempotent on the engine too).
    assert_eq!(
        engine
            .apply(k.clone(), Mutation::Merge(remote))
            .await
            .unwrap(),
        merged
    );
}

/// A write fenced by a token older than one the engine has seen for that lock is refused
/// whole; the current holder's token (and newer ones) pass.
pub async fn a_write_with_an_older_fencing_token_is_rejected<E: Engine + Clone>(
    engine: &E,
    ns: &str,
) {
    let k = key(ns, "guarded");
    let lock = format!("{ns}-lock");
    let fenced = |value: &[u8], token: u64| {
        vec![
            Write::new(k.clone(), Mutation::Put(value.to_vec())).fenced(Fence {
                lock: lock.clone(),
                token,
            }),
        ]
    };
    engine.commit(fenced(b"five", 5)).await.unwrap();
    engine.commit(fenced(b"seven", 7)).await.unwrap();
    match engine.commit(fenced(b"six", 6)).await {
        Err(EngineError::Fenced {
            lock: l,
            token,
            highest,
        }) => assert_eq!((l, token, highest), (lock.clone(), 6, 7)),
        other => panic!("a stale token must be fenced off, got {other:?}"),
    }
    assert_eq!(
        register(&engine.get(&k).await.unwrap().unwrap()),
        Some(&b"seven"[..]),
        "nothing of a fenced batch is written"
    );
    engine
        .commit(fenced(b"seven again", 7))
        .await
        .expect("the current holder keeps writing");
    // Another lock's tokens are independent.
    let other = vec![
        Write::new(key(ns, "other"), Mutation::Put(vec![1])).fenced(Fence {
            lock: format!("{ns}-other"),
            token: 1,
        }),
    ];
    engine.commit(other).await.unwrap();
}

fn put(k: &Key, value: &[u8]) -> Write {
    Write::new(k.clone(), Mutation::Put(value.to_vec()))
}

/// A prepared transaction: its keys refuse other writes, reads see the values from before
/// it, preparing again answers the same, the commit applies every write once, and resolving
/// again is a no-op.
pub async fn a_prepared_transaction_locks_its_keys_until_it_commits<E: Engine + Clone>(
    engine: &E,
    ns: &str,
) {
    let (a, b) = (key(ns, "a"), key(ns, "b"));
    let txn = format!("{ns}-t1");
    let before = engine.commit(vec![put(&a, b"1")]).await.unwrap();
    let writes = vec![
        Write::expecting(
            a.clone(),
            Mutation::Put(b"2".to_vec()),
            Expect::Version(before[0].version.clone()),
        ),
        put(&b, b"new"),
        Write::new(key(ns, "n"), Mutation::PnCounterAdd(5)),
    ];
    engine.prepare(&txn, writes.clone()).await.unwrap();
    engine
        .prepare(&txn, writes)
        .await
        .expect("preparing again answers the same");
    match engine.commit(vec![put(&a, b"other")]).await {
        Err(EngineError::InTransaction {
            key: locked,
            txn: holder,
        }) => {
            assert_eq!((locked, holder), (a.clone(), txn.clone()));
        }
        other => panic!("a locked key must refuse other writes, got {other:?}"),
    }
    assert!(
        matches!(
            engine.commit(vec![put(&b, b"other")]).await,
            Err(EngineError::InTransaction { .. })
        ),
        "a key the transaction creates is locked too"
    );
    assert_eq!(
        register(&engine.get(&a).await.unwrap().unwrap()),
        Some(&b"1"[..])
    );
    assert!(
        engine
            .get(&b)
            .await
            .unwrap()
            .is_none_or(|r| register(&r).is_none())
    );

    let applied = engine.resolve(&txn, true).await.unwrap();
    assert_eq!(applied.len(), 3, "one record per write");
    assert_eq!(
        register(&engine.get(&a).await.unwrap().unwrap()),
        Some(&b"2"[..])
    );
    assert_eq!(
        register(&engine.get(&b).await.unwrap().unwrap()),
        Some(&b"new"[..])
    );
    assert!(
        engine.resolve(&txn, true).await.unwrap().is_empty(),
        "resolving again applies nothing"
    );
    let n = engine.get(&key(ns, "n")).await.unwrap().unwrap();
    match n.value {
        Value::PnCounter(counter) => assert_eq!(counter.value(), 5, "applied exactly once"),
        other => panic!("{other:?}"),
    }
    engine
        .commit(vec![put(&a, b"3")])
        .await
        .expect("unlocked after the commit");
}

/// An aborted transaction writes nothing and unlocks its keys.
pub async fn an_aborted_transaction_leaves_nothing_and_unlocks<E: Engine + Clone>(
    engine: &E,
    ns: &str,
) {
    let c = key(ns, "c");
    let txn = format!("{ns}-t2");
    engine.prepare(&txn, vec![put(&c, b"x")]).await.unwrap();
    assert!(engine.resolve(&txn, false).await.unwrap().is_empty());
    assert!(
        engine
            .get(&c)
            .await
            .unwrap()
            .is_none_or(|r| register(&r).is_none())
    );
    engine
        .commit(vec![put(&c, b"y")])
        .await
        .expect("unlocked after the abort");
    assert!(
        engine
            .resolve(&format!("{ns}-never"), true)
            .await
            .unwrap()
            .is_empty(),
        "a transaction never prepared here resolves to nothing"
    );
}

/// A prepare checks its conditions and fences now: one that fails locks nothing, one that
/// overlaps a prepared transaction is refused, and an accepted fence is raised at once.
pub async fn a_prepare_whose_condition_fails_locks_nothing<E: Engine + Clone>(
    engine: &E,
    ns: &str,
) {
    let d = key(ns, "d");
    engine.commit(vec![put(&d, b"1")]).await.unwrap();
    let stale = Write::expecting(d.clone(), Mutation::Put(b"2".to_vec()), Expect::Absent);
    assert!(matches!(
        engine.prepare(&format!("{ns}-t3"), vec![stale]).await,
        Err(EngineError::ExpectationFailed { .. })
    ));
    engine
        .commit(vec![put(&d, b"still free")])
        .await
        .expect("a refused prepare locks nothing");

    let lock = format!("{ns}-lock");
    let fenced = |k: &Key, token| {
        put(k, b"f").fenced(Fence {
            lock: lock.clone(),
            token,
        })
    };
    let first = format!("{ns}-t4");
    engine
        .prepare(&first, vec![fenced(&key(ns, "e"), 9)])
        .await
        .unwrap();
    assert!(
        matches!(
            engine
                .prepare(&format!("{ns}-t5"), vec![put(&key(ns, "e"), b"z")])
                .await,
            Err(EngineError::InTransaction { .. })
        ),
        "two prepared transactions never hold one key"
    );
    assert!(
        matches!(
            engine.commit(vec![fenced(&key(ns, "g"), 8)]).await,
            Err(EngineError::Fenced { highest: 9, .. })
        ),
        "the prepared fence counts at once"
    );
    engine.resolve(&first, true).await.unwrap();
}

/// For engines without a single point that orders writes (leaderless replication, causal
/// broadcast): a conditional write and a fenced write are refused with
/// [`EngineError::Unsupported`], and write nothing.
pub async fn conditions_and_fences_are_refused_typed<E: Engine + Clone>(engine: &E, ns: &str) {
    let k = key(ns, "a");
    let refused = [
        (
            "a conditional write",
            Write::expecting(k.clone(), Mutation::Put(b"x".to_vec()), Expect::Absent),
        ),
        (
            "a fenced write",
            Write::new(k.clone(), Mutation::Put(b"x".to_vec())).fenced(Fence {
                lock: format!("{ns}:lock"),
                token: 1,
            }),
        ),
    ];
    for (what, write) in refused {
        match engine.commit(vec![write]).await {
            Err(EngineError::Unsupported { .. }) => {}
            other => panic!("{what} must be refused as unsupported: {other:?}"),
        }
    }
    assert_eq!(
        engine.get(&k).await.unwrap(),
        None,
        "a refused write wrote nothing"
    );
}

/// For engines that replicate each key on its own (leaderless replication): a batch of
/// writes to several keys is refused with [`EngineError::Unsupported`] and writes nothing.
pub async fn multi_key_batches_are_refused_typed<E: Engine + Clone>(engine: &E, ns: &str) {
    let (a, b) = (key(ns, "a"), key(ns, "b"));
    let batch = vec![
        Write::new(a.clone(), Mutation::Put(b"x".to_vec())),
        Write::new(b.clone(), Mutation::Put(b"y".to_vec())),
    ];
    match engine.commit(batch).await {
        Err(EngineError::Unsupported { .. }) => {}
        other => panic!("a multi-key batch must be refused as unsupported: {other:?}"),
    }
    for k in [&a, &b] {
        assert_eq!(
            engine.get(k).await.unwrap(),
            None,
            "a refused batch wrote nothing"
        );
    }
}
