//! Peer trust on real processes: only nodes the cluster's authority admitted take part.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use agentstore_core::replication::Message;
use agentstore_engine::testkit::free_port;
use agentstore_wire::{Envelope, encode_frame};
use common::{cluster, eventually, http, node};

const COLLECTIONS: &str = "  collections:\n    notes: {}\n";

fn members(status: &str) -> Vec<String> {
    let status: serde_json::Value = serde_json::from_str(status).unwrap_or_default();
    status["members"]
        .as_array()
        .map(|members| {
            members
                .iter()
                .filter_map(|m| m["id"].as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn a_process_its_authority_never_admitted_cannot_join_read_or_write() {
    let dir = tempfile::tempdir().unwrap();
    let nodes = cluster(dir.path(), COLLECTIONS);
    let (status, body) = http(
        nodes[0].client,
        "PUT",
        "/v1/keys/notes:secret",
        "\"s3cret\"",
    )
    .unwrap();
    assert_eq!(status, 200, "{body}");
    // A stranger: its own authority (another directory), seeded with every member.
    let elsewhere = tempfile::tempdir().unwrap();
    let seeds: Vec<(&str, u16)> = ["node-a", "node-b", "node-c"]
        .into_iter()
        .zip(nodes.iter().map(|n| n.peer_port))
        .collect();
    let mut stranger = node(elsewhere.path(), "node-d", free_port(), &seeds, COLLECTIONS);
    stranger.start();
    // Long enough for several gossip rounds and anti-entropy rounds (1 s each).
    std::thread::sleep(Duration::from_secs(3));
    for member in &nodes {
        let (_, status) = http(member.client, "GET", "/v1/status", "").unwrap();
        let seen = members(&status);
        assert_eq!(seen, ["node-a", "node-b", "node-c"], "{status}");
    }
    // Nothing of the cluster's reaches it, and nothing it writes reaches the cluster.
    let (_, read) = http(stranger.client, "GET", "/v1/keys/notes:secret", "").unwrap();
    assert!(!read.contains("s3cret"), "the stranger read {read}");
    let _ = http(
        stranger.client,
        "PUT",
        "/v1/keys/notes:secret",
        "\"forged\"",
    );
    let _ = http(stranger.client, "PUT", "/v1/keys/notes:planted", "\"x\"");
    std::thread::sleep(Duration::from_secs(2));
    for member in &nodes {
        let (_, body) = http(member.client, "GET", "/v1/keys/notes:secret", "").unwrap();
        assert!(body.contains("s3cret"), "{body}");
        let (status, body) = http(member.client, "GET", "/v1/keys/notes:planted", "").unwrap();
        assert_eq!(status, 404, "{body}");
    }
    let log = std::fs::read_to_string(&nodes[0].log).unwrap_or_default();
    assert!(
        log.contains("refused"),
        "node-a's log says nothing of the refusal:\n{log}"
    );
}

/// What a peer port answers to `bytes` sent in plaintext, read until it closes (5 s at most).
fn answer_to(port: u16, bytes: &[u8]) -> Vec<u8> {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let _ = stream.write_all(bytes);
    let mut answer = Vec::new();
    let _ = stream.read_to_end(&mut answer);
    answer
}

#[test]
fn raw_frames_on_the_peer_port_reveal_and_change_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let nodes = cluster(dir.path(), COLLECTIONS);
    let (status, _) = http(
        nodes[0].client,
        "PUT",
        "/v1/keys/notes:secret",
        "\"s3cret\"",
    )
    .unwrap();
    assert_eq!(status, 200);
    // What a plaintext node would have taken from node-b: a scan of every key, then
    // node-b's departure.
    let mut attack = 6u32.to_be_bytes().to_vec();
    attack.extend_from_slice(b"node-b");
    attack.extend(encode_frame(&Envelope::new(Message::Scan {
        request: 1,
        prefix: Vec::new(),
        after: None,
        limit: 1000,
    })));
    attack.extend(encode_frame(&Envelope::new(Message::Leaving)));
    let answer = answer_to(nodes[0].peer_port, &attack);
    assert!(
        !answer.windows(6).any(|w| w == b"s3cret") && !answer.windows(6).any(|w| w == b"secret"),
        "the peer port revealed a record: {answer:?}"
    );
    // Random bytes in place of a handshake, and a connection that says nothing.
    let _ = answer_to(nodes[0].peer_port, &[0x16, 0x03, 0x01, 0xff, 0xff, 1, 2, 3]);
    let silent = Instant::now();
    let _ = answer_to(nodes[0].peer_port, &[]);
    // The hello deadline is 5 s.
    assert!(
        silent.elapsed() < Duration::from_secs(12),
        "a silent connection was not closed at its hello deadline"
    );
    // node-b is still a member everywhere, and the cluster still serves quorum writes.
    std::thread::sleep(Duration::from_secs(1));
    for member in &nodes {
        let (_, status) = http(member.client, "GET", "/v1/status", "").unwrap();
        assert_eq!(members(&status), ["node-a", "node-b", "node-c"], "{status}");
    }
    eventually("a quorum write after the attack", || {
        match http(nodes[1].client, "PUT", "/v1/keys/notes:after", "1") {
            Ok((200, _)) => Ok(()),
            other => Err(format!("{other:?}")),
        }
    });
}

#[test]
fn an_admission_copied_to_another_key_does_not_start_a_node() {
    let dir = tempfile::tempdir().unwrap();
    let nodes = cluster(dir.path(), COLLECTIONS);
    // An impostor takes node-b's admission (the file, not node-b's key) and calls itself
    // node-b.
    let impostor = node(
        dir.path(),
        "impostor",
        free_port(),
        &[
            ("node-a", nodes[0].peer_port),
            ("node-c", nodes[2].peer_port),
        ],
        COLLECTIONS,
    );
    std::fs::copy(
        nodes[1].data.join("admission.token"),
        impostor.data.join("admission.token"),
    )
    .unwrap();
    let config = std::fs::read_to_string(&impostor.config)
        .unwrap()
        .replace("node_id: impostor", "node_id: node-b");
    std::fs::write(&impostor.config, config).unwrap();
    let output = Command::new(env!("CARGO_BIN_EXE_agentstore"))
        .args(["node", "--config"])
        .arg(&impostor.config)
        .env_remove("AGENTSTORE_DATA_DIR")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(4), "{stderr}");
    assert!(stderr.contains("admission is for key"), "{stderr}");
}

#[test]
fn a_node_without_an_admission_is_told_how_to_get_one() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("node-a");
    let config = dir.path().join("node-a.yaml");
    let authority = dir.path().join("authority.key");
    let agentstore = env!("CARGO_BIN_EXE_agentstore");
    let created = Command::new(agentstore)
        .args(["authority", "new"])
        .arg(&authority)
        .output()
        .unwrap();
    assert!(created.status.success());
    let public = std::fs::read_to_string(dir.path().join("authority.key.pub")).unwrap();
    assert!(String::from_utf8_lossy(&created.stdout).contains(public.trim()));
    std::fs::write(
        &config,
        format!(
            "storage:\n  node_id: node-a\n  data_dir: {}\n  cluster:\n    client_addr: 127.0.0.1:{}\n    peer_addr: 127.0.0.1:{}\n    authority: {}\n",
            data.display(),
            free_port(),
            free_port(),
            dir.path().join("authority.key.pub").display()
        ),
    )
    .unwrap();
    let refused = Command::new(agentstore)
        .args(["node", "--config"])
        .arg(&config)
        .env_remove("AGENTSTORE_DATA_DIR")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert_eq!(refused.status.code(), Some(4), "{stderr}");
    assert!(stderr.contains("agentstore admit"), "{stderr}");
    // The node's key was created at that first start; admitting keeps it.
    let key = agentstore_trust::SecretKey::load(&data.join("node.key"))
        .unwrap()
        .public();
    let admitted = Command::new(agentstore)
        .args(["admit", "--authority"])
        .arg(&authority)
        .args(["--name", "node-a", "--data-dir"])
        .arg(&data)
        .output()
        .unwrap();
    assert!(admitted.status.success());
    assert!(String::from_utf8_lossy(&admitted.stdout).contains(&key.to_string()));
    // The authority key is never overwritten.
    let again = Command::new(agentstore)
        .args(["authority", "new"])
        .arg(&authority)
        .output()
        .unwrap();
    assert!(!again.status.success());
}
