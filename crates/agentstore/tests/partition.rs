//! A real network partition between real node processes, and its heal.
//!
//! Each of three `agentstore node` processes runs in its own network namespace, on a bridge
//! (10.77.X.1-3, the test on 10.77.X.254). The partition is made of blackhole routes: node-c
//! cannot reach node-a or node-b, nor they it, while the test still reaches every node.
//!
//! Needs root (namespaces, links, routes). Without root the test says so and does nothing,
//! unless `AGENTSTORE_REQUIRE_NETNS=1` (set by `.ci/run`), where it fails instead.

mod common;

use common::eventually;

use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use serde_json::Value as Json;

/// Runs `ip ARGS` (in namespace `ns` if given); panics with its output if it fails.
fn ip(ns: Option<&str>, args: &str) {
    let mut command = Command::new("ip");
    if let Some(ns) = ns {
        command.args(["netns", "exec", ns, "ip"]);
    }
    let out = command.args(args.split_whitespace()).output().unwrap();
    assert!(
        out.status.success(),
        "ip {args} (in {ns:?}): {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The namespaces, bridge and links of one test run; removed on drop.
struct Network {
    tag: String,
    subnet: u8,
}

impl Network {
    /// A network for test number `test` (tests of one process get distinct names).
    fn new(nodes: usize, test: u32) -> Self {
        let run = std::process::id() * 2 + test;
        let tag = format!("as{}", run % 100_000);
        let subnet = 20 + (run % 200) as u8;
        let network = Self { tag, subnet };
        let bridge = format!("{}br", network.tag);
        ip(None, &format!("link add {bridge} type bridge"));
        ip(
            None,
            &format!("addr add 10.77.{subnet}.254/24 dev {bridge}"),
        );
        ip(None, &format!("link set {bridge} up"));
        for i in 1..=nodes {
            let ns = network.ns(i);
            let (outer, inner) = (
                format!("{}v{i}", network.tag),
                format!("{}i{i}", network.tag),
            );
            ip(None, &format!("netns add {ns}"));
            ip(
                None,
                &format!("link add {outer} type veth peer name {inner}"),
            );
            ip(None, &format!("link set {inner} netns {ns}"));
            ip(None, &format!("link set {outer} master {bridge}"));
            ip(None, &format!("link set {outer} up"));
            ip(
                Some(&ns),
                &format!("addr add {} dev {inner}", network.cidr(i)),
            );
            ip(Some(&ns), &format!("link set {inner} up"));
            ip(Some(&ns), "link set lo up");
        }
        network
    }

    fn ns(&self, i: usize) -> String {
        format!("{}n{i}", self.tag)
    }

    fn addr(&self, i: usize) -> String {
        format!("10.77.{}.{i}", self.subnet)
    }

    fn cidr(&self, i: usize) -> String {
        format!("{}/24", self.addr(i))
    }

    /// Cuts (or, with `heal`, restores) every path between node `i` and node `j`.
    fn cut(&self, i: usize, j: usize, heal: bool) {
        let verb = if heal { "del" } else { "add" };
        ip(
            Some(&self.ns(i)),
            &format!("route {verb} blackhole {}/32", self.addr(j)),
        );
        ip(
            Some(&self.ns(j)),
            &format!("route {verb} blackhole {}/32", self.addr(i)),
        );
    }
}

impl Drop for Network {
    fn drop(&mut self) {
        for i in 1..=3 {
            let _ = Command::new("ip")
                .args(["netns", "del", &self.ns(i)])
                .status();
        }
        let _ = Command::new("ip")
            .args(["link", "del", &format!("{}br", self.tag)])
            .status();
    }
}

fn http(addr: SocketAddr, method: &str, path: &str, body: &str) -> (u16, String) {
    common::http(addr, method, path, body).unwrap_or((0, String::new()))
}

fn json(body: &str) -> Json {
    serde_json::from_str(body).unwrap_or(Json::Null)
}

struct NodeProcess(Child);

impl Drop for NodeProcess {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts node `i` (1-3) in its namespace with `collections` (a YAML `  collections:` block).
fn start(network: &Network, dir: &Path, i: usize, collections: &str) -> (NodeProcess, SocketAddr) {
    let names = ["node-a", "node-b", "node-c"];
    let name = names[i - 1];
    let peers: String = (1..=3)
        .filter(|j| *j != i)
        .map(|j| format!("      {}: {}:7101\n", names[j - 1], network.addr(j)))
        .collect();
    let (authority, _) =
        agentstore_trust::SecretKey::load_or_create(&dir.join("authority.key")).unwrap();
    agentstore_trust::admit(&authority, name, &dir.join(name), &[]).unwrap();
    let yaml = format!(
        "storage:\n  node_id: {name}\n  data_dir: {}\n  replication:\n    strategy: quorum\n    replicas: 3\n    write_quorum: 2\n    read_quorum: 2\n{collections}  cluster:\n    client_addr: {addr}:7001\n    peer_addr: {addr}:7101\n    authority: {}\n    clients: open\n    peers:\n{peers}",
        dir.join(name).display(),
        authority.public(),
        addr = network.addr(i),
    );
    let config = dir.join(format!("{name}.yaml"));
    std::fs::write(&config, yaml).unwrap();
    let child = Command::new("ip")
        .args(["netns", "exec", &network.ns(i)])
        .arg(env!("CARGO_BIN_EXE_agentstore"))
        .args(["node", "--config"])
        .arg(&config)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let client: SocketAddr = format!("{}:7001", network.addr(i)).parse().unwrap();
    (NodeProcess(child), client)
}

fn alive(client: SocketAddr) -> Vec<String> {
    let status = json(&http(client, "GET", "/v1/status", "").1);
    status["members"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|m| m["liveness"] == "alive")
        .map(|m| m["id"].as_str().unwrap_or("").to_owned())
        .collect()
}

fn metric(client: SocketAddr, name: &str) -> Option<f64> {
    let text = http(client, "GET", "/metrics", "").1;
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
}

/// Whether namespaces can be made here (root); without, says so, or fails under
/// `AGENTSTORE_REQUIRE_NETNS`.
fn namespaces_available() -> bool {
    let root = Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| o.stdout.starts_with(b"0\n"));
    if !root {
        assert!(
            std::env::var_os("AGENTSTORE_REQUIRE_NETNS").is_none(),
            "AGENTSTORE_REQUIRE_NETNS is set but this test needs root for network namespaces"
        );
        eprintln!("skipped: network namespaces need root");
    }
    root
}

const LEADERLESS: &str = "  collections:\n    hits:\n      conflict: pn_counter\n    docs:\n      conflict: multi_value\n";

#[test]
fn a_partitioned_minority_refuses_quorum_work_and_the_cluster_converges_after_the_heal() {
    if !namespaces_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let network = Network::new(3, 0);
    let mut nodes = Vec::new();
    let mut clients = Vec::new();
    for i in 1..=3 {
        let (process, client) = start(&network, dir.path(), i, LEADERLESS);
        nodes.push(process);
        clients.push(client);
    }
    let (a, b, c) = (clients[0], clients[1], clients[2]);
    for client in &clients {
        eventually("the cluster forms", || match alive(*client).len() {
            3 => Ok(()),
            n => Err(format!("{n} alive")),
        });
    }
    assert_eq!(http(a, "PUT", "/v1/keys/notes:before", "1").0, 200);

    // node-c is cut off from node-a and node-b.
    network.cut(3, 1, false);
    network.cut(3, 2, false);
    eventually("the majority sees node-c dead", || {
        let seen = alive(a);
        if seen == ["node-a", "node-b"] {
            Ok(())
        } else {
            Err(format!("{seen:?}"))
        }
    });
    eventually("node-c sees itself alone", || {
        let seen = alive(c);
        if seen == ["node-c"] {
            Ok(())
        } else {
            Err(format!("{seen:?}"))
        }
    });
    eventually("node-c has no write quorum", || {
        match metric(c, r#"agentstore_quorum_reachable_ratio{op="write"}"#) {
            Some(0.0) => Ok(()),
            other => Err(format!("{other:?}")),
        }
    });

    // The majority keeps working (W=2, R=2).
    assert_eq!(
        http(a, "PUT", "/v1/keys/notes:during", "\"majority\"").0,
        200
    );
    assert_eq!(http(b, "GET", "/v1/keys/notes:during", "").0, 200);
    // The minority refuses: a write is indeterminate (durable on node-c alone), a read fails.
    let (status, body) = http(c, "PUT", "/v1/keys/notes:during", "\"minority\"");
    assert_eq!(status, 503, "{body}");
    assert_eq!(json(&body)["error"]["code"], "quorum_unavailable", "{body}");
    let (status, body) = http(c, "GET", "/v1/keys/notes:before", "");
    assert_eq!(
        (status, json(&body)["error"]["code"].clone()),
        (503, "unavailable".into()),
        "{body}"
    );

    // Both sides write the same keys: a counter, a multi-value register.
    let mut acknowledged = 0;
    let mut indeterminate = 0;
    for (client, n) in [(a, 3), (c, 2)] {
        for _ in 0..n {
            match http(client, "POST", "/v1/counters/hits:x", r#"{"delta":1}"#).0 {
                200 => acknowledged += 1,
                503 => indeterminate += 1,
                other => panic!("counter add answered {other}"),
            }
        }
    }
    assert_eq!((acknowledged, indeterminate), (3, 2));
    assert_eq!(
        http(a, "PUT", "/v1/keys/docs:plan", "\"plan from a\"").0,
        200
    );
    assert_eq!(
        http(c, "PUT", "/v1/keys/docs:plan", "\"plan from c\"").0,
        503
    );

    // Heal. Every node converges: the LWW key to one winner, both siblings kept, and the
    // counter counts every increment, the indeterminate ones included (they were durable).
    network.cut(3, 1, true);
    network.cut(3, 2, true);
    eventually("the cluster heals", || {
        let views: Vec<Vec<String>> = clients.iter().map(|c| alive(*c)).collect();
        if views.iter().all(|v| v.len() == 3) {
            Ok(())
        } else {
            Err(format!("alive as a, b, c see it: {views:?}"))
        }
    });
    eventually("every node converges", || {
        let mut views = Vec::new();
        for client in &clients {
            let during =
                json(&http(*client, "GET", "/v1/keys/notes:during", "").1)["value"].clone();
            let hits = json(&http(*client, "GET", "/v1/keys/hits:x", "").1)["value"].clone();
            let mut plan: Vec<String> =
                json(&http(*client, "GET", "/v1/keys/docs:plan", "").1)["siblings"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .map(|v| v.to_string())
                    .collect();
            plan.sort();
            views.push((during, hits, plan));
        }
        let expected_plan = vec!["\"plan from a\"".to_owned(), "\"plan from c\"".to_owned()];
        if views.iter().all(|v| *v == views[0]) && views[0].1 == 5 && views[0].2 == expected_plan {
            Ok(())
        } else {
            Err(format!("{views:?}"))
        }
    });
    let (status, body) = http(c, "GET", "/v1/keys/notes:before", "");
    assert_eq!(status, 200, "node-c serves reads again: {body}");
    drop(nodes);
}

const STRONG: &str = "  collections:\n    agent:\n      consistency: strong\n    bank:\n      consistency: strong\n      conflict: pn_counter\n";

/// The index of the node every node names as the Raft leader, if they agree.
fn raft_leader(clients: &[SocketAddr]) -> Option<usize> {
    let leaders: Vec<Json> = clients
        .iter()
        .map(|c| json(&http(*c, "GET", "/v1/status", "").1)["raft"]["leader"].clone())
        .collect();
    let name = leaders[0].as_str()?;
    if leaders.iter().any(|l| l.as_str() != Some(name)) {
        return None;
    }
    ["node-a", "node-b", "node-c"]
        .iter()
        .position(|n| *n == name)
}

#[test]
fn a_cut_off_raft_leader_is_replaced_and_histories_stay_linearizable() {
    if !namespaces_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let network = Network::new(3, 1);
    let mut nodes = Vec::new();
    let mut clients = Vec::new();
    for i in 1..=3 {
        let (process, client) = start(&network, dir.path(), i, STRONG);
        nodes.push(process);
        clients.push(client);
    }
    let mut old = None;
    eventually("a Raft leader", || {
        old = raft_leader(&clients);
        old.map(|_| ())
            .ok_or_else(|| "no agreed leader".to_string())
    });
    let old = old.unwrap();
    let others: Vec<usize> = (0..3).filter(|i| *i != old).collect();

    let histories = Default::default();
    let acknowledged = common::history::load_while(&clients, 3, &histories, || {
        std::thread::sleep(Duration::from_millis(700));
        // The leader is cut off from both followers; the test still reaches everyone.
        for j in &others {
            network.cut(old + 1, j + 1, false);
        }
        eventually("the majority elects a new leader", || {
            let majority: Vec<SocketAddr> = others.iter().map(|i| clients[*i]).collect();
            match raft_leader(&majority) {
                Some(new) if new != old => Ok(()),
                other => Err(format!("{other:?}")),
            }
        });
        eventually("the majority commits", || {
            match http(
                clients[others[0]],
                "PUT",
                "/v1/keys/agent:probe",
                "\"majority\"",
            ) {
                (200, _) => Ok(()),
                (status, body) => Err(format!("{status} {body}")),
            }
        });
        // Alone, the old leader commits nothing: a typed refusal, never a success.
        let (status, body) = http(clients[old], "PUT", "/v1/keys/agent:probe", "\"minority\"");
        let code = json(&body)["error"]["code"].clone();
        assert!(
            status == 503 && (code == "unavailable" || code == "indeterminate"),
            "{status} {body}"
        );
        std::thread::sleep(Duration::from_secs(1));
        for j in &others {
            network.cut(old + 1, j + 1, true);
        }
        eventually("the healed group agrees on a leader", || {
            raft_leader(&clients)
                .map(|_| ())
                .ok_or_else(|| "no agreed leader".into())
        });
        std::thread::sleep(Duration::from_millis(700));
    });
    common::history::final_reads(&clients, &histories);
    let summary = common::history::check(&histories);
    println!("{summary}, {acknowledged} acknowledged writes");
    let (status, body) = http(clients[old], "GET", "/v1/keys/agent:probe", "");
    assert!(
        status == 200 && json(&body)["value"] == "majority",
        "{status} {body}"
    );
    assert!(
        acknowledged >= 20,
        "only {acknowledged} writes acknowledged"
    );
    drop(nodes);
}
