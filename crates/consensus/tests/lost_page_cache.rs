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
use agentstore_core::Key;
use agentstore_core::record::{Mutation, Value};
use agentstore_engine::Write;
use agentstore_engine::testkit::{LossyDisk, Seeded};

mod common;

use common::{MemRpc, Switchboard, id};

/// Seeds per run (and `AGENTSTORE_SEED` runs one).
const SEEDS: u64 = 24;
/// Writes per seed.
const OPERATIONS: u64 = 60;

#[derive(Debug, Clone, PartialEq, Eq)]
enum Expected {
    Value(Option<Vec<u8>>),
    Counter(i64),
}

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
    let mut acked: BTreeMap<Key, Expected> = BTreeMap::new();
    let mut in_doubt: Option<(Key, Expected)> = None;
    if let Some(group) = start(dir.path(), &disk).await {
        for i in 0..OPERATIONS {
            let key: Key = format!("k:{}", rng.below(12)).parse().unwrap();
            let counter: Key = format!("c:{}", rng.below(3)).parse().unwrap();
            let (key, mutation, after) = match rng.below(10) {
                0..=5 => {
                    let value = format!("{i}").into_bytes();
                    (
                        key,
                        Mutation::Put(value.clone()),
                        Expected::Value(Some(value)),
                    )
                }
                6 => (key, Mutation::Delete, Expected::Value(None)),
                _ => {
                    let delta = rng.below(9) as i64 - 4;
                    let before = match acked.get(&counter) {
                        Some(Expected::Counter(total)) => *total,
                        _ => 0,
                    };
                    let after = Expected::Counter(before + delta);
                    (counter, Mutation::PnCounterAdd(delta), after)
                }
            };
            match group.write(vec![Write::new(key.clone(), mutation)]).await {
                Ok(_) => {
                    acked.insert(key, after);
                }
                Err(_) if disk.crashed() => {
                    in_doubt = Some((key, after));
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
    let keys: Vec<Key> = acked
        .keys()
        .chain(in_doubt.iter().map(|(key, _)| key))
        .cloned()
        .collect();
    let mut failure = None;
    for key in keys {
        let found = match group.read(&key, ReadLevel::Linearizable).await {
            Ok(record) => match record.map(|r| r.value) {
                None | Some(Value::Register(None)) => None,
                Some(Value::Register(bytes)) => Some(Expected::Value(bytes)),
                Some(Value::PnCounter(counter)) => Some(Expected::Counter(counter.value())),
                Some(other) => Some(Expected::Value(Some(format!("{other:?}").into_bytes()))),
            },
            Err(err) => {
                failure = Some(format!("{key}: {err}"));
                break;
            }
        };
        let normal = |expected: Option<Expected>| match expected {
            Some(Expected::Value(None)) => None,
            other => other,
        };
        let acknowledged = normal(acked.get(&key).cloned());
        let doubtful = in_doubt
            .as_ref()
            .filter(|(k, _)| *k == key)
            .map(|(_, after)| normal(Some(after.clone())));
        if found != acknowledged && doubtful.as_ref() != Some(&found) {
            failure = Some(format!(
                "{key}: acknowledged {acknowledged:?} (in doubt: {doubtful:?}), found {found:?}"
            ));
            break;
        }
    }
    stop(group).await;
    failure.map_or(Ok(()), Err)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_acknowledged_strong_write_is_lost_when_the_page_cache_is() {
    let seeds: Vec<u64> = match std::env::var("AGENTSTORE_SEED") {
        Ok(seed) => vec![seed.parse().expect("AGENTSTORE_SEED is a number")],
        Err(_) => (0..SEEDS).collect(),
    };
    let mut failed = Vec::new();
    for seed in seeds {
        if let Err(why) = run(seed).await {
            failed.push(format!("seed {seed}: {why}"));
        }
    }
    assert!(
        failed.is_empty(),
        "replay one with AGENTSTORE_SEED=<seed>:\n{}",
        failed.join("\n")
    );
}
