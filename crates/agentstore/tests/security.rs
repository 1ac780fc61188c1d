//! Peer trust on real processes: only nodes the cluster's authority admitted take part.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use agentstore_core::replication::Message;
use agentstore_engine::testkit::free_port;
use agentstore_wire::{Envelope, encode_frame};
use common::{
    NodeProcess, cli, cluster, eventually, http, http_bearer, issue_token, node, nodes,
    token_cluster,
};

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

/// Three nodes that hold `notes:secret` = "s3cret".
fn cluster_holding_a_secret(dir: &std::path::Path) -> Vec<NodeProcess> {
    let nodes = cluster(dir, COLLECTIONS);
    let (status, body) = http(
        nodes[0].client,
        "PUT",
        "/v1/keys/notes:secret",
        "\"s3cret\"",
    )
    .unwrap();
    assert_eq!(status, 200, "{body}");
    nodes
}

#[test]
fn a_process_its_authority_never_admitted_cannot_join_read_or_write() {
    let dir = tempfile::tempdir().unwrap();
    let nodes = cluster_holding_a_secret(dir.path());
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
    let nodes = cluster_holding_a_secret(dir.path());
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

fn error_code(body: &str) -> String {
    let body: serde_json::Value = serde_json::from_str(body).unwrap_or_default();
    body["error"]["code"].as_str().unwrap_or("").to_owned()
}

#[test]
fn a_client_may_do_only_what_its_token_grants() {
    let dir = tempfile::tempdir().unwrap();
    let nodes = token_cluster(dir.path(), COLLECTIONS);
    let a = nodes[0].client;
    let issue = |rights: &[&str]| issue_token(dir.path(), rights);
    let notes = issue(&["--read", "notes:", "--write", "notes:"]);
    let admin = issue(&["--admin", "--read", ""]);

    // No token, a malformed one: 401, with the stable error body.
    let (status, body) = http(a, "PUT", "/v1/keys/notes:a", "1").unwrap();
    assert_eq!(
        (status, error_code(&body).as_str()),
        (401, "unauthenticated"),
        "{body}"
    );
    let (status, body) =
        http_bearer(a, "GET", "/v1/keys/notes:a", "", "agentstore-token-v1:AAAA").unwrap();
    assert_eq!(
        (status, error_code(&body).as_str()),
        (401, "invalid_token"),
        "{body}"
    );
    // /healthz stays open (load balancers), everything else is behind a token.
    assert_eq!(http(a, "GET", "/healthz", "").unwrap().0, 200);
    assert_eq!(http(a, "GET", "/v1/status", "").unwrap().0, 401);

    // Its own collection: yes; another: 403, and nothing written.
    let (status, body) = http_bearer(a, "PUT", "/v1/keys/notes:a", "1", &notes).unwrap();
    assert_eq!(status, 200, "{body}");
    let (status, body) =
        http_bearer(nodes[1].client, "GET", "/v1/keys/notes:a", "", &notes).unwrap();
    assert_eq!(status, 200, "{body}");
    for (method, path) in [
        ("PUT", "/v1/keys/ledger:a"),
        ("GET", "/v1/keys/ledger:a"),
        ("POST", "/v1/counters/ledger:a"),
        ("GET", "/v1/scan/ledger"),
        ("POST", "/v1/raft/voters"),
        ("POST", "/v1/leave"),
    ] {
        let (status, body) = http_bearer(a, method, path, "{\"delta\": 1}", &notes).unwrap();
        assert_eq!(
            (status, error_code(&body).as_str()),
            (403, "forbidden"),
            "{method} {path}: {body}"
        );
    }
    // A transaction is checked key by key: one key outside the token refuses all of it.
    let transaction =
        r#"{"writes": [{"key": "notes:t", "set": 1}, {"key": "ledger:t", "set": 1}]}"#;
    let (status, body) = http_bearer(a, "POST", "/v1/transactions", transaction, &notes).unwrap();
    assert_eq!(status, 403, "{body}");
    let (status, _) = http_bearer(a, "GET", "/v1/keys/notes:t", "", &admin).unwrap();
    assert_eq!(status, 404, "the refused transaction wrote nothing");
    let (status, body) = http_bearer(a, "GET", "/v1/keys/ledger:a", "", &admin).unwrap();
    assert_eq!(status, 404, "{body}");
    // The admin token reaches the cluster's administration.
    let (status, body) = http_bearer(a, "POST", "/v1/repair", "", &admin).unwrap();
    assert_eq!(status, 200, "{body}");

    // Narrowed offline by its holder: read-only.
    let (code, read_only, stderr) = cli(&["token", "attenuate", &notes, "--read", "notes:"]);
    assert_eq!(code, 0, "{stderr}");
    assert_eq!(
        http_bearer(a, "GET", "/v1/keys/notes:a", "", &read_only)
            .unwrap()
            .0,
        200
    );
    assert_eq!(
        http_bearer(a, "PUT", "/v1/keys/notes:a", "2", &read_only)
            .unwrap()
            .0,
        403
    );

    // Altered by one character, or granted by another authority: 401.
    let mut altered = notes.clone().into_bytes();
    let last = altered.len() - 10;
    altered[last] = if altered[last] == b'A' { b'B' } else { b'A' };
    let altered = String::from_utf8(altered).unwrap();
    let (status, body) = http_bearer(a, "GET", "/v1/keys/notes:a", "", &altered).unwrap();
    assert_eq!(
        (status, error_code(&body).as_str()),
        (401, "invalid_token"),
        "{body}"
    );
    let stranger = dir.path().join("stranger.key");
    assert_eq!(cli(&["authority", "new", stranger.to_str().unwrap()]).0, 0);
    let (_, foreign, _) = cli(&[
        "token",
        "issue",
        "--authority",
        stranger.to_str().unwrap(),
        "--read",
        "",
    ]);
    assert_eq!(
        http_bearer(a, "GET", "/v1/keys/notes:a", "", &foreign)
            .unwrap()
            .0,
        401
    );

    // Expired.
    let brief = issue(&["--read", "notes:", "--ttl", "1s"]);
    assert_eq!(
        http_bearer(a, "GET", "/v1/keys/notes:a", "", &brief)
            .unwrap()
            .0,
        200
    );
    std::thread::sleep(Duration::from_millis(1500));
    let (status, body) = http_bearer(a, "GET", "/v1/keys/notes:a", "", &brief).unwrap();
    assert_eq!(
        (status, error_code(&body).as_str()),
        (401, "token_expired"),
        "{body}"
    );

    // The CLI presents --token (or AGENTSTORE_TOKEN); without one the node refuses it.
    let node = a.to_string();
    let (code, out, stderr) = cli(&["--node", &node, "--token", &notes, "get", "notes:a"]);
    assert_eq!((code, out.as_str()), (0, "1"), "{stderr}");
    let (code, _, stderr) = cli(&["--node", &node, "put", "notes:b", "1"]);
    assert_ne!(code, 0);
    assert!(stderr.contains("unauthenticated"), "{stderr}");
    let (code, _, stderr) = cli(&["--node", &node, "--token", &notes, "put", "ledger:b", "1"]);
    assert_ne!(code, 0);
    assert!(stderr.contains("forbidden"), "{stderr}");
}

#[test]
fn the_client_api_speaks_https_with_a_certificate_from_the_authority() {
    let dir = tempfile::tempdir().unwrap();
    let mut nodes = nodes(dir.path(), COLLECTIONS);
    for node in &nodes {
        node.configure("clients: open", "clients: tokens\n    client_tls: true");
    }
    let authority = agentstore_trust::SecretKey::load(&dir.path().join("authority.key")).unwrap();
    let ca = dir.path().join("authority.crt");
    std::fs::write(
        &ca,
        agentstore_trust::authority_certificate(&authority).unwrap(),
    )
    .unwrap();
    let ca = ca.to_str().unwrap().to_owned();
    let everything = agentstore_trust::Right::new(
        &[
            agentstore_trust::Operation::Read,
            agentstore_trust::Operation::Write,
        ],
        "",
    )
    .unwrap();
    let token = agentstore_trust::Capability::issue(&authority, vec![everything], 0)
        .unwrap()
        .to_text();
    for node in &mut nodes {
        let log = std::fs::File::create(&node.log).unwrap();
        node.child = Some(
            Command::new(env!("CARGO_BIN_EXE_agentstore"))
                .args(["node", "--config"])
                .arg(&node.config)
                .env_remove("AGENTSTORE_DATA_DIR")
                .stdout(Stdio::null())
                .stderr(log)
                .spawn()
                .unwrap(),
        );
    }
    let addr = |i: usize| nodes[i].client.to_string();
    eventually("the nodes answer over HTTPS", || {
        let (code, _, stderr) = cli(&[
            "--node",
            &addr(0),
            "--ca-cert",
            &ca,
            "--token",
            &token,
            "status",
        ]);
        if code == 0 { Ok(()) } else { Err(stderr) }
    });
    eventually("a write through node-a", || {
        let (code, _, stderr) = cli(&[
            "--node",
            &addr(0),
            "--ca-cert",
            &ca,
            "--token",
            &token,
            "put",
            "notes:tls",
            "1",
        ]);
        if code == 0 { Ok(()) } else { Err(stderr) }
    });
    let (code, out, stderr) = cli(&[
        "--node",
        &addr(2),
        "--ca-cert",
        &ca,
        "--token",
        &token,
        "get",
        "notes:tls",
    ]);
    assert_eq!((code, out.as_str()), (0, "1"), "{stderr}");
    // The RESP port speaks TLS with the same certificate, and takes the same token.
    let resp = |extra: &[&str]| {
        let out = Command::new("redis-cli")
            .args(["-h", "127.0.0.1", "-p", &nodes[1].resp.port().to_string()])
            .args(extra)
            .args(["--no-auth-warning", "--pass", &token, "GET", "notes:tls"])
            .output()
            .expect("redis-cli is installed");
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    };
    assert_eq!(resp(&["--tls", "--cacert", &ca]), "1");
    assert_ne!(
        resp(&[]),
        "1",
        "plaintext RESP gets no answer from a TLS port"
    );
    // Plain HTTP gets no answer from an HTTPS port.
    let plain = http(nodes[0].client, "GET", "/healthz", "");
    assert!(!matches!(plain, Ok((200, _))), "{plain:?}");
    // A client that trusts another authority refuses the node's certificate.
    let stranger = agentstore_trust::SecretKey::generate();
    let other_ca = dir.path().join("other.crt");
    std::fs::write(
        &other_ca,
        agentstore_trust::authority_certificate(&stranger).unwrap(),
    )
    .unwrap();
    let (code, _, stderr) = cli(&[
        "--node",
        &addr(1),
        "--ca-cert",
        other_ca.to_str().unwrap(),
        "--token",
        &token,
        "get",
        "notes:tls",
    ]);
    assert_ne!(code, 0);
    assert!(stderr.contains("TLS"), "{stderr}");
}

/// Every byte of the files under `dir`.
fn files_under(dir: &std::path::Path) -> Vec<u8> {
    let mut all = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            all.extend(files_under(&path));
        } else if path.is_file() {
            all.extend(std::fs::read(path).unwrap_or_default());
        }
    }
    all
}

#[test]
fn an_encrypted_collection_is_ciphertext_on_every_replica() {
    let dir = tempfile::tempdir().unwrap();
    let collections = "  collections:\n    notes: {}\n    keys: { encrypted: true }\n    vault: { encrypted: true, consistency: strong }\n";
    let key = "KioqKioqKioqKioqKioqKioqKioqKioqKioqKioqKio";
    let mut nodes = nodes(dir.path(), collections);
    for node in &mut nodes {
        node.env
            .push(("AGENTSTORE_ENCRYPTION_KEY".into(), key.into()));
    }
    for node in &mut nodes {
        node.start();
    }
    for (path, secret) in [
        ("/v1/keys/keys:agent-1", "EVENTUAL-SECRET"),
        ("/v1/keys/vault:agent-1", "STRONG-SECRET"),
        ("/v1/keys/notes:agent-1", "PUBLIC-NOTE"),
    ] {
        let (status, body) = http(nodes[0].client, "PUT", path, &format!("\"{secret}\"")).unwrap();
        assert_eq!(status, 200, "{body}");
    }
    eventually("every replica serves the decrypted values", || {
        for node in &nodes {
            for (path, secret) in [
                ("/v1/keys/keys:agent-1", "EVENTUAL-SECRET"),
                ("/v1/keys/vault:agent-1", "STRONG-SECRET"),
            ] {
                let (_, body) = http(node.client, "GET", path, "").map_err(|e| e.to_string())?;
                if !body.contains(secret) {
                    return Err(format!("{path}: {body}"));
                }
            }
        }
        Ok(())
    });
    // Replicated everywhere (the control value reached every node's files), in the clear
    // nowhere.
    eventually("the control value on every node's disk", || {
        for node in &nodes {
            if !files_under(&node.data)
                .windows(11)
                .any(|w| w == b"PUBLIC-NOTE")
            {
                return Err(format!("{} has not written it yet", node.data.display()));
            }
        }
        Ok(())
    });
    for node in &nodes {
        let bytes = files_under(&node.data);
        for secret in ["EVENTUAL-SECRET", "STRONG-SECRET"] {
            assert!(
                !bytes.windows(secret.len()).any(|w| w == secret.as_bytes()),
                "{secret} is in the clear in {}",
                node.data.display()
            );
        }
    }
    // A node started without the key refuses to start rather than serve ciphertext.
    let mut keyless = node(
        dir.path(),
        "node-d",
        free_port(),
        &[
            ("node-a", nodes[0].peer_port),
            ("node-b", nodes[1].peer_port),
        ],
        collections,
    );
    let output = Command::new(env!("CARGO_BIN_EXE_agentstore"))
        .args(["node", "--config"])
        .arg(&keyless.config)
        .env_remove("AGENTSTORE_ENCRYPTION_KEY")
        .env_remove("AGENTSTORE_ENCRYPTION_KEY_FILE")
        .env_remove("AGENTSTORE_DATA_DIR")
        .output()
        .unwrap();
    keyless.child = None;
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_ne!(output.status.code(), Some(0));
    assert!(stderr.contains("AGENTSTORE_ENCRYPTION_KEY"), "{stderr}");
}

/// Sends `messages` to every node of `nodes` as "mallory": a process the authority admitted,
/// so its link is trusted, that sends records it forged.
fn as_an_admitted_node(
    dir: &std::path::Path,
    nodes: &[NodeProcess],
    messages: impl Fn() -> Vec<Message>,
) {
    use agentstore_cluster::{PeerSecurity, PeerTrust, Transport};
    use agentstore_core::NodeId;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let (authority, _) =
            agentstore_trust::SecretKey::load_or_create(&dir.join("authority.key")).unwrap();
        let trust = PeerTrust::generate(&authority, "mallory").unwrap();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let (_stop, stopped) = tokio::sync::watch::channel(false);
        let names = ["node-a", "node-b", "node-c"].map(|n| NodeId::new(n).unwrap());
        let peers = names
            .iter()
            .zip(nodes)
            .map(|(id, node)| (id.clone(), ([127, 0, 0, 1], node.peer_port).into()))
            .collect();
        let (transport, _inbox) = Transport::start(
            NodeId::new("mallory").unwrap(),
            PeerSecurity::Tls(std::sync::Arc::new(trust)),
            listener,
            peers,
            stopped,
            prometheus_client::metrics::family::Family::default(),
        );
        for id in &names {
            for message in messages() {
                transport.send(id, Envelope::new(message));
            }
        }
        // Time for the links to open and the frames to go out.
        tokio::time::sleep(Duration::from_secs(2)).await;
    });
}

#[test]
fn a_forged_or_altered_signed_record_is_refused_by_every_replica() {
    use agentstore_core::causal::CausalWrite;
    use agentstore_core::record::{self, Mutation};
    use agentstore_core::{HybridClock, Key, NodeId, VersionVector};

    let dir = tempfile::tempdir().unwrap();
    let collections = "  collections:\n    posts: { signed: true }\n    feed: { signed: true, consistency: causal }\n    ledger: { signed: true, consistency: strong }\n";
    let nodes = cluster(dir.path(), collections);
    let authority = dir.path().join("authority.key");
    let public = dir.path().join("authority.key.pub");
    std::fs::write(
        &public,
        common::admit(dir.path(), "node-a", &nodes[0].data).to_string(),
    )
    .unwrap();
    let (code, token, stderr) = cli(&[
        "token",
        "issue",
        "--authority",
        authority.to_str().unwrap(),
        "--read",
        "",
        "--write",
        "posts:",
        "--write",
        "feed:",
        "--write",
        "ledger:",
    ]);
    assert_eq!(code, 0, "{stderr}");
    let a = format!("127.0.0.1:{}", nodes[0].client.port());

    // Signed writes at every level, through the CLI; an unsigned one is refused.
    for key in ["posts:hello", "feed:hello", "ledger:hello"] {
        let (code, _, stderr) = cli(&["--node", &a, "--token", &token, "--sign", "put", key, "hi"]);
        assert_eq!(code, 0, "{key}: {stderr}");
    }
    let (status, body) = http(nodes[0].client, "PUT", "/v1/keys/posts:plain", "1").unwrap();
    assert_eq!(
        (status, error_code(&body).as_str()),
        (403, "signature_required"),
        "{body}"
    );
    // An HTTP client signs offline and sends only the attestation; one made for another
    // value is refused.
    let (code, attestation, stderr) = cli(&["token", "sign", &token, "posts:curl", "{\"n\": 1}"]);
    assert_eq!(code, 0, "{stderr}");
    let header = ("agentstore-attestation", attestation.as_str());
    let (status, body) = common::http_header(
        nodes[1].client,
        "PUT",
        "/v1/keys/posts:curl",
        "{\"n\": 2}",
        header,
    )
    .unwrap();
    assert_eq!(
        (status, error_code(&body).as_str()),
        (403, "signature_refused"),
        "{body}"
    );
    let (status, body) = common::http_header(
        nodes[1].client,
        "PUT",
        "/v1/keys/posts:curl",
        "{\"n\": 1}",
        header,
    )
    .unwrap();
    assert_eq!(status, 200, "{body}");

    // Mallory, an admitted node, sends every node records it made up: the signed value
    // altered (and stamped later, so it would win), a record with no signature, and one
    // signed under another authority; by replication and by causal broadcast.
    let signer = agentstore_trust::Capability::from_text(&token).unwrap();
    let stranger = agentstore_trust::Capability::issue(
        &agentstore_trust::SecretKey::generate(),
        vec![agentstore_trust::Right::new(&[agentstore_trust::Operation::Write], "").unwrap()],
        0,
    )
    .unwrap();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64;
    let made_up =
        |key: &str, value: &str, signed_value: &str, by: &agentstore_trust::Capability| {
            let attestation = by
                .sign_write(key, Some(signed_value.as_bytes()), now)
                .unwrap()
                .encode();
            let mutation = Mutation::Signed {
                value: Some(value.as_bytes().to_vec()),
                attestation,
            };
            let mut clock = HybridClock::new(NodeId::new("mallory").unwrap(), 60_000);
            record::apply(None, &mutation, &mut clock, now + 1_000).unwrap()
        };
    let messages = || {
        let mut unsigned = made_up("posts:new", "\"x\"", "\"x\"", &signer);
        unsigned.attestation = None;
        let replicate = |key: &str, record| Message::Replicate {
            request: 0,
            key: Key::new(key).unwrap(),
            record,
        };
        vec![
            replicate(
                "posts:hello",
                made_up("posts:hello", "\"forged\"", "\"hi\"", &signer),
            ),
            replicate("posts:new", unsigned),
            replicate(
                "posts:other",
                made_up("posts:other", "\"x\"", "\"x\"", &stranger),
            ),
            Message::CausalWrites {
                writes: vec![CausalWrite {
                    origin: NodeId::new("mallory").unwrap(),
                    seq: 1,
                    deps: VersionVector::new(),
                    entries: vec![(
                        Key::new("feed:hello").unwrap(),
                        made_up("feed:hello", "\"forged\"", "\"hi\"", &signer),
                    )],
                }],
            },
        ]
    };
    as_an_admitted_node(dir.path(), &nodes, messages);

    for (i, node) in nodes.iter().enumerate() {
        let name = ["node-a", "node-b", "node-c"][i];
        let addr = format!("127.0.0.1:{}", node.client.port());
        eventually("the node counts what it refused", || {
            let (_, status) = http(node.client, "GET", "/v1/status", "").unwrap();
            let status: serde_json::Value = serde_json::from_str(&status).unwrap_or_default();
            let refused = status["signed_writes_refused"].as_u64().unwrap_or(0);
            (refused >= 4)
                .then_some(())
                .ok_or(format!("{name} refused {refused}"))
        });
        let (_, body) = http(node.client, "GET", "/v1/keys/posts:curl", "").unwrap();
        let read: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(read["value"]["n"], 1, "{body}");
        assert_eq!(read["signed"]["author"], signer.author().to_string());
        for key in ["posts:hello", "feed:hello", "ledger:hello"] {
            let args = ["--node", &addr, "--json", "get", "--verify"];
            let (code, out, stderr) = cli(&[&args[..], &[public.to_str().unwrap(), key]].concat());
            assert_eq!(code, 0, "{key} on {name}: {stderr}");
            let read: serde_json::Value = serde_json::from_str(&out).unwrap();
            assert_eq!(read["value"], "hi", "{key} on {name}");
            assert_eq!(read["signed"]["author"], signer.author().to_string());
        }
        for key in ["posts:new", "posts:other"] {
            let (code, _, _) = cli(&["--node", &addr, "get", key]);
            assert_eq!(code, 3, "{key} must not exist on {name}");
        }
    }
}
