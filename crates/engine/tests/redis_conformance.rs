//! The Redis engine passes the conformance suite against a real Redis (127.0.0.1:6379, or
//! `AGENTSTORE_TEST_REDIS_URL`). Each test writes under its own key prefix.

use agentstore_core::NodeId;
use agentstore_engine::conformance::namespace;
use agentstore_engine::{NodeClock, RedisEngine, RedisOptions};

fn redis_url() -> String {
    std::env::var("AGENTSTORE_TEST_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into())
}

async fn make() -> (RedisEngine, ()) {
    let clock = NodeClock::system(NodeId::new("redis-test").unwrap(), 500);
    let options = RedisOptions {
        prefix: format!("test:{}:", namespace()),
        ..RedisOptions::new(redis_url())
    };
    (
        RedisEngine::connect(options, clock)
            .await
            .expect("Redis on 127.0.0.1:6379 (see .ci/run)"),
        (),
    )
}

agentstore_engine::conformance_tests!(make);
