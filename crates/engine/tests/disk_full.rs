//! A full disk: writes fail with a typed error and change nothing, and once there is space
//! again the engine writes without being reopened by anyone.
//!
//! Needs root (it mounts a small tmpfs); skipped otherwise, unless `AGENTSTORE_REQUIRE_NETNS=1`
//! (set by `.ci/run` when it runs as root), where it fails instead.

use std::path::Path;
use std::process::Command;
use std::sync::Arc;

use agentstore_core::NodeId;
use agentstore_core::record::Value;
use agentstore_engine::{Engine, EngineError, Key, LocalEngine, Mutation, NodeClock};

/// A 4 MiB tmpfs at `dir`, unmounted when dropped.
struct SmallDisk<'a>(&'a Path);

impl<'a> SmallDisk<'a> {
    fn mount(dir: &'a Path) -> Option<Self> {
        let mounted = Command::new("mount")
            .args(["-t", "tmpfs", "-o", "size=4m", "tmpfs"])
            .arg(dir)
            .status()
            .is_ok_and(|s| s.success());
        mounted.then_some(Self(dir))
    }
}

impl Drop for SmallDisk<'_> {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(self.0).status();
    }
}

/// Fills the disk under `dir` with one file; returns its path.
fn fill(dir: &Path) -> std::path::PathBuf {
    use std::io::Write as _;
    let path = dir.join("filler");
    let mut file = std::fs::File::create(&path).unwrap();
    let chunk = vec![7u8; 64 * 1024];
    while file.write_all(&chunk).is_ok() {}
    for _ in 0..64 {
        if file.write_all(&[7u8; 512]).is_err() {
            break;
        }
    }
    let _ = file.sync_all();
    path
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_fails_writes_typed_and_the_engine_recovers_when_space_returns() {
    let mount = tempfile::tempdir().unwrap();
    let Some(_disk) = SmallDisk::mount(mount.path()) else {
        assert!(
            std::env::var_os("AGENTSTORE_REQUIRE_NETNS").is_none(),
            "this test must run here: mounting a tmpfs failed"
        );
        eprintln!("skipped: mounting a tmpfs needs root");
        return;
    };
    let clock = NodeClock::system(NodeId::new("n1").unwrap(), 500);
    let engine = LocalEngine::open(&mount.path().join("data"), Arc::clone(&clock)).unwrap();
    let key = |i: usize| Key::new(format!("k:{i}")).unwrap();
    engine
        .apply(key(0), Mutation::Put(b"before".to_vec()))
        .await
        .unwrap();
    let filler = fill(mount.path());

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
