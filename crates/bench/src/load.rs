//! Closed-loop load: `clients` tasks each issue operations back to back for a fixed time.

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::stats::Sample;

/// Runs `op(client, i)` from `clients` concurrent tasks for `duration`; every operation must
/// succeed. Returns the latencies and the wall time.
pub(crate) async fn run<F, Fut>(clients: usize, duration: Duration, op: F) -> Sample
where
    F: Fn(usize, u64) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = ()> + Send,
{
    let op = Arc::new(op);
    let start = Instant::now();
    let deadline = start + duration;
    let mut tasks = tokio::task::JoinSet::new();
    for client in 0..clients {
        let op = Arc::clone(&op);
        tasks.spawn(async move {
            let mut latencies = Vec::new();
            let mut i = 0u64;
            while Instant::now() < deadline {
                let t = Instant::now();
                op(client, i).await;
                latencies.push(t.elapsed());
                i += 1;
            }
            latencies
        });
    }
    let mut latencies = Vec::new();
    while let Some(done) = tasks.join_next().await {
        latencies.extend(done.expect("a load task panicked"));
    }
    Sample::new(latencies, start.elapsed())
}

/// A pseudo-random key index in `0..keys` for operation `i` of `client` (a fixed mix, so runs
/// are comparable).
pub(crate) fn key_index(client: usize, i: u64, keys: u64) -> u64 {
    let mut x =
        (client as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ i.wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x ^= x >> 31;
    x % keys
}

/// The key operation `i` of `client` uses: `<collection>:<index>` among `keys` keys.
pub(crate) fn key(collection: &str, client: usize, i: u64, keys: u64) -> agentstore_core::Key {
    format!("{collection}:{}", key_index(client, i, keys))
        .parse()
        .expect("a valid key")
}
