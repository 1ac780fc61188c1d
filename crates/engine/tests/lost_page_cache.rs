//! A machine that loses power: the disk keeps only what was synced (the page cache is gone),
//! at a seeded point of a workload of puts, deletes and counter additions. After the restart
//! every acknowledged write is there; the one write in flight at the crash is there or not,
//! whole.
//!
//! One client writes at a time, so the disk sees the same writes in the same order for a seed
//! and a failing seed replays: `AGENTSTORE_SEED=<seed> cargo nextest run -p agentstore-engine
//! --test lost_page_cache`.

use std::sync::Arc;

use agentstore_core::NodeId;
use agentstore_engine::testkit::{
    CrashModel, Expected, LossyDisk, Seeded, assert_no_failed_seed, seeds,
};
use agentstore_engine::{Engine, Key, LocalEngine, Mutation, NodeClock};

/// Operations per seed.
const OPERATIONS: u64 = 150;

async fn run(seed: u64) -> Result<(), String> {
    let mut rng = Seeded::new(seed);
    // The crash comes somewhere in the workload's disk writes (about eight per operation),
    // or, for some seeds, only after it.
    let disk = LossyDisk::new(Some(rng.below(OPERATIONS * 9)));
    let clock = NodeClock::system(NodeId::new("n1").unwrap(), 500);
    let engine = LocalEngine::open_on(&disk, Arc::clone(&clock)).map_err(|e| e.to_string())?;
    let mut model = CrashModel::default();
    for i in 0..OPERATIONS {
        let (key, mutation, after) = model.next_write(&mut rng, i, 24, 4);
        match engine.apply(key.clone(), mutation).await {
            Ok(_) => model.acknowledged(key, after),
            Err(_) if disk.crashed() => {
                model.in_doubt(key, after);
                break;
            }
            Err(err) => return Err(format!("operation {i} failed before the crash: {err}")),
        }
    }
    drop(engine);
    disk.crash_now();
    disk.restart();
    let engine = LocalEngine::open_on(&disk, clock)
        .map_err(|e| format!("the restarted engine does not open: {e}"))?;
    for key in model.keys() {
        let record = engine.get(&key).await.map_err(|e| e.to_string())?;
        model.check(&key, Expected::of(record.as_ref().map(|r| &r.value)))?;
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_acknowledged_write_is_lost_when_the_page_cache_is() {
    let mut failed = Vec::new();
    for seed in seeds(64) {
        if let Err(why) = run(seed).await {
            failed.push(format!("seed {seed}: {why}"));
        }
    }
    assert_no_failed_seed(&failed);
}

/// A crash while the data file is first created (at each of its first writes) leaves a file
/// the restarted engine opens: nothing was committed to it, so it is created again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_while_the_file_is_created_leaves_one_that_opens() {
    for crash_at in 0..24 {
        let disk = LossyDisk::new(Some(crash_at));
        let clock = NodeClock::system(NodeId::new("n1").unwrap(), 500);
        let first = LocalEngine::open_on(&disk, Arc::clone(&clock));
        let created = first.is_ok() && !disk.crashed();
        drop(first);
        disk.crash_now();
        disk.restart();
        let engine = LocalEngine::open_on(&disk, clock)
            .unwrap_or_else(|e| panic!("crash at write {crash_at}: the engine does not open: {e}"));
        let key: Key = "k:after".parse().unwrap();
        engine
            .apply(key.clone(), Mutation::Put(b"v".to_vec()))
            .await
            .unwrap_or_else(|e| panic!("crash at write {crash_at} (created: {created}): {e}"));
    }
}
