//! Helpers shared by the tests that drive `agentstore node` processes.
// Each test binary uses some of these helpers, none uses all.
#![allow(dead_code)]

pub(crate) mod history;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use agentstore_engine::testkit::free_port;

/// Waits until `check` holds (30 s at most); panics with its last reason.
pub(crate) fn eventually(what: &str, mut check: impl FnMut() -> Result<(), String>) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match check() {
            Ok(()) => return,
            Err(why) if Instant::now() > deadline => panic!("{what}: {why}"),
            Err(_) => std::thread::sleep(Duration::from_millis(200)),
        }
    }
}

/// Runs the `agentstore` command with `args`, unaffected by the caller's `AGENTSTORE_*`
/// variables: (exit code, stdout without its surrounding white space, stderr).
pub(crate) fn cli(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_agentstore"))
        .args(args)
        .env_remove("AGENTSTORE_DATA_DIR")
        .env_remove("AGENTSTORE_CONFIG")
        .env_remove("AGENTSTORE_TOKEN")
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).trim().to_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// A minimal HTTP/1.1 exchange: (status, body).
pub(crate) fn http(
    addr: SocketAddr,
    method: &str,
    path: &str,
    body: &str,
) -> std::io::Result<(u16, String)> {
    exchange(addr, method, path, body, "").map(|(status, body, _)| (status, body))
}

/// An HTTP/1.1 exchange in a session: sends `token` as the `agentstore-session` header;
/// returns (status, body, the session header of the answer).
pub(crate) fn http_session(
    addr: SocketAddr,
    method: &str,
    path: &str,
    body: &str,
    token: &str,
) -> std::io::Result<(u16, String, Option<String>)> {
    let session = if token.is_empty() {
        String::new()
    } else {
        format!("agentstore-session: {token}\r\n")
    };
    exchange(addr, method, path, body, &session)
}

/// An HTTP/1.1 exchange presenting a capability token: (status, body).
pub(crate) fn http_bearer(
    addr: SocketAddr,
    method: &str,
    path: &str,
    body: &str,
    token: &str,
) -> std::io::Result<(u16, String)> {
    let header = format!("Authorization: Bearer {token}\r\n");
    exchange(addr, method, path, body, &header).map(|(status, body, _)| (status, body))
}

/// An HTTP/1.1 exchange with one extra header (`name: value`): (status, body).
pub(crate) fn http_header(
    addr: SocketAddr,
    method: &str,
    path: &str,
    body: &str,
    header: (&str, &str),
) -> std::io::Result<(u16, String)> {
    let line = format!("{}: {}\r\n", header.0, header.1);
    exchange(addr, method, path, body, &line).map(|(status, body, _)| (status, body))
}

fn exchange(
    addr: SocketAddr,
    method: &str,
    path: &str,
    body: &str,
    session: &str,
) -> std::io::Result<(u16, String, Option<String>)> {
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(
        stream,
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n{session}Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )?;
    let mut response = String::new();
    stream.read_to_string(&mut response)?;
    let status = response
        .get(9..12)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let (head, body) = response.split_once("\r\n\r\n").unwrap_or((&response, ""));
    let token = head.lines().find_map(|line| {
        let (name, value) = line.split_once(':')?;
        name.eq_ignore_ascii_case("agentstore-session")
            .then(|| value.trim().to_owned())
    });
    Ok((status, body.to_owned(), token))
}

/// An `agentstore node` process of a test; killed when dropped.
pub(crate) struct NodeProcess {
    pub(crate) config: PathBuf,
    pub(crate) data: PathBuf,
    pub(crate) client: SocketAddr,
    /// Where it speaks RESP.
    pub(crate) resp: SocketAddr,
    /// Where it listens for peers.
    pub(crate) peer_port: u16,
    pub(crate) child: Option<Child>,
    /// Extra environment of the process (`AGENTSTORE_CRASH_AT`, ...).
    pub(crate) env: Vec<(String, String)>,
    /// Where the process's log (stderr) goes, appended across restarts.
    pub(crate) log: PathBuf,
}
impl NodeProcess {
    pub(crate) fn start(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_agentstore"))
            .args(["node", "--config"])
            .arg(&self.config)
            .env_remove("AGENTSTORE_DATA_DIR")
            .env("RUST_LOG", "warn,p2p_ai_agents=info")
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        self.child = Some(child);
        // Generous: on two loaded cores a node's start (keys, TLS, its Raft member) can take
        // seconds; a node that exits fails at once, with its log.
        let deadline = Instant::now() + Duration::from_secs(40);
        while !matches!(http(self.client, "GET", "/healthz", ""), Ok((200, _))) {
            let exited = self
                .child
                .as_mut()
                .and_then(|child| child.try_wait().ok().flatten());
            assert!(
                exited.is_none() && Instant::now() < deadline,
                "node on {} never became ready ({}); its log ends with:\n{}",
                self.client,
                exited.map_or("still running".to_owned(), |status| format!(
                    "it exited: {status}"
                )),
                self.log_tail(20)
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Sends `signal` (e.g. `-KILL`) and waits for the process to end.
    pub(crate) fn signal(&mut self, signal: &str) -> Option<i32> {
        let mut child = self.child.take()?;
        let _ = Command::new("kill")
            .args([signal, &child.id().to_string()])
            .status();
        child.wait().ok().and_then(|status| status.code())
    }

    /// Waits (`limit` at most) for the process to end by itself; whether it did.
    pub(crate) fn exits_within(&mut self, limit: Duration) -> bool {
        let deadline = Instant::now() + limit;
        while let Some(child) = &mut self.child {
            if child.try_wait().ok().flatten().is_some() {
                self.child = None;
                return true;
            }
            if Instant::now() > deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        true
    }

    /// The last `lines` lines of the process's log, for failure messages.
    pub(crate) fn log_tail(&self, lines: usize) -> String {
        let log = std::fs::read_to_string(&self.log).unwrap_or_default();
        let all: Vec<&str> = log.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }
}

impl Drop for NodeProcess {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Admits the node `name` (data in `data`) with the authority of the cluster in `dir` (created
/// with the first node); returns the authority's public key.
pub(crate) fn admit(dir: &Path, name: &str, data: &Path) -> agentstore_trust::PublicKey {
    let (authority, _) =
        agentstore_trust::SecretKey::load_or_create(&dir.join("authority.key")).unwrap();
    agentstore_trust::admit(&authority, name, data, &["127.0.0.1".to_owned()]).unwrap();
    authority.public()
}

/// A node `name` (not started) listening for clients on a free port and for peers on
/// `peer_port`, with `peers` (name, peer port) and `collections` (a YAML `  collections:`
/// block), N=3 W=2 R=2.
pub(crate) fn node(
    dir: &Path,
    name: &str,
    peer_port: u16,
    peers: &[(&str, u16)],
    collections: &str,
) -> NodeProcess {
    let client: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let resp: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let data = dir.join(name);
    let peers: String = peers
        .iter()
        .map(|(n, p)| format!("      {n}: 127.0.0.1:{p}\n"))
        .collect();
    let authority = admit(dir, name, &data);
    let yaml = format!(
        "storage:\n  node_id: {name}\n  data_dir: {}\n  replication:\n    strategy: quorum\n    replicas: 3\n    write_quorum: 2\n    read_quorum: 2\n{collections}  cluster:\n    client_addr: {client}\n    resp_addr: {resp}\n    peer_addr: 127.0.0.1:{peer_port}\n    authority: {authority}\n    clients: open\n    peers:\n{peers}",
        data.display(),
    );
    let config = dir.join(format!("{name}.yaml"));
    std::fs::write(&config, yaml).unwrap();
    NodeProcess {
        config,
        data,
        client,
        resp,
        peer_port,
        child: None,
        env: Vec::new(),
        log: dir.join(format!("{name}.log")),
    }
}

/// Three nodes (`node-a`, `node-b`, `node-c`, N=3 W=2 R=2) with `collections` (a YAML
/// `  collections:` block), not started: a test may change their configuration first.
pub(crate) fn nodes(dir: &Path, collections: &str) -> Vec<NodeProcess> {
    let names = ["node-a", "node-b", "node-c"];
    let ports: Vec<u16> = names.iter().map(|_| free_port()).collect();
    names
        .iter()
        .zip(&ports)
        .map(|(name, port)| {
            let peers: Vec<(&str, u16)> = names
                .iter()
                .copied()
                .zip(ports.iter().copied())
                .filter(|(n, _)| n != name)
                .collect();
            node(dir, name, *port, &peers, collections)
        })
        .collect()
}

/// Three nodes (`node-a`, `node-b`, `node-c`, N=3 W=2 R=2) with `collections` (a YAML
/// `  collections:` block), started.
pub(crate) fn cluster(dir: &Path, collections: &str) -> Vec<NodeProcess> {
    let mut nodes = nodes(dir, collections);
    for node in &mut nodes {
        node.start();
    }
    nodes
}

/// Three nodes like [`cluster`]'s that require capability tokens from their clients
/// (`clients: tokens`), started.
pub(crate) fn token_cluster(dir: &Path, collections: &str) -> Vec<NodeProcess> {
    let mut nodes = nodes(dir, collections);
    for node in &mut nodes {
        node.configure("clients: open", "clients: tokens");
        node.start();
    }
    nodes
}

/// A capability token from the authority of the cluster in `dir`, with `rights` as
/// `agentstore token issue` takes them (`--read PREFIX`, `--admin`, …).
pub(crate) fn issue_token(dir: &Path, rights: &[&str]) -> String {
    let authority = dir.join("authority.key");
    let mut args = vec!["token", "issue", "--authority", authority.to_str().unwrap()];
    args.extend_from_slice(rights);
    let (code, token, stderr) = cli(&args);
    assert_eq!(code, 0, "{stderr}");
    token
}

impl NodeProcess {
    /// Changes the node's configuration file: `from` becomes `to`.
    pub(crate) fn configure(&self, from: &str, to: &str) {
        let text = std::fs::read_to_string(&self.config).unwrap();
        assert!(
            text.contains(from),
            "{from} is not in {}",
            self.config.display()
        );
        std::fs::write(&self.config, text.replace(from, to)).unwrap();
    }
}
