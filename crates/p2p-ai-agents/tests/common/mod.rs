//! Nodes run in this test process (`server::run`, the function `agentstore node` runs).
// Each test binary uses some of these helpers.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use p2p_ai_agents::storage::server::{self, Listeners};
use p2p_ai_agents::storage::{Config, NodeClient};
use tokio::net::TcpListener;
use tokio::sync::oneshot;

/// The authority that admits this test's nodes.
static AUTHORITY: std::sync::LazyLock<agentstore_trust::SecretKey> =
    std::sync::LazyLock::new(agentstore_trust::SecretKey::generate);

/// A node running in this process.
pub(crate) struct TestNode {
    pub(crate) client: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<()>,
    _dir: tempfile::TempDir,
}

/// Three nodes in this process on loopback (N=3 W=2 R=2), with `settings` (YAML lines under
/// `storage:`, such as a `collections:` block), once every node sees the three alive.
pub(crate) async fn cluster_with(settings: &str) -> Vec<TestNode> {
    let names = ["node-a", "node-b", "node-c"];
    let mut peers = Vec::new();
    let mut clients = Vec::new();
    for _ in names {
        peers.push(TcpListener::bind("127.0.0.1:0").await.unwrap());
        clients.push(TcpListener::bind("127.0.0.1:0").await.unwrap());
    }
    let peer_addrs: Vec<SocketAddr> = peers.iter().map(|l| l.local_addr().unwrap()).collect();
    let mut nodes = Vec::new();
    for (i, (peer, client)) in peers.into_iter().zip(clients).enumerate() {
        let dir = tempfile::tempdir().unwrap();
        let client_addr = client.local_addr().unwrap();
        let seeds: String = (0..names.len())
            .filter(|j| *j != i)
            .map(|j| format!("      {}: {}\n", names[j], peer_addrs[j]))
            .collect();
        agentstore_trust::admit(&AUTHORITY, names[i], dir.path(), &[]).unwrap();
        let yaml = format!(
            "storage:\n  node_id: {}\n  data_dir: {}\n  replication:\n    strategy: quorum\n    replicas: 3\n    write_quorum: 2\n    read_quorum: 2\n{settings}  cluster:\n    client_addr: {client_addr}\n    peer_addr: {}\n    authority: {}\n    clients: open\n    peers:\n{seeds}",
            names[i],
            dir.path().display(),
            peer_addrs[i],
            AUTHORITY.public()
        );
        let config = Config::from_yaml(&yaml, "test.yaml").unwrap();
        let (stop, stopped) = oneshot::channel::<()>();
        let listeners = Listeners {
            clients: client,
            peers: peer,
            resp: None,
        };
        let task = tokio::spawn(async move {
            server::run(config, listeners, async {
                let _ = stopped.await;
            })
            .await
            .unwrap();
        });
        nodes.push(TestNode {
            client: client_addr,
            stop: Some(stop),
            task,
            _dir: dir,
        });
    }
    // Every node sees the three members alive.
    for node in &nodes {
        let client = NodeClient::new(&node.client.to_string());
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok(status) = client.status().await {
                let alive = status
                    .members
                    .iter()
                    .filter(|m| m.liveness == "alive")
                    .count();
                if alive == 3 {
                    break;
                }
            }
            assert!(Instant::now() < deadline, "the cluster never formed");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    nodes
}

impl TestNode {
    /// Stops this node (its server and its member of the cluster).
    pub(crate) async fn stop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
            (&mut self.task).await.unwrap();
        }
    }
}

pub(crate) async fn stop(nodes: Vec<TestNode>) {
    for mut node in nodes {
        node.stop().await;
    }
}
