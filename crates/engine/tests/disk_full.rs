//! A full disk: writes fail with a typed error and change nothing, and once there is space
//! again the engine writes without being reopened by anyone.
//!
//! Needs root (it mounts a small tmpfs); skipped otherwise, unless `AGENTSTORE_REQUIRE_NETNS=1`
//! (set by `.ci/run` when it runs as root), where it fails instead.

use std::sync::Arc;

use agentstore_core::NodeId;
use agentstore_core::record::Value;
use agentstore_engine::testkit::SmallDisk;
use agentstore_engine::{Engine, EngineError, Key, LocalEngine, Mutation, NodeClock};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_fails_writes_typed_and_the_engine_recovers_when_space_returns() {
    let mount = tempfile::tempdir().unwrap();
    let Some(disk) = SmallDisk::mount(mount.path(), 4) else {
        return;
    };
    let clock = NodeClock::system(NodeId::new("n1").unwrap(), 500);
    let engine = LocalEngine::open(&mount.path().join("data"), Arc::clone(&clock)).unwrap();
    let key = |i: usize| Key::new(format!("k:{i}")).unwrap();
    engine
        .apply(key(0), Mutation::Put(b"before".to_vec()))
        .await
        .unwrap();
    let filler = disk.fill();

    // Writes of 64 KiB values until the disk refuses one: a typed error, reported by health.
    let big = vec![1u8; 64 * 1024];
    let mut refused = None;
    for i in 1..200 {
        if let Err(err) = engine.apply(key(i), Mutation::Put(big.clone())).await {
            refused = Some((i, err));
            break;
        }
    }
    let (at, err) = refused.expect("a full disk refused a write");
    assert!(matches!(err, EngineError::DiskFull { .. }), "{err:?}");
    assert!(engine.health().is_err());
    assert_eq!(
        engine.get(&key(at)).await.ok().flatten(),
        None,
        "the refused write is not there"
    );

    // Space again: the same engine writes, and what it held before is intact.
    std::fs::remove_file(filler).unwrap();
    engine
        .apply(key(at), Mutation::Put(b"after".to_vec()))
        .await
        .expect("a write once there is space again");
    assert!(engine.health().is_ok());
    for (i, expected) in [(0, &b"before"[..]), (at, &b"after"[..])] {
        let record = engine.get(&key(i)).await.unwrap().unwrap();
        assert_eq!(record.value, Value::Register(Some(expected.to_vec())));
    }
}
