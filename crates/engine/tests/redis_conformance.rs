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

/// Redis removes an expired value by itself, and a later write without a time to live keeps
/// its value for good.
#[tokio::test]
async fn redis_drops_an_expired_value_and_a_plain_rewrite_clears_the_expiry() {
    use agentstore_engine::{Engine, Key, Mutation};
    let (engine, cleanup) = make().await;
    let now = agentstore_engine::PhysicalClock::now_ms(&agentstore_engine::SystemClock);
    let raw = |key: &str| {
        let out = std::process::Command::new("redis-cli")
            .args([
                "-u",
                &redis_url(),
                "PTTL",
                &format!("{}r:{key}", cleanup.prefix),
            ])
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout)
            .trim()
            .parse::<i64>()
            .unwrap()
    };
    let key = |k: &str| k.parse::<Key>().unwrap();
    for k in ["beat:a", "beat:b"] {
        engine
            .apply(
                key(k),
                Mutation::PutExpiring {
                    value: b"alive".to_vec(),
                    expires_at_ms: now + 300,
                },
            )
            .await
            .unwrap();
    }
    let left = raw("beat:a");
    assert!((1..=300).contains(&left), "PTTL {left}");
    engine
        .apply(key("beat:b"), Mutation::Put(b"for good".to_vec()))
        .await
        .unwrap();
    assert_eq!(raw("beat:b"), -1, "no expiry any more");
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    assert_eq!(raw("beat:a"), -2, "the key is gone from Redis");
    assert!(engine.get(&key("beat:a")).await.unwrap().is_none());
    assert!(engine.get(&key("beat:b")).await.unwrap().is_some());
}
