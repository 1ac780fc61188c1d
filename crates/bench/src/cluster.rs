//! Three `agentstore node` processes on loopback vs Redis with a primary and two asynchronous
//! replicas, at the same concurrency, in one run.
//!
//! Ours: 50 clients, each on its own keep-alive HTTP/1.1 connection to one of the three nodes
//! (client i to node i mod 3), PUT and GET of 100-byte values over 100 000 keys, for the
//! eventual setting (async, N=3 W=1 R=1) and the quorum one (N=3 W=2 R=2). Every node fsyncs
//! each write before acknowledging it. The anchor: `redis-benchmark -c 50 -d 100` against the
//! primary, with its replicas attached (no persistence, as Redis runs here by default).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use agentstore_engine::testkit::{RedisServer, free_port};
use agentstore_trust::{Capability, Operation, Right};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio::sync::Mutex;

use crate::load;
use crate::redis::beside;

const CLIENTS: usize = 50;
const KEYS: u64 = 100_000;

pub(crate) struct NodeProcess(Child);

impl NodeProcess {
    /// The process id (for its CPU time).
    pub(crate) fn pid(&self) -> u32 {
        self.0.id()
    }
}

impl Drop for NodeProcess {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.0.id().to_string()])
            .status();
        let _ = self.0.wait();
    }
}

/// The `agentstore` binary built beside this one.
fn agentstore_binary() -> PathBuf {
    let binary = std::env::current_exe()
        .ok()
        .and_then(|exe| exe.parent().map(|dir| dir.join("agentstore")))
        .filter(|path| path.exists());
    binary.unwrap_or_else(|| {
        eprintln!(
            "the cluster benchmark starts `agentstore node` processes: build it first with\n  \
             cargo build --release -p agentstore -p agentstore-bench"
        );
        std::process::exit(2);
    })
}

/// How the benchmark's nodes talk to each other.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Peers {
    /// Admitted by one authority, over mutual TLS; an open client API (`clients: open`).
    Admitted,
    /// Admitted, and clients present a capability token (a node's default with an authority).
    AdmittedWithTokens,
    /// `insecure: true`: plaintext, unauthenticated.
    Plaintext,
}

/// Starts three nodes with the given replication block and `collections` (a YAML
/// `  collections:` block, or nothing); returns them and their client addresses once every
/// node sees the other two.
pub(crate) fn start_cluster(
    dir: &Path,
    replication: &str,
    collections: &str,
    peers_are: Peers,
) -> (Vec<NodeProcess>, Vec<String>) {
    let (nodes, clients, _) = start_cluster_with_token(dir, replication, collections, peers_are);
    (nodes, clients)
}

/// [`start_cluster`], and a token that may do anything (with [`Peers::AdmittedWithTokens`]).
pub(crate) fn start_cluster_with_token(
    dir: &Path,
    replication: &str,
    collections: &str,
    peers_are: Peers,
) -> (Vec<NodeProcess>, Vec<String>, Option<String>) {
    let (nodes, clients, _, token) =
        start_cluster_with_resp(dir, replication, collections, peers_are);
    (nodes, clients, token)
}

/// [`start_cluster_with_token`], each node also serving RESP; its RESP addresses too.
pub(crate) fn start_cluster_with_resp(
    dir: &Path,
    replication: &str,
    collections: &str,
    peers_are: Peers,
) -> (Vec<NodeProcess>, Vec<String>, Vec<String>, Option<String>) {
    let names = ["node-a", "node-b", "node-c"];
    let mut resps = Vec::new();
    std::fs::create_dir_all(dir).expect("the benchmark's directory");
    let authority = agentstore_trust::SecretKey::generate();
    let peer_ports: Vec<u16> = names.iter().map(|_| free_port()).collect();
    let mut nodes = Vec::new();
    let mut clients = Vec::new();
    for (i, name) in names.iter().enumerate() {
        let client = format!("127.0.0.1:{}", free_port());
        let resp = format!("127.0.0.1:{}", free_port());
        let peers: String = names
            .iter()
            .zip(&peer_ports)
            .filter(|(n, _)| *n != name)
            .map(|(n, p)| format!("      {n}: 127.0.0.1:{p}\n"))
            .collect();
        let trust = match peers_are {
            Peers::Admitted | Peers::AdmittedWithTokens => {
                agentstore_trust::admit(&authority, name, &dir.join(name), &[]).expect("admitted");
                let clients = if peers_are == Peers::Admitted {
                    "open"
                } else {
                    "tokens"
                };
                format!(
                    "    authority: {}\n    clients: {clients}\n",
                    authority.public()
                )
            }
            Peers::Plaintext => "    insecure: true\n".to_owned(),
        };
        let yaml = format!(
            "storage:\n  node_id: {name}\n  data_dir: {}\n  replication:\n{replication}{collections}  cluster:\n    client_addr: {client}\n    resp_addr: {resp}\n    peer_addr: 127.0.0.1:{}\n{trust}    peers:\n{peers}",
            dir.join(name).display(),
            peer_ports[i]
        );
        let config = dir.join(format!("{name}.yaml"));
        std::fs::write(&config, yaml).unwrap();
        let child = Command::new(agentstore_binary())
            .args(["node", "--config"])
            .arg(&config)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        nodes.push(NodeProcess(child));
        clients.push(client);
        resps.push(resp);
    }
    let token = (peers_are == Peers::AdmittedWithTokens).then(|| {
        let everything = vec![
            Right::new(&[Operation::Read, Operation::Write, Operation::Admin], "")
                .expect("a right"),
        ];
        Capability::issue(&authority, everything, 0)
            .expect("a token")
            .to_text()
    });
    let authorization = token
        .as_ref()
        .map(|token| format!("Authorization: Bearer {token}"))
        .unwrap_or_default();
    let deadline = Instant::now() + Duration::from_secs(30);
    for client in &clients {
        loop {
            let status = std::process::Command::new("curl")
                .args([
                    "-s",
                    "-H",
                    &authorization,
                    &format!("http://{client}/v1/status"),
                ])
                .output()
                .map(|o| {
                    String::from_utf8_lossy(&o.stdout)
                        .matches("\"alive\"")
                        .count()
                })
                .unwrap_or(0);
            if status == 3 {
                break;
            }
            assert!(Instant::now() < deadline, "the cluster never formed");
            std::thread::sleep(Duration::from_millis(100));
        }
    }
    (nodes, clients, resps, token)
}

/// One keep-alive HTTP/1.1 connection.
pub(crate) struct Connection {
    stream: BufReader<TcpStream>,
    host: String,
    /// A session's token, when the connection carries one (sent and kept from each answer).
    session: Option<String>,
    /// The capability token sent with every request, if the nodes check them.
    bearer: Option<String>,
}

impl Connection {
    pub(crate) async fn open(addr: &str) -> Self {
        let stream = TcpStream::connect(addr).await.unwrap();
        stream.set_nodelay(true).unwrap();
        Self {
            stream: BufReader::new(stream),
            host: addr.to_owned(),
            session: None,
            bearer: None,
        }
    }

    /// The same connection, presenting `token` with every request.
    pub(crate) fn with_token(self, token: Option<String>) -> Self {
        Self {
            bearer: token,
            ..self
        }
    }

    /// The same connection, in a session of its own (the `agentstore-session` header).
    pub(crate) fn in_session(self) -> Self {
        Self {
            session: Some(String::new()),
            ..self
        }
    }

    /// Sends a request and reads the whole answer; panics unless it is 200 (or a GET's 404).
    /// A request that must succeed (200, or 404 for a read); answers the body.
    pub(crate) async fn call(&mut self, method: &str, path: &str, body: &str) -> Vec<u8> {
        self.call_with(method, path, body, "").await
    }

    /// [`Connection::call`] with extra header lines (each ending in `\r\n`).
    pub(crate) async fn call_with(
        &mut self,
        method: &str,
        path: &str,
        body: &str,
        headers: &str,
    ) -> Vec<u8> {
        let session = match &self.session {
            Some(token) if !token.is_empty() => format!("agentstore-session: {token}\r\n"),
            _ => String::new(),
        };
        let bearer = match &self.bearer {
            Some(token) => format!("Authorization: Bearer {token}\r\n"),
            None => String::new(),
        };
        let request = format!(
            "{method} {path} HTTP/1.1\r\nHost: {}\r\n{session}{bearer}{headers}Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            self.host,
            body.len()
        );
        self.stream
            .get_mut()
            .write_all(request.as_bytes())
            .await
            .unwrap();
        let mut line = String::new();
        self.stream.read_line(&mut line).await.unwrap();
        let status = line.get(9..12).unwrap_or("").to_owned();
        let mut length = 0usize;
        loop {
            line.clear();
            self.stream.read_line(&mut line).await.unwrap();
            if line == "\r\n" {
                break;
            }
            if let Some((name, value)) = line.split_once(':') {
                if name.eq_ignore_ascii_case("content-length") {
                    length = value.trim().parse().unwrap();
                } else if name.eq_ignore_ascii_case("agentstore-session")
                    && let Some(token) = &mut self.session
                {
                    *token = value.trim().to_owned();
                }
            }
        }
        let mut body = vec![0u8; length];
        self.stream.read_exact(&mut body).await.unwrap();
        assert!(
            status == "200" || (status == "404" && method == "GET"),
            "{method} {path}: {status} {}",
            String::from_utf8_lossy(&body)
        );
        body
    }
}

/// `count` keep-alive connections spread evenly over the nodes at `clients`, each presenting
/// `token` if there is one.
pub(crate) async fn connections(
    clients: &[String],
    count: usize,
    token: Option<&str>,
) -> Arc<Vec<Mutex<Connection>>> {
    let mut all = Vec::new();
    for i in 0..count {
        let connection = Connection::open(&clients[i % clients.len()]).await;
        all.push(Mutex::new(connection.with_token(token.map(str::to_owned))));
    }
    Arc::new(all)
}

fn measure(
    runtime: &tokio::runtime::Runtime,
    clients: &[String],
    seconds: u64,
) -> (crate::stats::Sample, crate::stats::Sample) {
    let duration = Duration::from_secs(seconds);
    let value = format!("\"{}\"", "v".repeat(98));
    runtime.block_on(async {
        let connections = connections(clients, CLIENTS, None).await;
        let put = {
            let (connections, value) = (Arc::clone(&connections), value.clone());
            load::run(CLIENTS, duration, move |client, i| {
                let (connections, value) = (Arc::clone(&connections), value.clone());
                async move {
                    let key = load::key("bench", client, i, KEYS);
                    let mut connection = connections[client].lock().await;
                    connection
                        .call("PUT", &format!("/v1/keys/{key}"), &value)
                        .await;
                }
            })
            .await
        };
        let get = {
            let connections = Arc::clone(&connections);
            load::run(CLIENTS, duration, move |client, i| {
                let connections = Arc::clone(&connections);
                async move {
                    let key = load::key("bench", client, i, KEYS);
                    let mut connection = connections[client].lock().await;
                    connection.call("GET", &format!("/v1/keys/{key}"), "").await;
                }
            })
            .await
        };
        (put, get)
    })
}

pub(crate) fn run(seconds: u64, peers: Peers) {
    let runtime = crate::two_workers();
    println!(
        "3 agentstore nodes on loopback (fsync per write on every node; peers {peers:?}) vs Redis primary + 2 async replicas (no persistence); {CLIENTS} clients, 100-byte values, {KEYS} keys, {seconds} s per workload\n"
    );
    let primary = RedisServer::start(&[]);
    let _replicas = [
        RedisServer::replica_of(&primary),
        RedisServer::replica_of(&primary),
    ];
    let mut rows = Vec::new();
    let settings = [
        (
            "eventual (async, W=1 R=1)",
            "    strategy: async\n    replicas: 3\n    read_quorum: 1\n",
        ),
        (
            "quorum (N=3 W=2 R=2)",
            "    strategy: quorum\n    replicas: 3\n    write_quorum: 2\n    read_quorum: 2\n",
        ),
    ];
    for (name, replication) in settings {
        let dir = tempfile::tempdir().unwrap();
        let (nodes, clients) = start_cluster(dir.path(), replication, "", peers);
        let (put, get) = measure(&runtime, &clients, seconds);
        drop(nodes);
        let port = primary.port;
        rows.push(beside(
            port,
            "set",
            &format!("{name}: put vs SET"),
            put,
            seconds,
        ));
        rows.push(beside(
            port,
            "get",
            &format!("{name}: get vs GET"),
            get,
            seconds,
        ));
    }
    crate::stats::print_table_with("redis-benchmark", &rows);
}
