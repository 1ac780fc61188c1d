//! Strong collections on three `agentstore node` processes vs etcd with three members, on
//! loopback, in one run.
//!
//! Both sides replicate every write through Raft to a majority that fsyncs it (etcd's WAL
//! fsync is on by default; agentstore's Raft log is a redb file committed with an fsync per
//! append). Reads are linearizable on both: agentstore's read index, etcd's default range
//! (quorum read). Clients speak HTTP/1.1 with keep-alive to both: agentstore's key API, and
//! etcd's JSON gateway (`/v3/kv/put`, `/v3/kv/range`), client i to the i-th member counting
//! from the leader (so a lone client talks to the leader on both sides, and neither pays a
//! forward that the other does not), at concurrency 1, 16 and 64, 100-byte values over
//! 10 000 keys. Both sides take puts for a while first (not counted); then each workload
//! runs in one-second slices, the sides taking turns.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use agentstore_engine::testkit::free_port;
use tokio::sync::Mutex;

use crate::cluster::{Connection, Peers, start_cluster};
use crate::load;
use crate::stats::{Row, Sample};

const KEYS: u64 = 10_000;
const CONCURRENCY: [usize; 3] = [1, 16, 64];
/// Puts at 16 clients on each side before the measured workloads.
const WARM_UP_SECONDS: u64 = 2;

struct Etcd(Vec<Child>);

impl Drop for Etcd {
    fn drop(&mut self) {
        for child in &mut self.0 {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Starts three etcd members; returns them and their client addresses once healthy.
fn start_etcd(dir: &Path) -> (Etcd, Vec<String>) {
    if Command::new("etcd").arg("--version").output().is_err() {
        eprintln!(
            "the strong benchmark compares with etcd: install Debian's etcd-server\n  apt-get install etcd-server"
        );
        std::process::exit(2);
    }
    let peers: Vec<u16> = (0..3).map(|_| free_port()).collect();
    let clients: Vec<String> = (0..3)
        .map(|_| format!("127.0.0.1:{}", free_port()))
        .collect();
    let cluster: Vec<String> = peers
        .iter()
        .enumerate()
        .map(|(i, p)| format!("e{i}=http://127.0.0.1:{p}"))
        .collect();
    let mut members = Vec::new();
    for i in 0..3 {
        let child = Command::new("etcd")
            .args(["--name", &format!("e{i}")])
            .arg("--data-dir")
            .arg(dir.join(format!("e{i}")))
            .args(["--listen-client-urls", &format!("http://{}", clients[i])])
            .args(["--advertise-client-urls", &format!("http://{}", clients[i])])
            .args([
                "--listen-peer-urls",
                &format!("http://127.0.0.1:{}", peers[i]),
            ])
            .args([
                "--initial-advertise-peer-urls",
                &format!("http://127.0.0.1:{}", peers[i]),
            ])
            .args(["--initial-cluster", &cluster.join(",")])
            .args([
                "--initial-cluster-state",
                "new",
                "--initial-cluster-token",
                "agentstore-bench",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("etcd starts");
        members.push(child);
    }
    let etcd = Etcd(members);
    let deadline = Instant::now() + Duration::from_secs(30);
    for client in &clients {
        while !curl(&format!("http://{client}/health"), None).contains("\"health\":\"true\"") {
            assert!(Instant::now() < deadline, "etcd never became healthy");
            std::thread::sleep(Duration::from_millis(100));
        }
    }
    (etcd, clients)
}

fn curl(url: &str, body: Option<&str>) -> String {
    let mut command = Command::new("curl");
    command.args(["-s", url]);
    if let Some(body) = body {
        command.args(["-X", "POST", "-d", body]);
    }
    command
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default()
}

/// The string value of `"field":"..."` in a JSON text (the first one), or "".
fn field(json: &str, name: &str) -> String {
    json.split(&format!("\"{name}\":\""))
        .nth(1)
        .and_then(|rest| rest.split('"').next())
        .unwrap_or("")
        .to_owned()
}

/// `members` reordered to start at `leader`, keeping their cyclic order.
pub(crate) fn leader_first(members: &[String], leader: usize) -> Vec<String> {
    (0..members.len())
        .map(|i| members[(leader + i) % members.len()].clone())
        .collect()
}

/// Waits until the agentstore nodes agree on a Raft leader; returns its position.
pub(crate) fn agentstore_leader(clients: &[String]) -> usize {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let statuses: Vec<String> = clients
            .iter()
            .map(|c| curl(&format!("http://{c}/v1/status"), None))
            .collect();
        let leaders: Vec<String> = statuses.iter().map(|s| field(s, "leader")).collect();
        if !leaders[0].is_empty()
            && leaders.iter().all(|l| *l == leaders[0])
            && let Some(at) = statuses.iter().position(|s| field(s, "node") == leaders[0])
        {
            return at;
        }
        assert!(Instant::now() < deadline, "no Raft leader");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The position of etcd's leader among `clients`.
fn etcd_leader(clients: &[String]) -> usize {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let statuses: Vec<String> = clients
            .iter()
            .map(|c| curl(&format!("http://{c}/v3/maintenance/status"), Some("{}")))
            .collect();
        let found = statuses.iter().position(|s| {
            !field(s, "leader").is_empty() && field(s, "leader") == field(s, "member_id")
        });
        if let Some(at) = found {
            return at;
        }
        assert!(Instant::now() < deadline, "etcd has no leader");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Standard base64 (etcd's gateway takes keys and values so).
fn base64(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for (i, shift) in [18, 12, 6, 0].into_iter().enumerate() {
            if i <= chunk.len() {
                out.push(ALPHABET[(n >> shift) as usize & 63] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// What one request of a workload is, for a side.
#[derive(Clone, Copy)]
enum Side {
    Agentstore,
    Etcd,
}

async fn measure(
    side: Side,
    addrs: &[String],
    clients: usize,
    write: bool,
    seconds: u64,
) -> Sample {
    let mut connections = Vec::new();
    for i in 0..clients {
        connections.push(Mutex::new(Connection::open(&addrs[i % addrs.len()]).await));
    }
    let connections = Arc::new(connections);
    let value = "v".repeat(98);
    load::run(clients, Duration::from_secs(seconds), move |client, i| {
        let connections = Arc::clone(&connections);
        let value = value.clone();
        async move {
            let index = load::key_index(client, i, KEYS);
            let mut connection = connections[client].lock().await;
            match (side, write) {
                (Side::Agentstore, true) => {
                    let path = format!("/v1/keys/ledger:{index}");
                    connection.call("PUT", &path, &format!("\"{value}\"")).await;
                }
                (Side::Agentstore, false) => {
                    connection
                        .call("GET", &format!("/v1/keys/ledger:{index}"), "")
                        .await;
                }
                (Side::Etcd, true) => {
                    let body = format!(
                        r#"{{"key":"{}","value":"{}"}}"#,
                        base64(format!("ledger:{index}").as_bytes()),
                        base64(format!("\"{value}\"").as_bytes())
                    );
                    connection.call("POST", "/v3/kv/put", &body).await;
                }
                (Side::Etcd, false) => {
                    let body = format!(
                        r#"{{"key":"{}"}}"#,
                        base64(format!("ledger:{index}").as_bytes())
                    );
                    connection.call("POST", "/v3/kv/range", &body).await;
                }
            }
        }
    })
    .await
}

pub(crate) fn run(seconds: u64) {
    let runtime = crate::two_workers();
    println!(
        "3 agentstore nodes (strong collection, Raft) vs 3 etcd {} members, loopback, fsync per commit on both; 100-byte values, {KEYS} keys, {seconds} s per workload after {WARM_UP_SECONDS} s of uncounted puts on each side\n",
        etcd_version()
    );
    let dir = tempfile::tempdir().unwrap();
    let collections = "  collections:\n    ledger:\n      consistency: strong\n";
    let replication =
        "    strategy: quorum\n    replicas: 3\n    write_quorum: 2\n    read_quorum: 2\n";
    // etcd first: without it the run stops before any node is started.
    let (etcd, theirs) = start_etcd(&dir.path().join("etcd"));
    let (nodes, ours) = start_cluster(
        &dir.path().join("agentstore"),
        replication,
        collections,
        Peers::Admitted,
    );
    let (our_leader, their_leader) = (agentstore_leader(&ours), etcd_leader(&theirs));
    println!(
        "leaders: agentstore node {} of 3, etcd member {} of 3; client i talks to the i-th member from the leader\n",
        our_leader + 1,
        their_leader + 1
    );
    let ours = leader_first(&ours, our_leader);
    let theirs = leader_first(&theirs, their_leader);
    // Neither side is measured on files just created: both take puts for a while first
    // (not counted), so the first workload does not pay for growing them.
    for (side, addrs) in [(Side::Agentstore, &ours), (Side::Etcd, &theirs)] {
        runtime.block_on(measure(side, addrs, 16, true, WARM_UP_SECONDS));
    }
    let mut rows = Vec::new();
    for write in [true, false] {
        for clients in CONCURRENCY {
            // One-second slices, the sides taking turns: the three members of each side share
            // one disk whose fsync time drifts by up to 2x from one minute to the next, and
            // a whole workload on one side after the other compared the drift, not the sides.
            let (mut mine, mut anchor) = (Vec::new(), Vec::new());
            for _ in 0..seconds {
                mine.push(runtime.block_on(measure(Side::Agentstore, &ours, clients, write, 1)));
                anchor.push(runtime.block_on(measure(Side::Etcd, &theirs, clients, write, 1)));
            }
            let (mine, anchor) = (Sample::merge(mine), Sample::merge(anchor));
            let what = if write {
                "strong put"
            } else {
                "linearizable get"
            };
            rows.push(Row::new(
                format!("{what}, {clients} client(s)"),
                mine,
                anchor,
            ));
        }
    }
    drop(nodes);
    drop(etcd);
    crate::stats::print_table_with("etcd", &rows);
}

fn etcd_version() -> String {
    Command::new("etcd")
        .arg("--version")
        .output()
        .ok()
        .and_then(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .next()
                .map(|l| l.trim_start_matches("etcd Version: ").to_owned())
        })
        .unwrap_or_default()
}
