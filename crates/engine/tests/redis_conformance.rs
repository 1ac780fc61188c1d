//! The Redis engine passes the conformance suite against a real Redis (127.0.0.1:6379, or
//! `AGENTSTORE_TEST_REDIS_URL`). Each test writes under its own key prefix.

use agentstore_core::NodeId;
use agentstore_engine::conformance::namespace;
use agentstore_engine::testkit::redis_url;
use agentstore_engine::{NodeClock, RedisEngine, RedisOptions};

/// Deletes a test's keys from the shared Redis when the test ends.
struct Cleanup {
    prefix: String,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        // Server-side, so binary keys are deleted too (they do not survive a text round trip).
        let script = "for _, k in ipairs(redis.call('KEYS', ARGV[1])) do redis.call('DEL', k) end";
        let pattern = format!("{}*", self.prefix);
        let _ = std::process::Command::new("redis-cli")
            .args(["-u", &redis_url(), "EVAL", script, "0", &pattern])
            .output();
    }
}

async fn make() -> (RedisEngine, Cleanup) {
    let clock = NodeClock::system(NodeId::new("redis-test").unwrap(), 500);
    let prefix = format!("test:{}:", namespace());
    let options = RedisOptions {
        prefix: prefix.clone(),
        ..RedisOptions::new(redis_url())
    };
    let engine = RedisEngine::connect(options, clock)
        .await
        .expect("Redis on 127.0.0.1:6379 (see .ci/run)");
    (engine, Cleanup { prefix })
}

agentstore_engine::conformance_tests!(make);
