//! Redlock on three real, independent Redis masters started by the test.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use agentstore_core::NodeId;
use agentstore_engine::testkit::RedisServer;
use agentstore_engine::{Engine, EngineError, LocalEngine, Mutation, NodeClock, Redlock, Write};

fn masters(n: usize) -> (Vec<RedisServer>, Redlock) {
    let servers: Vec<RedisServer> = (0..n).map(|_| RedisServer::start(&[])).collect();
    let urls: Vec<String> = servers.iter().map(RedisServer::url).collect();
    (servers, Redlock::new(&urls).unwrap())
}

/// Hold intervals as each holder saw them: from the grant to the release (or the end of the
/// grant's validity, whichever is first), with the grant's token.
type Log = Arc<Mutex<Vec<(Instant, Instant, u64)>>>;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn contenders_never_hold_the_lock_at_overlapping_times_and_tokens_increase() {
    let (_servers, redlock) = masters(3);
    let log: Log = Arc::default();
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..4 {
        let (redlock, log) = (redlock.clone(), Arc::clone(&log));
        tasks.spawn(async move {
            for _ in 0..8 {
                let grant = redlock
                    .acquire_with_retry("job", Duration::from_millis(500), 500)
                    .await
                    .unwrap();
                let start = Instant::now();
                tokio::time::sleep(Duration::from_millis(3)).await;
                let end = Instant::now().min(grant.valid_until());
                log.lock().unwrap().push((start, end, grant.token));
                redlock.release(grant).await;
            }
        });
    }
    while let Some(done) = tasks.join_next().await {
        done.unwrap();
    }
    let mut intervals = log.lock().unwrap().clone();
    assert_eq!(intervals.len(), 32);
    intervals.sort_by_key(|(start, _, _)| *start);
    for pair in intervals.windows(2) {
        let ((_, end, token), (next_start, _, next_token)) = (pair[0], pair[1]);
        assert!(next_start >= end, "two holders at once");
        assert!(
            next_token > token,
            "fencing tokens must increase: {token} then {next_token}"
        );
    }
}

#[tokio::test]
async fn one_master_down_is_tolerated_a_majority_down_is_refused() {
    let (mut servers, redlock) = masters(3);
    servers[0].stop();
    let grant = redlock
        .acquire("report", Duration::from_millis(1000))
        .await
        .expect("2 of 3 masters grant it");
    redlock.release(grant).await;
    servers[1].stop();
    match redlock.acquire("report", Duration::from_millis(1000)).await {
        Err(EngineError::LockNotAcquired {
            granted, needed, ..
        }) => assert_eq!((granted, needed), (1, 2)),
        other => panic!("a majority is down, the lock must be refused: {other:?}"),
    }
}

#[tokio::test]
async fn only_the_holder_can_release_or_extend() {
    let (_servers, redlock) = masters(3);
    let mut first = redlock
        .acquire("cron", Duration::from_millis(300))
        .await
        .unwrap();
    assert!(
        redlock
            .acquire("cron", Duration::from_millis(300))
            .await
            .is_err(),
        "held"
    );
    redlock
        .extend(&mut first, Duration::from_millis(300))
        .await
        .unwrap();
    // Let it expire on every master, with room for a slow machine: the extension may have
    // reached the last master well after it was sent.
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let second = redlock
        .acquire("cron", Duration::from_millis(5000))
        .await
        .unwrap();
    assert!(second.token > first.token);
    assert!(
        redlock
            .extend(&mut first, Duration::from_millis(300))
            .await
            .is_err(),
        "an expired holder cannot extend"
    );
    redlock.release(first).await; // must not release the second holder's lock
    assert!(
        redlock
            .acquire("cron", Duration::from_millis(300))
            .await
            .is_err(),
        "still held by the second"
    );
}

#[tokio::test]
async fn a_paused_former_holder_is_fenced_off_by_the_engine() {
    let (_servers, redlock) = masters(3);
    let dir = tempfile::tempdir().unwrap();
    let engine = LocalEngine::open(
        dir.path(),
        NodeClock::system(NodeId::new("n1").unwrap(), 500),
    )
    .unwrap();
    let key = "ledger:balance".parse::<agentstore_engine::Key>().unwrap();
    let stale = redlock
        .acquire("ledger", Duration::from_millis(100))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(150)).await; // the holder "pauses" past its validity
    let current = redlock
        .acquire("ledger", Duration::from_millis(5000))
        .await
        .unwrap();
    let write = |grant: &agentstore_engine::LockGrant, v: &[u8]| {
        vec![Write::new(key.clone(), Mutation::Put(v.to_vec())).fenced(grant.fence())]
    };
    engine.commit(write(&current, b"new holder")).await.unwrap();
    let late = engine.commit(write(&stale, b"late write")).await;
    assert!(matches!(late, Err(EngineError::Fenced { .. })), "{late:?}");
}
