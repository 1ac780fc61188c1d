//! Backend failures: calls fail with typed errors while a server is down, succeed after it is
//! back, and no acknowledged write is lost.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use agentstore_core::NodeId;
use agentstore_core::record::Value;
use agentstore_engine::testkit::{PostgresServer, RedisServer};
use agentstore_engine::{
    Engine, EngineError, Key, Mutation, NodeClock, PostgresEngine, PostgresOptions, RedisEngine,
    RedisOptions,
};

#[derive(Default)]
struct Outcomes {
    acked: BTreeMap<Key, u64>,
    unavailable: usize,
    other_errors: Vec<String>,
}

/// Writers that run until `stop`, recording acknowledged writes and errors by kind.
fn start_writers<E: Engine + Clone>(
    engine: &E,
    stop: &Arc<AtomicBool>,
    outcomes: &Arc<Mutex<Outcomes>>,
) -> tokio::task::JoinSet<()> {
    let mut writers = tokio::task::JoinSet::new();
    for writer in 0..4u64 {
        let (engine, stop, outcomes) = (engine.clone(), Arc::clone(stop), Arc::clone(outcomes));
        writers.spawn(async move {
            let mut i = 0u64;
            while !stop.load(Ordering::Relaxed) && i < 100_000 {
                let key: Key = format!("load:{writer}:{i}").parse().unwrap();
                let result = engine
                    .apply(key.clone(), Mutation::Put(i.to_be_bytes().to_vec()))
                    .await;
                {
                    let mut outcomes = outcomes.lock().unwrap();
                    match result {
                        Ok(_) => {
                            outcomes.acked.insert(key, i);
                        }
                        Err(EngineError::Unavailable { .. }) => outcomes.unavailable += 1,
                        Err(other) => outcomes.other_errors.push(other.to_string()),
                    }
                }
                i += 1;
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        });
    }
    writers
}

async fn wait_for_acks(outcomes: &Arc<Mutex<Outcomes>>, more_than: usize) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while outcomes.lock().unwrap().acked.len() <= more_than {
        assert!(Instant::now() < deadline, "writes did not succeed again");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn verify<E: Engine>(engine: &E, outcomes: &Outcomes) {
    for (key, i) in &outcomes.acked {
        let record = engine
            .get(key)
            .await
            .unwrap()
            .unwrap_or_else(|| panic!("acknowledged {key} was lost"));
        assert_eq!(
            record.value,
            Value::Register(Some(i.to_be_bytes().to_vec())),
            "{key}"
        );
    }
}

/// The whole scenario: writers run, `down` takes the server away for a while (calls must fail
/// with typed unavailability), `up` brings it back (calls must succeed again), and every
/// acknowledged write must then be readable with its value.
async fn survive_an_outage<E: Engine + Clone>(engine: E, down: impl FnOnce(), up: impl FnOnce()) {
    let (stop, outcomes) = (
        Arc::new(AtomicBool::new(false)),
        Arc::new(Mutex::new(Outcomes::default())),
    );
    let mut writers = start_writers(&engine, &stop, &outcomes);
    wait_for_acks(&outcomes, 50).await;
    down();
    tokio::time::sleep(Duration::from_millis(400)).await;
    let before_restart = outcomes.lock().unwrap().acked.len();
    assert!(
        outcomes.lock().unwrap().unavailable > 0,
        "calls fail while the server is down"
    );
    up();
    wait_for_acks(&outcomes, before_restart + 50).await;
    stop.store(true, Ordering::Relaxed);
    while let Some(done) = writers.join_next().await {
        done.unwrap();
    }
    let outcomes = std::mem::take(&mut *outcomes.lock().unwrap());
    assert!(
        outcomes.other_errors.is_empty(),
        "only typed unavailability: {:?}",
        outcomes.other_errors
    );
    verify(&engine, &outcomes).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_killed_and_restarted_under_load_loses_no_acknowledged_write() {
    let dir = tempfile::tempdir().unwrap();
    let aof = ["--appendonly", "yes", "--appendfsync", "always", "--dir"].map(String::from);
    let server =
        RedisServer::start(&[aof.as_slice(), &[dir.path().display().to_string()]].concat());
    let clock = NodeClock::system(NodeId::new("fault-test").unwrap(), 500);
    let engine = RedisEngine::connect(RedisOptions::new(server.url()), clock)
        .await
        .unwrap();
    let server = Mutex::new(server);
    survive_an_outage(
        engine,
        || server.lock().unwrap().stop(),
        || server.lock().unwrap().restart(),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_postgres_restart_fails_calls_with_a_typed_error_and_the_pool_recovers() {
    let server = PostgresServer::start();
    let clock = NodeClock::system(NodeId::new("fault-test").unwrap(), 500);
    let options = PostgresOptions {
        pool_size: 4,
        ..PostgresOptions::new(server.url())
    };
    let engine = PostgresEngine::connect(options, clock).await.unwrap();
    survive_an_outage(engine, || server.stop(), || server.start_again()).await;
}
