//! A one-member Raft group on a machine that loses power: its disk keeps only what each file
//! synced (the page cache is gone), at a seeded point of a workload of puts, deletes and
//! counter additions. The log is synced before a write is acknowledged; the state machine is
//! not (a restarted member applies the log again). After the restart every acknowledged write
//! is read back; the one in flight at the crash is there whole or not at all.
//!
//! Replay a seed with `AGENTSTORE_SEED=<seed> cargo nextest run -p agentstore-consensus --test
//! lost_page_cache`.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use agentstore_consensus::{Group, GroupConfig, ReadLevel};
use agentstore_engine::Write;
use agentstore_engine::testkit::{
    CrashModel, Expected, LossyDisk, Seeded, assert_no_failed_seed, seeds,
};

mod common;

use common::{MemRpc, Switchboard, id};

/// Seeds per run (and `AGENTSTORE_SEED` runs one).
const SEEDS: u64 = 24;
/// Writes per seed.
const OPERATIONS: u64 = 60;

/// Starts the one member on `disk`; waits until it leads (`None` if it does not within 10 s,
/// as when the disk crashed under it).
async fn start(dir: &std::path::Path, disk: &LossyDisk) -> Option<Group> {
    let member = id("a");
    let voters = BTreeMap::from([(member.clone(), "mem:a".to_owned())]);
    let mut config = GroupConfig::new(member.clone(), "mem:a".into(), dir.to_owned(), voters);
    config.files = disk.opener();
    config.heartbeat = Duration::from_millis(20);
    config.election_timeout = Duration::from_millis(100);
    config.request_timeout = Duration::from_secs(1);
    config.snapshot_every = 16;
    config.kept_behind_snapshot = 4;
    let board = Arc::new(Switchboard::default());
    let rpc = Arc::new(MemRpc {
        from: member.clone(),
        board: Arc::clone(&board),
    });
    let group = Group::start(config, rpc).await.ok()?;
    board.members.lock().unwrap().insert(member, group.clone());
    let deadline = Instant::now() + Duration::from_secs(10);
    while group.status().state != "leader" {
        if Instant::now() > deadline {
            group.shutdown().await;
            return None;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    Some(group)
}

async fn stop(group: Group) {
    group.shutdown().await;
    drop(group);
    // Tasks that held the member's files let go of them.
    tokio::time::sleep(Duration::from_millis(100)).await;
}

async fn run(seed: u64) -> Result<(), String> {
    let mut rng = Seeded::new(seed);
    let disk = LossyDisk::new(Some(rng.below(OPERATIONS * 12)));
    let dir = tempfile::tempdir().unwrap();
    let mut model = CrashModel::default();
    if let Some(group) = start(dir.path(), &disk).await {
        for i in 0..OPERATIONS {
            let (key, mutation, after) = model.next_write(&mut rng, i, 12, 3);
            match group.write(vec![Write::new(key.clone(), mutation)]).await {
                Ok(_) => model.acknowledged(key, after),
                Err(_) if disk.crashed() => {
                    model.in_doubt(key, after);
                    break;
                }
                Err(err) => return Err(format!("write {i} failed before the crash: {err}")),
            }
        }
        disk.crash_now();
        stop(group).await;
    }
    disk.restart();
    let group = start(dir.path(), &disk)
        .await
        .ok_or("the member does not lead again after the restart")?;
    let mut checked = Ok(());
    for key in model.keys() {
        checked = match group.read(&key, ReadLevel::Linearizable).await {
            Ok(record) => model.check(&key, Expected::of(record.as_ref().map(|r| &r.value))),
            Err(err) => Err(format!("{key}: {err}")),
        };
        if checked.is_err() {
            break;
        }
    }
    stop(group).await;
    checked
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_acknowledged_strong_write_is_lost_when_the_page_cache_is() {
    let mut failed = Vec::new();
    for seed in seeds(SEEDS) {
        if let Err(why) = run(seed).await {
            failed.push(format!("seed {seed}: {why}"));
        }
    }
    assert_no_failed_seed(&failed);
}
