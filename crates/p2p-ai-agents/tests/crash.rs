//! Crash safety on a real process: a writer is killed with SIGKILL at random moments, many
//! times; after each kill every acknowledged write is present with its exact value, and
//! nothing torn is visible.
//!
//! The writer is this same test binary, re-executed with `CRASH_WRITER_DIR` set: then the
//! `writer_process` entry point writes until it is killed, printing `ack <key>` after each
//! acknowledged write and `inc` after each acknowledged counter increment.
//!
//! Deterministic schedule: the kill delays come from a seed (printed; set CRASH_SEED to
//! replay a failing run).

use std::io::BufRead;
use std::process::{Command, Stdio};
use std::time::Duration;

use p2p_ai_agents::storage::{CollectionConfig, Config, ConflictStrategy, Storage};

const ROUNDS: u64 = 20;
const WRITER_ENV: &str = "CRASH_WRITER_DIR";

/// The value written under `key`, so a reader can check it without the writer's log.
fn value_for(key: &str) -> String {
    let len = key.bytes().map(usize::from).sum::<usize>() * 7 % 3000;
    format!("{key}|{}", "v".repeat(len))
}

fn config(dir: &str) -> Config {
    let mut config = Config {
        data_dir: Some(dir.to_owned()),
        ..Config::default()
    };
    config.collections.insert(
        "count".into(),
        CollectionConfig {
            conflict: Some(ConflictStrategy::PnCounter),
            ..Default::default()
        },
    );
    config
}

/// The writer's entry point, not a test of its own: the crash test runs it (with
/// `--ignored`) in a child process that it then kills.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "run by acknowledged_writes_survive_sigkill as its writer process"]
async fn writer_process() {
    let dir =
        std::env::var(WRITER_ENV).expect("run by the crash test, which sets CRASH_WRITER_DIR");
    let round = std::env::var("CRASH_ROUND").unwrap();
    let storage = Storage::new(config(&dir)).await.expect("open storage");
    // The test harness has printed `test writer_process ... ` without a newline; end that line
    // so every acknowledgement stands on a line of its own.
    println!();
    let mut tasks = tokio::task::JoinSet::new();
    for task in 0..8 {
        let (storage, round) = (storage.clone(), round.clone());
        tasks.spawn(async move {
            for i in 0u64.. {
                if task == 0 {
                    storage
                        .counter_add("count:total", 1)
                        .await
                        .expect("increment");
                    println!("inc");
                } else {
                    let key = format!("crash:{round}:{task}:{i}");
                    storage.set(&key, value_for(&key)).await.expect("write");
                    println!("ack {key}");
                }
            }
        });
    }
    while tasks.join_next().await.is_some() {}
}

/// xorshift64*: enough randomness for kill delays, reproducible from the seed.
fn next(state: &mut u64) -> u64 {
    *state ^= *state >> 12;
    *state ^= *state << 25;
    *state ^= *state >> 27;
    state.wrapping_mul(0x2545_F491_4F6C_DD1D)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_writes_survive_sigkill() {
    let seed: u64 = std::env::var("CRASH_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0x5eed_cafe);
    println!("crash test seed {seed} (replay with CRASH_SEED={seed})");
    let mut rng = seed.max(1);
    let dir = tempfile::tempdir().unwrap();
    let writer_exe = std::env::current_exe().unwrap();
    let mut acked_keys: Vec<String> = Vec::new();
    let mut acked_increments = 0i64;
    let mut killed_mid_write = 0;

    for round in 0..ROUNDS {
        let mut child = Command::new(&writer_exe)
            .args([
                "--exact",
                "writer_process",
                "--ignored",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(WRITER_ENV, dir.path())
            .env("CRASH_ROUND", round.to_string())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let reader = std::thread::spawn(move || {
            std::io::BufReader::new(stdout)
                .lines()
                .map_while(Result::ok)
                .collect::<Vec<_>>()
        });
        let delay = 30 + next(&mut rng) % 400;
        std::thread::sleep(Duration::from_millis(delay));
        child.kill().unwrap(); // SIGKILL
        let status = child.wait().unwrap();
        let lines = reader.join().unwrap();
        assert!(
            !status.success(),
            "round {round}: the writer must have been killed, not exited"
        );
        let mut stderr = String::new();
        std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut stderr).unwrap();
        assert!(
            !stderr.contains("panicked"),
            "round {round}: writer failed: {stderr}"
        );
        let before = acked_keys.len();
        for line in lines {
            if line == "inc" {
                acked_increments += 1;
            } else if let Some(key) = line.strip_prefix("ack ") {
                acked_keys.push(key.to_owned());
            }
        }
        if acked_keys.len() > before {
            killed_mid_write += 1;
        }
        verify(dir.path(), round, &acked_keys, acked_increments).await;
    }
    assert!(
        killed_mid_write >= ROUNDS / 2,
        "most rounds must have acknowledged writes before the kill"
    );
}

async fn verify(dir: &std::path::Path, round: u64, acked: &[String], increments: i64) {
    let storage = Storage::new(config(&dir.display().to_string()))
        .await
        .unwrap_or_else(|e| panic!("round {round}: reopen failed: {e}"));
    for key in acked {
        let value: Option<String> = storage.get(key).await.unwrap();
        assert_eq!(
            value.as_deref(),
            Some(value_for(key).as_str()),
            "round {round}: acknowledged {key}"
        );
    }
    // Unacknowledged writes may or may not be there, but whatever is there is whole.
    let mut after = None;
    loop {
        let page = storage.scan("crash", after.as_deref(), 500).await.unwrap();
        let Some(last) = page.last() else { break };
        after = Some(last.key.clone());
        for entry in &page {
            assert_eq!(
                entry.value,
                serde_json::json!(value_for(&entry.key)),
                "round {round}: torn {}",
                entry.key
            );
        }
    }
    // At most one increment was in flight when the writer died.
    let total = storage.counter("count:total").await.unwrap();
    assert!(
        (increments..=increments + 1 + i64::try_from(round).unwrap()).contains(&total),
        "round {round}: counter {total}, acknowledged increments {increments}"
    );
}
