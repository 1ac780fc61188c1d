//! Seeded fault runs of a five-member Raft group in one process, every answer recorded and the
//! history checked for linearizability, key by key.
//!
//! Clients write unique values, read, compare-and-set and count through random members while
//! a nemesis crashes and restarts the leader, isolates it, cuts the group into a majorities
//! ring (everyone sees a majority, no two the same one), a bridge (two sides joined by one
//! member) or a 3/2 split, and pauses members longer than the election timeout (their
//! messages are delivered late). Every member's clock is skewed by up to ±2 s. An answer
//! lost to a fault is recorded as indeterminate; a refusal that applied nothing leaves the
//! history. After the faults, every member reads every key (no acknowledged write lost).
//!
//! Clients also edit one `ot_text` document: each reads it and inserts a marker of its own
//! between two markers, against the revision it read, so most edits are transformed past
//! others. After the faults every member reads the same document, holding every
//! acknowledged marker once, no refused one, and exactly as many markers as edits applied
//! (a proposal forwarded or retried through a fault applies once).
//!
//! The seed fixes the skews, each client's operations and the nemesis's schedule; thread
//! timing is not replayed, so a seed reproduces the same load and faults. Run other seeds
//! with `RAFT_SEEDS=7,8 cargo nextest run -p agentstore-consensus --test linearizable`.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use agentstore_check::check_per_key;
use agentstore_check::models::{
    Counter, CounterAnswer, CounterOp, Register, RegisterAnswer, RegisterOp,
};
use agentstore_check::{Checked, Recorder};
use agentstore_consensus::{GroupError, MemberId, ReadLevel};
use agentstore_core::ot::TextOp;
use agentstore_core::record::{Expect, Mutation, Value};
use agentstore_core::version::VersionVector;
use agentstore_engine::{EngineError, Write};
use agentstore_sim::Rng;
use common::{Cluster, Settings, Switchboard, id, key, put, value};

const NAMES: [&str; 5] = ["a", "b", "c", "d", "e"];
const REGISTERS: [&str; 2] = ["reg:x", "reg:y"];
const COUNTER: &str = "count:n";
const CLIENTS: usize = 5;
const ROUNDS: usize = 5;

type Registers = Recorder<String, RegisterOp<String>, RegisterAnswer<String>>;
type Counts = Recorder<String, CounterOp, CounterAnswer>;

#[derive(Default)]
struct Histories {
    registers: Registers,
    counter: Counts,
    document: std::sync::Mutex<Markers>,
}

/// The document's markers by what the group answered their edit.
#[derive(Default)]
struct Markers {
    acknowledged: Vec<String>,
    refused: Vec<String>,
}

const DOCUMENT: &str = "doc:shared";

/// The document's (revision, text) in `record`.
fn document(record: &Option<agentstore_core::Record>) -> (u64, String) {
    match record.as_ref().map(|r| &r.value) {
        Some(Value::Document(document)) => (document.revision, document.text.clone()),
        None => (0, String::new()),
        other => panic!("not a document: {other:?}"),
    }
}

/// What the group answered a write, for the history.
enum Answer {
    Applied,
    ConditionFailed,
    Refused,
    Unknown,
}

fn answer<T>(result: &Result<T, GroupError>) -> Answer {
    match result {
        Ok(_) => Answer::Applied,
        Err(GroupError::Refused(EngineError::ExpectationFailed { .. })) => Answer::ConditionFailed,
        Err(GroupError::NoLeader { .. }) => Answer::Refused,
        Err(_) => Answer::Unknown,
    }
}

fn total(record: &Option<agentstore_core::Record>) -> i64 {
    match record.as_ref().map(|r| &r.value) {
        Some(Value::PnCounter(counter)) => counter.value(),
        None => 0,
        other => panic!("not a counter: {other:?}"),
    }
}

/// One client: one operation at a time through a random member, until told to stop.
async fn client(
    n: usize,
    seed: u64,
    board: Arc<Switchboard>,
    histories: Arc<Histories>,
    stop: Arc<AtomicBool>,
) -> usize {
    let mut rng = Rng::new(seed.wrapping_mul(1000).wrapping_add(n as u64));
    // The last value and version this client read of each register, for compare-and-set.
    let mut seen: [Option<(Option<String>, VersionVector)>; 2] = [None, None];
    let mut acknowledged = 0;
    let mut written = 0;
    while !stop.load(Ordering::Relaxed) {
        tokio::time::sleep(Duration::from_millis(5 + rng.below(15))).await;
        let member = id(NAMES[rng.below(5) as usize]);
        let Some(group) = board.group(&member) else {
            continue;
        };
        // A request to a paused member waits in its socket.
        board.until_running(&member, &member).await;
        if rng.below(8) == 0 {
            // An edit of the document against the revision read: a marker between markers.
            let Ok(record) = group.read(&key(DOCUMENT), ReadLevel::Linearizable).await else {
                continue;
            };
            let (revision, text) = document(&record);
            let boundaries: Vec<usize> = std::iter::once(0)
                .chain(text.match_indices('>').map(|(at, _)| at + 1))
                .collect();
            let at = boundaries[rng.below(boundaries.len() as u64) as usize];
            written += 1;
            let marker = format!("<c{n}-{written}>");
            let op = TextOp::new()
                .retain(text[..at].chars().count() as u64)
                .insert(&marker)
                .retain(text[at..].chars().count() as u64);
            let edit = Write::new(key(DOCUMENT), Mutation::Edit { base: revision, op });
            let result = group.write(vec![edit]).await;
            let mut markers = histories.document.lock().unwrap();
            match (answer(&result), &result) {
                (Answer::Applied, _) => {
                    acknowledged += 1;
                    markers.acknowledged.push(marker);
                }
                (Answer::Refused, _)
                | (_, Err(GroupError::Refused(EngineError::EditRefused { .. }))) => {
                    markers.refused.push(marker)
                }
                _ => {}
            }
            continue;
        }
        let r = rng.below(REGISTERS.len() as u64) as usize;
        let register = REGISTERS[r].to_string();
        match rng.below(100) {
            0..40 => {
                written += 1;
                let v = format!("c{n}-{written}");
                let call = histories.registers.invoke(
                    n,
                    register.clone(),
                    RegisterOp::Write(Some(v.clone())),
                );
                match answer(&group.write(vec![put(&register, &v)]).await) {
                    Answer::Applied => {
                        acknowledged += 1;
                        histories.registers.returned(call, RegisterAnswer::Written);
                    }
                    Answer::Refused => histories.registers.refused(call),
                    _ => {}
                }
            }
            40..70 => {
                let call = histories
                    .registers
                    .invoke(n, register.clone(), RegisterOp::Read);
                match group.read(&key(&register), ReadLevel::Linearizable).await {
                    Ok(record) => {
                        seen[r] = Some((
                            value(&record),
                            record
                                .as_ref()
                                .map(|r| r.version.clone())
                                .unwrap_or_default(),
                        ));
                        histories
                            .registers
                            .returned(call, RegisterAnswer::Value(value(&record)));
                    }
                    Err(_) => histories.registers.refused(call),
                }
            }
            70..80 => {
                let Some((expect, version)) = seen[r].clone() else {
                    continue;
                };
                written += 1;
                let v = format!("c{n}-{written}");
                let condition = match &expect {
                    Some(_) => Expect::Version(version),
                    None => Expect::Absent,
                };
                let call = histories.registers.invoke(
                    n,
                    register.clone(),
                    RegisterOp::CompareAndSet {
                        expect,
                        new: Some(v.clone()),
                    },
                );
                let write =
                    Write::expecting(key(&register), Mutation::Put(v.into_bytes()), condition);
                match answer(&group.write(vec![write]).await) {
                    Answer::Applied => {
                        acknowledged += 1;
                        histories
                            .registers
                            .returned(call, RegisterAnswer::Swapped(true));
                    }
                    Answer::ConditionFailed => histories
                        .registers
                        .returned(call, RegisterAnswer::Swapped(false)),
                    Answer::Refused => histories.registers.refused(call),
                    Answer::Unknown => {}
                }
            }
            80..92 => {
                let call = histories
                    .counter
                    .invoke(n, COUNTER.to_string(), CounterOp::Add(1));
                let write = Write::new(key(COUNTER), Mutation::PnCounterAdd(1));
                match answer(&group.write(vec![write]).await) {
                    Answer::Applied => {
                        acknowledged += 1;
                        histories.counter.returned(call, CounterAnswer::Added);
                    }
                    Answer::Refused => histories.counter.refused(call),
                    _ => {}
                }
            }
            _ => {
                let call = histories
                    .counter
                    .invoke(n, COUNTER.to_string(), CounterOp::Read);
                match group.read(&key(COUNTER), ReadLevel::Linearizable).await {
                    Ok(record) => histories
                        .counter
                        .returned(call, CounterAnswer::Total(total(&record))),
                    Err(_) => histories.counter.refused(call),
                }
            }
        }
    }
    acknowledged
}

/// Every member, in a random order.
fn shuffled(rng: &mut Rng) -> Vec<MemberId> {
    let mut ids: Vec<MemberId> = NAMES.iter().map(|n| id(n)).collect();
    for i in (1..ids.len()).rev() {
        ids.swap(i, rng.below(i as u64 + 1) as usize);
    }
    ids
}

/// The nemesis: one fault per round, held for a while, then undone. Returns the faults' names.
async fn nemesis(seed: u64, cluster: &Cluster) -> Vec<&'static str> {
    let mut rng = Rng::new(seed ^ 0x006e_656d_6573_6973);
    let board = &cluster.board;
    let all = cluster.ids();
    let mut faults = Vec::new();
    for _ in 0..ROUNDS {
        tokio::time::sleep(Duration::from_millis(400 + rng.below(600))).await;
        let leader = cluster.agreed_leader().map(|l| id(&l));
        let held = Duration::from_millis(1200 + rng.below(800));
        let order = shuffled(&mut rng);
        match rng.below(6) {
            0 => {
                let victim = leader.unwrap_or_else(|| order[0].clone());
                faults.push("crash and restart the leader");
                cluster.stop(&victim.0).await;
                tokio::time::sleep(held).await;
                cluster.start(&victim.0).await;
            }
            1 => {
                let victim = leader.unwrap_or_else(|| order[0].clone());
                faults.push("isolate the leader");
                board.isolate(&victim, &all);
                tokio::time::sleep(held).await;
                board.heal();
            }
            2 => {
                faults.push("majorities ring");
                board.ring(&order);
                tokio::time::sleep(held).await;
                board.heal();
            }
            3 => {
                faults.push("bridge");
                board.partition(&[order[0..2].to_vec(), order[3..5].to_vec()]);
                tokio::time::sleep(held).await;
                board.heal();
            }
            4 => {
                faults.push("3/2 split");
                board.partition(&[order[0..3].to_vec(), order[3..5].to_vec()]);
                tokio::time::sleep(held).await;
                board.heal();
            }
            _ => {
                let victim = leader.unwrap_or_else(|| order[0].clone());
                faults.push("pause the leader past the election timeout");
                board.pause(&victim);
                tokio::time::sleep(held).await;
                board.resume(&victim);
            }
        }
    }
    faults
}

struct Run {
    registers: Checked,
    counter: Checked,
    /// Document edits acknowledged, and applied (the document's revision).
    edits: (usize, u64),
    acknowledged: usize,
    faults: Vec<&'static str>,
}

async fn run(seed: u64) -> Run {
    let mut rng = Rng::new(seed);
    let settings = Settings {
        request_timeout: Duration::from_secs(3),
        snapshot_every: 500,
        kept_behind_snapshot: 50,
        skew_ms: NAMES
            .iter()
            .map(|n| (id(n), rng.below(4001) as i64 - 2000))
            .collect(),
        ..Settings::default()
    };
    let cluster = Cluster::with(&NAMES, settings).await;
    cluster.leader().await;

    let histories = Arc::new(Histories::default());
    let stop = Arc::new(AtomicBool::new(false));
    let clients: Vec<_> = (0..CLIENTS)
        .map(|n| {
            tokio::spawn(client(
                n,
                seed,
                Arc::clone(&cluster.board),
                Arc::clone(&histories),
                Arc::clone(&stop),
            ))
        })
        .collect();
    let faults = nemesis(seed, &cluster).await;
    stop.store(true, Ordering::Relaxed);
    let mut acknowledged = 0;
    for client in clients {
        acknowledged += client.await.unwrap();
    }

    // Healed: every member reads every key (a lost acknowledged write shows up here).
    cluster.board.heal();
    cluster.board.resume_all();
    cluster.leader().await;
    for (i, name) in NAMES.iter().enumerate() {
        let group = cluster.group(name);
        let reader = 100 + i;
        for register in REGISTERS {
            let call = histories
                .registers
                .invoke(reader, register.to_string(), RegisterOp::Read);
            let record = group
                .read(&key(register), ReadLevel::Linearizable)
                .await
                .unwrap();
            histories
                .registers
                .returned(call, RegisterAnswer::Value(value(&record)));
        }
        let call = histories
            .counter
            .invoke(reader, COUNTER.to_string(), CounterOp::Read);
        let record = group
            .read(&key(COUNTER), ReadLevel::Linearizable)
            .await
            .unwrap();
        histories
            .counter
            .returned(call, CounterAnswer::Total(total(&record)));
    }
    let mut documents = Vec::new();
    for name in NAMES {
        let record = cluster
            .group(name)
            .read(&key(DOCUMENT), ReadLevel::Linearizable)
            .await
            .unwrap();
        documents.push(document(&record));
    }
    for name in NAMES {
        cluster.stop(name).await;
    }
    let markers = histories.document.lock().unwrap();
    let (revision, text) = documents[0].clone();
    assert!(
        documents.iter().all(|d| *d == documents[0]),
        "seed {seed}: members read different documents: {documents:?}"
    );
    for marker in &markers.acknowledged {
        assert_eq!(
            text.matches(marker.as_str()).count(),
            1,
            "seed {seed}: acknowledged {marker} not once in {text}"
        );
    }
    for marker in &markers.refused {
        assert!(
            !text.contains(marker.as_str()),
            "seed {seed}: refused {marker} applied: {text}"
        );
    }
    assert_eq!(
        text.matches('<').count() as u64,
        revision,
        "seed {seed}: one marker per applied edit: {text}"
    );
    let edits = (markers.acknowledged.len(), revision);
    drop(markers);

    let registers = check_per_key(&Register::new(), &histories.registers.history())
        .unwrap_or_else(|failure| panic!("seed {seed}: not linearizable:\n{failure}"));
    let counter = check_per_key(&Counter, &histories.counter.history())
        .unwrap_or_else(|failure| panic!("seed {seed}: not linearizable:\n{failure}"));
    Run {
        registers,
        counter,
        edits,
        acknowledged,
        faults,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn raft_histories_under_faults_are_linearizable() {
    let seeds: Vec<u64> = match std::env::var("RAFT_SEEDS") {
        Ok(list) => list
            .split(',')
            .map(|s| s.trim().parse().expect("RAFT_SEEDS: numbers"))
            .collect(),
        Err(_) => vec![1, 2],
    };
    for seed in seeds {
        let run = run(seed).await;
        println!(
            "seed {seed}: {} register and {} counter operations ({} and {} indeterminate), {} document edits acknowledged ({} applied), {} acknowledged writes; faults: {}",
            run.registers.operations,
            run.counter.operations,
            run.registers.indeterminate,
            run.counter.indeterminate,
            run.edits.0,
            run.edits.1,
            run.acknowledged,
            run.faults.join(", ")
        );
        // Not vacuous: the group served through the faults.
        assert!(
            run.acknowledged >= 50,
            "seed {seed}: only {} writes acknowledged",
            run.acknowledged
        );
        assert!(run.edits.0 >= 5, "seed {seed}: only {} edits", run.edits.0);
        assert_eq!(run.faults.len(), ROUNDS);
    }
}
