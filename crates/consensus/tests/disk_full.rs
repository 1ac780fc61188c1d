//! A member whose disk fills up: it stops taking part (openraft stops a member after a failed
//! write), answers its callers with a typed `DiskFull` while the others go on, and takes part
//! again by itself, caught up, once there is space, without a restart of the process.
//!
//! Needs root (it mounts a small tmpfs); skipped otherwise, unless `AGENTSTORE_REQUIRE_NETNS=1`
//! (set by `.ci/run` when it runs as root), where it fails instead.

use std::time::{Duration, Instant};

use agentstore_consensus::{GroupError, ReadLevel};
use agentstore_engine::EngineError;
use agentstore_engine::testkit::SmallDisk;

mod common;

use common::{Cluster, Settings, id, key, put, value};

/// Runs `attempt` every 100 ms until it gives `Some`, for at most `within`.
async fn eventually<T, F: std::future::Future<Output = Option<T>>>(
    within: Duration,
    what: &str,
    mut attempt: impl FnMut() -> F,
) -> T {
    let deadline = Instant::now() + within;
    loop {
        if let Some(found) = attempt().await {
            return found;
        }
        assert!(Instant::now() < deadline, "not within {within:?}: {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_out_of_disk_fails_typed_and_rejoins_once_space_returns() {
    let mount = tempfile::tempdir().unwrap();
    let Some(disk) = SmallDisk::mount(mount.path(), 8) else {
        return;
    };
    let mut settings = Settings::default();
    settings.parent_dir.insert(id("a"), mount.path().to_owned());
    let cluster = Cluster::with(&["a", "b", "c"], settings).await;
    cluster.leader().await;
    let (a, b) = (cluster.group("a"), cluster.group("b"));
    a.write(vec![put("before", "1")]).await.unwrap();
    let filler = disk.fill();

    // Big writes through b until a's files refuse one; the group goes on without a.
    let big = "x".repeat(64 * 1024);
    let mut written = Vec::new();
    let down = eventually(Duration::from_secs(60), "a's member stops", || {
        let (b, a, big) = (b.clone(), a.clone(), big.clone());
        let i = written.len();
        let name = format!("big:{i}");
        written.push(name.clone());
        async move {
            // A write that was in flight when a stopped (a led) may be indeterminate.
            let _ = b.write(vec![put(&name, &big)]).await;
            (a.status().state == "down").then(|| a.status())
        }
    })
    .await;
    let failure = down.failure.expect("a down member says why");
    assert!(failure.contains("No space left"), "{failure}");

    // Calls at a answer at once, typed; the others still write.
    match a.write(vec![put("during", "refused")]).await {
        Err(GroupError::Down(EngineError::DiskFull { .. })) => {}
        other => panic!("a write at a member out of disk: {other:?}"),
    }
    assert!(matches!(a.health(), Err(EngineError::DiskFull { .. })));
    eventually(Duration::from_secs(20), "b writes without a", || {
        let b = b.clone();
        async move { b.write(vec![put("during", "b")]).await.ok() }
    })
    .await;

    // Space again: a starts again by itself, catches up and takes writes.
    std::fs::remove_file(filler).unwrap();
    eventually(Duration::from_secs(30), "a writes again", || {
        let a = a.clone();
        async move { a.write(vec![put("after", "a")]).await.ok() }
    })
    .await;
    assert!(a.health().is_ok());
    for (name, expected) in [("before", "1"), ("during", "b"), ("after", "a")] {
        let record = a.read(&key(name), ReadLevel::Linearizable).await.unwrap();
        assert_eq!(value(&record).as_deref(), Some(expected), "{name}");
    }
    eventually(Duration::from_secs(20), "a applies what it missed", || {
        let a = a.clone();
        async move {
            let stale = a.read(&key("during"), ReadLevel::Stale).await.ok()?;
            (value(&stale).as_deref() == Some("b")).then_some(())
        }
    })
    .await;
}
