//! What only the local engine has: a data directory that one process owns, survives reopen,
//! and reports damage at open instead of panicking.

use std::io::{Seek, SeekFrom, Write as _};
use std::sync::Arc;

use agentstore_core::NodeId;
use agentstore_core::record::Value;
use agentstore_engine::{DATA_FILE, Engine, EngineError, Key, LocalEngine, Mutation, NodeClock};

fn clock() -> Arc<NodeClock> {
    NodeClock::system(NodeId::new("n1").unwrap(), 500)
}

fn key(s: &str) -> Key {
    s.parse().unwrap()
}

#[tokio::test]
async fn acknowledged_writes_are_there_after_reopen() {
    let dir = tempfile::tempdir().unwrap();
    {
        let engine = LocalEngine::open(dir.path(), clock()).unwrap();
        for i in 0..100u32 {
            engine
                .apply(
                    key(&format!("k:{i}")),
                    Mutation::Put(i.to_be_bytes().to_vec()),
                )
                .await
                .unwrap();
        }
        engine
            .apply(key("c:hits"), Mutation::PnCounterAdd(42))
            .await
            .unwrap();
    }
    let engine = LocalEngine::open(dir.path(), clock()).unwrap();
    for i in 0..100u32 {
        let record = engine.get(&key(&format!("k:{i}"))).await.unwrap().unwrap();
        assert_eq!(
            record.value,
            Value::Register(Some(i.to_be_bytes().to_vec()))
        );
    }
    let record = engine.get(&key("c:hits")).await.unwrap().unwrap();
    assert!(matches!(record.value, Value::PnCounter(ref c) if c.value() == 42));
}

#[tokio::test]
async fn writes_after_reopen_supersede_older_ones_even_if_the_clock_went_back() {
    let dir = tempfile::tempdir().unwrap();
    #[derive(Debug)]
    struct Frozen(u64);
    impl agentstore_engine::PhysicalClock for Frozen {
        fn now_ms(&self) -> u64 {
            self.0
        }
    }
    let future =
        NodeClock::with_physical(NodeId::new("n1").unwrap(), 500, Arc::new(Frozen(9_000_000)));
    let past = NodeClock::with_physical(NodeId::new("n1").unwrap(), 500, Arc::new(Frozen(1_000)));
    let first = {
        let engine = LocalEngine::open(dir.path(), future).unwrap();
        engine
            .apply(key("k:x"), Mutation::Put(b"old".to_vec()))
            .await
            .unwrap()
    };
    let engine = LocalEngine::open(dir.path(), past).unwrap();
    let second = engine
        .apply(key("k:x"), Mutation::Put(b"new".to_vec()))
        .await
        .unwrap();
    assert!(second.stamp > first.stamp);
    let stored = engine.get(&key("k:x")).await.unwrap().unwrap();
    assert_eq!(stored.value, Value::Register(Some(b"new".to_vec())));
}

#[test]
fn a_second_opener_gets_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let _first = LocalEngine::open(dir.path(), clock()).unwrap();
    match LocalEngine::open(dir.path(), clock()) {
        Err(EngineError::Locked { path }) => assert_eq!(path, dir.path().join(DATA_FILE)),
        other => panic!("expected Locked, got {other:?}"),
    }
}

#[test]
fn the_directory_is_released_when_the_engine_is_dropped() {
    let dir = tempfile::tempdir().unwrap();
    drop(LocalEngine::open(dir.path(), clock()).unwrap());
    LocalEngine::open(dir.path(), clock()).unwrap();
}

#[test]
fn a_file_that_is_not_a_database_is_reported_at_open() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join(DATA_FILE),
        b"these are not the bytes you are looking for",
    )
    .unwrap();
    match LocalEngine::open(dir.path(), clock()) {
        Err(EngineError::Corrupted { .. }) => {}
        other => panic!("expected Corrupted, got {other:?}"),
    }
}

#[tokio::test]
async fn a_damaged_header_is_reported_at_open_not_a_panic() {
    let dir = tempfile::tempdir().unwrap();
    {
        let engine = LocalEngine::open(dir.path(), clock()).unwrap();
        engine
            .apply(key("k:1"), Mutation::Put(vec![1; 100]))
            .await
            .unwrap();
    }
    let path = dir.path().join(DATA_FILE);
    let mut file = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
    file.seek(SeekFrom::Start(9)).unwrap();
    file.write_all(&[0xAB; 64]).unwrap();
    drop(file);
    let result = std::panic::catch_unwind(|| LocalEngine::open(dir.path(), clock()));
    match result {
        Ok(Err(
            EngineError::Corrupted { .. }
            | EngineError::Storage { .. }
            | EngineError::UnsupportedFormat { .. },
        )) => {}
        Ok(other) => panic!("a damaged header must be an error at open, got {other:?}"),
        Err(_) => panic!("opening a damaged file panicked"),
    }
}

#[test]
fn a_missing_directory_is_created_and_an_unusable_one_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let nested = dir.path().join("a/b/c");
    LocalEngine::open(&nested, clock()).unwrap();
    let file = dir.path().join("plain-file");
    std::fs::write(&file, b"x").unwrap();
    assert!(matches!(
        LocalEngine::open(&file, clock()),
        Err(EngineError::Storage { .. })
    ));
}

#[tokio::test]
async fn hints_are_durable_per_node_and_in_order() {
    let dir = tempfile::tempdir().unwrap();
    let (b, c) = (
        NodeId::new("node-b").unwrap(),
        NodeId::new("node-c").unwrap(),
    );
    let stored = {
        let engine = LocalEngine::open(dir.path(), clock()).unwrap();
        let first = engine
            .apply(key("k:1"), Mutation::Put(b"one".to_vec()))
            .await
            .unwrap();
        let second = engine
            .apply(key("k:2"), Mutation::Put(b"two".to_vec()))
            .await
            .unwrap();
        let id1 = engine.store_hint(&b, &key("k:1"), &first).unwrap();
        let id2 = engine.store_hint(&c, &key("k:1"), &first).unwrap();
        let id3 = engine.store_hint(&b, &key("k:2"), &second).unwrap();
        assert!(id1 < id2 && id2 < id3);
        (first, second, id1, id3)
    };
    let engine = LocalEngine::open(dir.path(), clock()).unwrap();
    let for_b = engine.hints_for(&b, 10).unwrap();
    assert_eq!(
        for_b
            .iter()
            .map(|h| (h.key.clone(), h.record.clone()))
            .collect::<Vec<_>>(),
        [
            (key("k:1"), stored.0.clone()),
            (key("k:2"), stored.1.clone()),
        ]
    );
    assert_eq!(engine.hints_for(&c, 10).unwrap().len(), 1);
    engine.remove_hint(&b, stored.2).unwrap();
    assert_eq!(
        engine
            .hints_for(&b, 10)
            .unwrap()
            .iter()
            .map(|h| h.id)
            .collect::<Vec<_>>(),
        [stored.3]
    );
    let id = engine.store_hint(&b, &key("k:1"), &stored.0).unwrap();
    assert!(id > stored.3, "ids stay unique across reopen");
    assert!(
        engine
            .hints_for(&NodeId::new("node-d").unwrap(), 10)
            .unwrap()
            .is_empty()
    );
}

fn digest(key: &Key, record: &agentstore_engine::Record) -> u64 {
    agentstore_core::merkle::entry_digest(key.as_bytes(), &agentstore_core::codec::encode(record))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_commit_is_reported_in_order_with_the_digests_before_and_after() {
    let dir = tempfile::tempdir().unwrap();
    let engine = LocalEngine::open(dir.path(), clock()).unwrap();
    let mut commits = engine.commits();
    let k = key("k:1");
    let first = engine
        .apply(k.clone(), Mutation::Put(b"1".to_vec()))
        .await
        .unwrap();
    let second = engine
        .apply(k.clone(), Mutation::Put(b"2".to_vec()))
        .await
        .unwrap();
    let one = commits.recv().await.unwrap();
    let two = commits.recv().await.unwrap();
    assert_eq!((one.seq, two.seq), (1, 2));
    let change = |c: &agentstore_engine::Committed| {
        let changes = c.changes.as_ref().expect("described");
        assert_eq!(changes.len(), 1);
        (changes[0].before, changes[0].after)
    };
    assert_eq!(change(&one), (None, Some(digest(&k, &first))));
    assert_eq!(
        change(&two),
        (Some(digest(&k, &first)), Some(digest(&k, &second)))
    );
    // A snapshot says which commits it holds.
    let (seq, records) = engine.snapshot(|_| true).unwrap();
    assert_eq!(seq, 2);
    assert_eq!(records, vec![(k.clone(), second.clone())]);
    let (_, none) = engine.snapshot(|key| key != k.as_bytes()).unwrap();
    assert!(none.is_empty(), "the filter applies");
    // A purge is a commit too.
    assert!(engine.purge_if_unchanged(&k, &second).unwrap());
    let three = commits.recv().await.unwrap();
    assert_eq!(three.seq, 3);
    assert_eq!(change(&three), (Some(digest(&k, &second)), None));
    // A refused purge (the record changed) commits nothing.
    assert!(!engine.purge_if_unchanged(&k, &second).unwrap());
    assert!(commits.try_recv().is_err());
}

#[tokio::test]
async fn a_purge_removes_expired_values_only_and_a_weak_handle_does_not_keep_the_file_open() {
    let dir = tempfile::tempdir().unwrap();
    let engine = LocalEngine::open(dir.path(), clock()).unwrap();
    let expiring = |at: u64| Mutation::PutExpiring {
        value: b"beat".to_vec(),
        expires_at_ms: at,
    };
    engine.apply(key("p:old"), expiring(1_000)).await.unwrap();
    engine.apply(key("p:later"), expiring(5_000)).await.unwrap();
    engine
        .apply(key("p:kept"), Mutation::Put(b"v".to_vec()))
        .await
        .unwrap();
    engine.apply(key("p:gone"), Mutation::Delete).await.unwrap();

    assert_eq!(engine.purge_expired(2_000).await.unwrap(), 1);
    assert!(engine.get(&key("p:old")).await.unwrap().is_none());
    for live in ["p:later", "p:kept", "p:gone"] {
        assert!(engine.get(&key(live)).await.unwrap().is_some(), "{live}");
    }
    assert_eq!(engine.purge_expired(2_000).await.unwrap(), 0);

    let weak = engine.downgrade();
    assert!(weak.upgrade().is_some());
    drop(engine);
    assert!(weak.upgrade().is_none());
    // The file is free again: the weak handle held nothing.
    let engine = LocalEngine::open(dir.path(), clock()).unwrap();
    assert!(
        engine.get(&key("p:old")).await.unwrap().is_none(),
        "purged for good"
    );
}
