//! Three `agentstore node` processes on loopback: replication, a node killed with SIGKILL and
//! restarted (hinted handoff), graceful stop with SIGTERM.

mod common;

use common::{cli, cluster, http};
use std::process::Command;
use std::time::{Duration, Instant};

const COLLECTIONS: &str = "  collections:\n    metrics:\n      conflict: pn_counter\n";

#[test]
fn three_node_processes_replicate_survive_a_kill_and_stop_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    let mut nodes = cluster(dir.path(), COLLECTIONS);
    let (a, c) = (nodes[0].client, nodes[2].client);

    let (status, body) =
        http(a, "PUT", "/v1/keys/agent:identity:123", r#"{"name":"ada"}"#).unwrap();
    assert_eq!(status, 200, "{body}");
    let (status, body) = http(c, "GET", "/v1/keys/agent:identity:123", "").unwrap();
    assert_eq!(
        (status, body.contains(r#""value":{"name":"ada"}"#)),
        (200, true),
        "{body}"
    );

    for node in &nodes {
        for _ in 0..5 {
            let (status, body) = http(
                node.client,
                "POST",
                "/v1/counters/metrics:requests",
                r#"{"delta":1}"#,
            )
            .unwrap();
            assert_eq!(status, 200, "{body}");
        }
    }
    let (_, body) = http(a, "GET", "/v1/keys/metrics:requests", "").unwrap();
    assert!(
        body.contains(r#""value":15"#),
        "increments from every node are exact: {body}"
    );

    let (status, _) = http(c, "DELETE", "/v1/keys/agent:identity:123", "").unwrap();
    assert_eq!(status, 200);
    let (status, body) = http(a, "GET", "/v1/keys/agent:identity:123", "").unwrap();
    assert_eq!(status, 404, "a delete on C is seen on A: {body}");

    // node-b is killed; writes still reach W=2 of N=3.
    nodes[1].signal("-KILL");
    let (status, body) = http(
        a,
        "PUT",
        "/v1/keys/doc:missed",
        r#""written while b was down""#,
    )
    .unwrap();
    assert_eq!(status, 200, "{body}");
    // node-b restarts and receives what it missed through hints; a graceful stop exits 0.
    std::thread::sleep(Duration::from_millis(2500));
    nodes[1].start();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        std::thread::sleep(Duration::from_millis(1500));
        assert_eq!(
            nodes[1].signal("-TERM"),
            Some(0),
            "SIGTERM stops a node cleanly"
        );
        let read = Command::new(env!("CARGO_BIN_EXE_agentstore"))
            .arg("--data-dir")
            .arg(&nodes[1].data)
            .args(["get", "doc:missed"])
            .output()
            .unwrap();
        if String::from_utf8_lossy(&read.stdout).trim() == r#""written while b was down""# {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "node-b never received the write it missed"
        );
        nodes[1].start();
    }
    let (status, metrics) = http(a, "GET", "/metrics", "").unwrap();
    assert_eq!(status, 200);
    assert!(
        metrics.contains(r#"agentstore_node_requests_total{op="write",outcome="ok"}"#),
        "{metrics}"
    );
    assert!(
        metrics.contains("agentstore_node_hints_stored_total"),
        "{metrics}"
    );
    assert!(
        metrics
            .contains(r#"agentstore_engine_operation_seconds_count{backend="local",op="commit"}"#),
        "{metrics}"
    );
    assert_eq!(nodes[0].signal("-TERM"), Some(0));
    assert_eq!(nodes[2].signal("-TERM"), Some(0));
}

#[test]
fn the_cli_talks_to_nodes_status_repair_and_leave() {
    let dir = tempfile::tempdir().unwrap();
    let mut nodes = cluster(dir.path(), COLLECTIONS);
    let addr = |i: usize| nodes[i].client.to_string();
    let (a, c) = (addr(0), addr(2));

    // Every member alive, as A sees it (membership needs a moment after the processes start).
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (code, out, err) = cli(&["--node", &a, "--json", "status"]);
        assert_eq!(code, 0, "{err}");
        let status: serde_json::Value = serde_json::from_str(&out).unwrap();
        let alive = status["members"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|m| m["liveness"] == "alive")
            .count();
        if alive == 3 {
            break;
        }
        assert!(Instant::now() < deadline, "{out}");
        std::thread::sleep(Duration::from_millis(200));
    }
    let (code, out, _) = cli(&["--node", &a, "status"]);
    assert_eq!(code, 0);
    assert!(out.contains("node-b") && out.contains("alive"), "{out}");
    assert!(out.contains("delivers eventual"), "{out}");

    // The same commands as embedded, against the cluster.
    let (code, _, err) = cli(&["--node", &a, "put", "notes:cli", "{\"n\":1}"]);
    assert_eq!(code, 0, "{err}");
    let (code, out, _) = cli(&["--node", &c, "get", "notes:cli"]);
    assert_eq!((code, out.trim()), (0, "{\"n\":1}"));
    let (code, out, _) = cli(&["--node", &c, "counter", "add", "metrics:cli", "5"]);
    assert_eq!((code, out.trim()), (0, "5"));
    let (code, _, _) = cli(&["--node", &a, "get", "notes:absent"]);
    assert_eq!(code, 3, "not found exits 3 as embedded");
    let (code, _, err) = cli(&["--node", &a, "--consistency", "strong", "get", "notes:cli"]);
    assert_eq!(code, 2, "the cluster refuses strong: {err}");

    // Repair: a line per member in JSON, a progress bar otherwise.
    let (code, out, err) = cli(&["--node", &a, "--json", "repair"]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(out.lines().count(), 2, "{out}");
    let (code, out, err) = cli(&["--node", &a, "repair"]);
    assert_eq!(code, 0, "{err}");
    assert!(
        err.contains("2/2") && out.contains("repair done"),
        "{out}{err}"
    );

    // C leaves for good: its process stops, A and B keep every key.
    let (code, _, err) = cli(&["--node", &c, "leave"]);
    assert_eq!(code, 0, "{err}");
    let exited = nodes[2].child.as_mut().unwrap().wait().unwrap();
    assert!(exited.success(), "a node that left exits 0");
    nodes[2].child = None;
    let (code, out, _) = cli(&["--node", &a, "get", "notes:cli"]);
    assert_eq!((code, out.trim()), (0, "{\"n\":1}"));
    let (code, out, _) = cli(&["--node", &a, "--json", "status"]);
    assert_eq!(code, 0);
    let status: serde_json::Value = serde_json::from_str(&out).unwrap();
    let ids: Vec<&str> = status["members"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["node-a", "node-b"]);
    assert_eq!(nodes[0].signal("-TERM"), Some(0));
    assert_eq!(nodes[1].signal("-TERM"), Some(0));
}

/// Runs the CLI, killing it if it has not ended within `limit`; returns (ended by itself,
/// exit code, stderr).
fn cli_within(args: &[&str], limit: Duration) -> (bool, i32, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_agentstore"))
        .args(args)
        .env_remove("AGENTSTORE_DATA_DIR")
        .env_remove("AGENTSTORE_CONFIG")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + limit;
    let ended = loop {
        if child.try_wait().unwrap().is_some() {
            break true;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            break false;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let out = child.wait_with_output().unwrap();
    (
        ended,
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn the_cli_gives_up_on_a_paused_node_after_its_timeout() {
    let dir = tempfile::tempdir().unwrap();
    let mut nodes = cluster(dir.path(), COLLECTIONS);
    let addr = nodes[0].client.to_string();
    let pid = nodes[0].child.as_ref().unwrap().id().to_string();
    Command::new("kill").args(["-STOP", &pid]).status().unwrap();
    let limit = Duration::from_secs(20);
    let (ended, code, stderr) = cli_within(
        &["--node", &addr, "--timeout-ms", "500", "get", "notes:x"],
        limit,
    );
    assert!(ended, "a read hung on a paused node");
    assert_ne!(code, 0);
    assert!(stderr.contains("no answer from"), "{stderr}");
    let (ended, code, stderr) = cli_within(
        &[
            "--node",
            &addr,
            "--timeout-ms",
            "500",
            "put",
            "notes:x",
            "1",
        ],
        limit,
    );
    assert!(ended, "a write hung on a paused node");
    assert_ne!(code, 0);
    // The client asks the node for its collections' settings first: nothing was sent.
    assert!(stderr.contains("no answer from"), "{stderr}");
    // Resumed, it answers again: the key was never written (exit code 3, not found).
    Command::new("kill").args(["-CONT", &pid]).status().unwrap();
    let (ended, code, stderr) = cli_within(&["--node", &addr, "get", "notes:x"], limit);
    assert!(ended, "{stderr}");
    assert_eq!(code, 3, "{stderr}");
    nodes[0].signal("-TERM");
}

/// `AGENTSTORE_LOG_FORMAT=json`: a node logs one JSON object per line; without a terminal,
/// text logs carry no colour codes either.
#[test]
fn node_logs_are_json_lines_on_request_and_never_coloured_in_a_file() {
    let dir = tempfile::tempdir().unwrap();
    let mut nodes = common::nodes(dir.path(), COLLECTIONS);
    nodes[0]
        .env
        .push(("AGENTSTORE_LOG_FORMAT".into(), "json".into()));
    for node in &mut nodes {
        node.start();
    }
    for node in &mut nodes {
        assert_eq!(node.signal("-TERM"), Some(0));
    }
    let json = std::fs::read_to_string(&nodes[0].log).unwrap();
    let lines: Vec<&str> = json.lines().filter(|l| !l.trim().is_empty()).collect();
    assert!(!lines.is_empty(), "the node logged nothing");
    for line in &lines {
        let entry: serde_json::Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("not a JSON line ({e}): {line}"));
        assert!(
            entry["level"].is_string() && entry["fields"].is_object(),
            "{line}"
        );
    }
    let text = std::fs::read_to_string(&nodes[1].log).unwrap();
    assert!(!text.is_empty(), "the node logged nothing");
    assert!(
        !text.contains('\u{1b}'),
        "colour codes in a log file: {text}"
    );
}
