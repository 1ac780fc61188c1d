//! The node's client API, served by three in-process nodes on loopback (`server::run`, the
//! function `agentstore node` runs): the OpenAPI document matches what is served, a
//! `Storage` connected to a node behaves as an embedded one at the level the cluster
//! delivers, and status, repair and scan see the whole cluster.

use std::net::SocketAddr;

use agentstore_engine::EngineError;
use p2p_ai_agents::storage::server::{self, OPENAPI};
use p2p_ai_agents::storage::{
    Config, ConsistencyLevel, NodeClient, Session, Storage, StorageError,
};
use serde_json::{Value as Json, json};

const COLLECTIONS: &str = "  collections:
    metrics:
      conflict: pn_counter
    peers:
      conflict: or_set
    docs:
      conflict: multi_value
    agent:
      consistency: strong
    tasks:
      consistency: causal
";

mod common;

use common::{TestNode, cluster_with, stop};

async fn cluster() -> Vec<TestNode> {
    cluster_with(COLLECTIONS).await
}

/// `/metrics` is one valid exposition in the Prometheus text format: each family described
/// once, with all its samples after its description; and `promtool check metrics` accepts it
/// where promtool is installed.
fn exposition_is_valid(metrics: &str) {
    let mut described = std::collections::BTreeSet::new();
    let mut family = String::new();
    for line in metrics.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            family = rest.split_whitespace().next().unwrap().to_owned();
            assert!(described.insert(family.clone()), "{family} described twice");
        } else if !line.starts_with('#') && !line.is_empty() {
            assert!(
                line.starts_with(&family),
                "{line} outside its family {family}"
            );
        }
    }
    if let Ok(mut promtool) = std::process::Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
    {
        use std::io::Write as _;
        promtool
            .stdin
            .take()
            .unwrap()
            .write_all(metrics.as_bytes())
            .unwrap();
        let out = promtool.wait_with_output().unwrap();
        let said = String::from_utf8_lossy(&out.stderr).into_owned()
            + &String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "promtool check metrics: {said}");
    }
}

/// A minimal HTTP/1.1 exchange: (status, body).
async fn http(addr: SocketAddr, method: &str, path: &str, body: &str) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let request = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut response = Vec::new();
    stream.read_to_end(&mut response).await.unwrap();
    let response = String::from_utf8_lossy(&response);
    let status = response[9..12].parse().unwrap();
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    (status, body)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_openapi_document_describes_every_route_served() {
    let nodes = cluster().await;
    let a = nodes[0].client;
    let document: Json = serde_saphyr::from_str(OPENAPI).unwrap();
    let paths = document["paths"].as_object().unwrap();
    let documented: std::collections::BTreeSet<&str> = paths.keys().map(String::as_str).collect();
    let served: std::collections::BTreeSet<&str> = server::paths().into_iter().collect();
    assert_eq!(
        documented, served,
        "the document and the router list the same paths"
    );
    let mut operations = 0;
    let mut operation_ids = std::collections::BTreeSet::new();
    assert_eq!(
        document["components"]["parameters"]["session"]["name"],
        "agentstore-session"
    );
    for (path, item) in paths {
        for method in ["get", "put", "post", "delete"] {
            let Some(operation) = item.get(method) else {
                continue;
            };
            assert!(
                operation.get("summary").is_some() && operation.get("responses").is_some(),
                "{method} {path} lacks a summary or responses"
            );
            // Client generators name their methods by operationId: one per operation.
            let id = operation["operationId"]
                .as_str()
                .unwrap_or_else(|| panic!("{method} {path} lacks an operationId"));
            assert!(operation_ids.insert(id.to_owned()), "{id} is used twice");
            // Every data route takes the session header.
            if path.starts_with("/v1/keys")
                || path.starts_with("/v1/counters")
                || path.starts_with("/v1/sets")
                || path.starts_with("/v1/scan")
                || path.starts_with("/v1/records")
                || path.starts_with("/v1/transactions")
            {
                let session = serde_json::json!({"$ref": "#/components/parameters/session"});
                assert!(
                    item["parameters"]
                        .as_array()
                        .is_some_and(|p| p.contains(&session)),
                    "{path} does not take the session header"
                );
            }
            if path == "/v1/leave" {
                continue; // would stop the node; tested on its own below
            }
            let mut concrete = path
                .replace("{key}", "docs:openapi")
                .replace("{prefix}", "docs");
            if path == "/v1/watch/{prefix}" {
                // A stream that would not end: a bad position answers at once, and shows the
                // route is served.
                concrete.push_str("?after=not-a-position");
            }
            let body = match (method, path.as_str()) {
                ("put", _) => "\"x\"",
                ("post", "/v1/counters/{key}") => r#"{"delta":1}"#,
                ("post", "/v1/sets/{key}") => r#"{"add":1}"#,
                _ => "",
            };
            let (status, text) = http(a, &method.to_uppercase(), &concrete, body).await;
            // Served: anything but the router's own "no route" (404 without an error code) or
            // "method not allowed".
            assert!(
                status != 405 && (status != 404 || text.contains("not_found")),
                "{method} {path} is documented but not served: {status} {text}"
            );
            operations += 1;
        }
    }
    assert!(operations >= 14, "{operations} operations checked");
    // And an undocumented path is not served.
    assert_eq!(http(a, "GET", "/v1/undocumented", "").await.0, 404);
    stop(nodes).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_follows_its_client_from_node_to_node() {
    let nodes = cluster().await;
    let addr = |i: usize| nodes[i].client.to_string();
    let config = || Config::from_yaml(&format!("storage:\n{COLLECTIONS}"), "client.yaml").unwrap();
    let on_a = Storage::connect(&addr(0), config()).await.unwrap();
    let on_c = Storage::connect(&addr(2), config()).await.unwrap();
    assert_eq!(on_c.plan("tasks").guarantee.level, ConsistencyLevel::Causal);

    // Written through A in a session; the token names the write, and C serves the session
    // only with it (waiting for it if it has not arrived).
    let session = Session::new();
    session
        .run(on_a.set("tasks:a", json!({"title": "fetch"})))
        .await
        .unwrap();
    assert_eq!(session.token(), "node-a=1");
    let moved = Session::resume(&session.token()).unwrap();
    let read: Option<Json> = moved.run(on_c.get("tasks:a")).await.unwrap();
    assert_eq!(read, Some(json!({"title": "fetch"})));
    // A write through C in the same session depends on what it has seen.
    moved
        .run(on_c.set("tasks:b", json!({"after": "tasks:a"})))
        .await
        .unwrap();
    assert_eq!(moved.token(), "node-a=1,node-c=1");

    // A session that saw a write this cluster never made cannot be served: a typed refusal
    // after the node's wait, never an answer without it.
    let ahead = Session::resume("node-a=99").unwrap();
    let refused = ahead.run(on_c.get::<Json>("tasks:a")).await.unwrap_err();
    assert!(
        matches!(
            refused,
            StorageError::Engine(EngineError::SessionBehind { .. })
        ),
        "{refused:?}"
    );
    assert!(matches!(
        Session::resume("node-a"),
        Err(StorageError::InvalidSession(_))
    ));
    // The node counts the wait and the timeout.
    let (_, metrics) = http(nodes[2].client, "GET", "/metrics", "").await;
    exposition_is_valid(&metrics);
    let value = |name: &str| {
        metrics
            .lines()
            .find_map(|line| line.strip_prefix(name)?.trim().parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    assert!(
        value("agentstore_causal_session_timeouts_total") >= 1.0,
        "{metrics}"
    );
    assert!(value("agentstore_causal_session_waits_total") >= 1.0);
    assert!(metrics.contains("agentstore_causal_dependency_wait_seconds_bucket"));
    assert!(metrics.contains("agentstore_causal_buffered_updates"));
    // Over HTTP too.
    let (status, body) = http(nodes[1].client, "GET", "/v1/status", "").await;
    assert_eq!(status, 200);
    let status: Json = serde_json::from_str(&body).unwrap();
    assert!(status["causal"]["applied"].is_string(), "{status}");
    stop(nodes).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connected_storage_works_like_an_embedded_one_at_the_cluster_level() {
    let nodes = cluster().await;
    let addr = |i: usize| nodes[i].client.to_string();
    let config = || Config::from_yaml(&format!("storage:\n{COLLECTIONS}"), "client.yaml").unwrap();
    let on_a = Storage::connect(&addr(0), config()).await.unwrap();
    let on_c = Storage::connect(&addr(2), config()).await.unwrap();

    // The guarantee is the cluster's, with the node's N/W/R.
    let plan = on_a.plan("notes");
    assert_eq!(plan.guarantee.level, ConsistencyLevel::Eventual);
    assert!(
        plan.guarantee.summary.contains("N=3 W=2 R=2"),
        "{}",
        plan.guarantee.summary
    );

    // Registers: written through A, read through C.
    on_a.set("notes:1", json!({"text": "hello"})).await.unwrap();
    let read: Option<Json> = on_c.get("notes:1").await.unwrap();
    assert_eq!(read, Some(json!({"text": "hello"})));
    on_c.delete("notes:1").await.unwrap();
    assert_eq!(on_a.get::<Json>("notes:1").await.unwrap(), None);

    // A watch through a connected store: the node's feed, and its positions stay its own.
    let mut watch = on_c.watch("feed", None);
    let first = tokio::spawn(async move { (watch.next().await, watch) });
    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    on_a.set("feed:2", json!("watched")).await.unwrap();
    let (change, _watch) = first.await.unwrap();
    let change = change.unwrap();
    assert_eq!(
        (change.key.as_str(), change.value),
        ("feed:2", Some(json!("watched")))
    );
    let refused = on_a
        .changes(
            "notes",
            Some(change.position),
            10,
            std::time::Duration::ZERO,
        )
        .await
        .unwrap_err()
        .to_string();
    assert!(
        refused.starts_with(&format!("position {}", change.position))
            && refused.matches("position ").count() == 1,
        "one clear sentence: {refused}"
    );

    // Counters: increments through every node add up exactly.
    let mut tasks = Vec::new();
    for i in 0..3 {
        let storage = Storage::connect(&addr(i), config()).await.unwrap();
        tasks.push(tokio::spawn(async move {
            for _ in 0..10 {
                storage.counter_add("metrics:calls", 1).await.unwrap();
            }
        }));
    }
    for task in tasks {
        task.await.unwrap();
    }
    assert_eq!(on_a.counter("metrics:calls").await.unwrap(), 30);

    // Sets and siblings.
    on_a.set_add("peers:online", "p1").await.unwrap();
    on_c.set_add("peers:online", "p2").await.unwrap();
    on_a.set_remove("peers:online", "p1").await.unwrap();
    let members: Vec<String> = on_c.set_members("peers:online").await.unwrap();
    assert_eq!(members, ["p2"]);
    on_a.set("docs:plan", "from a").await.unwrap();
    on_c.set("docs:plan", "from c").await.unwrap();
    let siblings = on_a.get_siblings::<String>("docs:plan").await.unwrap();
    assert_eq!(siblings.values.len(), 2, "{siblings:?}");
    on_a.set_with_context("docs:plan", "merged", &siblings.context)
        .await
        .unwrap();
    let siblings = on_c.get_siblings::<String>("docs:plan").await.unwrap();
    assert_eq!(siblings.values, ["merged"]);

    // Scan sees keys written through every node.
    for i in 0..5 {
        Storage::connect(&addr(i % 3), config())
            .await
            .unwrap()
            .set(&format!("notes:k{i}"), i)
            .await
            .unwrap();
    }
    let keys: Vec<String> = on_a
        .scan("notes", None, 100)
        .await
        .unwrap()
        .into_iter()
        .map(|e| e.key)
        .collect();
    assert_eq!(
        keys,
        ["notes:k0", "notes:k1", "notes:k2", "notes:k3", "notes:k4"]
    );

    // A strong collection goes through the Raft group: written through one node, read
    // linearizably through another.
    on_a.set("agent:identity", "ada").await.unwrap();
    let on_c = Storage::connect(&addr(2), config()).await.unwrap();
    let read: Option<String> = on_c
        .get_with_consistency("agent:identity", ConsistencyLevel::Strong)
        .await
        .unwrap();
    assert_eq!(read.as_deref(), Some("ada"));
    // Compare-and-set and transactions from a remote client are applied by the node in one
    // log entry.
    let seen = on_c
        .get_versioned::<String>("agent:identity")
        .await
        .unwrap()
        .unwrap();
    on_a.compare_and_set("agent:identity", "bob", Some(&seen.version))
        .await
        .unwrap();
    let lost = on_c
        .compare_and_set("agent:identity", "eve", Some(&seen.version))
        .await
        .unwrap_err();
    assert!(
        matches!(lost, StorageError::VersionMismatch { .. }),
        "{lost}"
    );
    let mut pair = on_c.transaction();
    pair.set("agent:key:1", "pk1")
        .compare_and_set("agent:key:2", "pk2", None);
    assert_eq!(pair.commit().await.unwrap().len(), 2);
    let key2: Option<String> = on_a.get("agent:key:2").await.unwrap();
    assert_eq!(key2.as_deref(), Some("pk2"));
    let mut again = on_a.transaction();
    again
        .set("agent:key:1", "overwritten")
        .compare_and_set("agent:key:2", "pk2", None);
    let refused = again.commit().await.unwrap_err();
    assert!(
        matches!(refused, StorageError::VersionMismatch { .. }),
        "{refused}"
    );
    let key1: Option<String> = on_c.get("agent:key:1").await.unwrap();
    assert_eq!(
        key1.as_deref(),
        Some("pk1"),
        "a failed transaction writes nothing"
    );
    // Leaderless replication takes part in no batch: neither alone (no leader orders it) nor
    // beside the Raft group (it cannot prepare a two-phase commit).
    for keys in [["agent:key:3", "notes:k9"], ["notes:k8", "notes:k9"]] {
        let mut mixed = on_a.transaction();
        mixed.set(keys[0], "x").set(keys[1], "y");
        let refused = mixed.commit().await.unwrap_err();
        assert!(
            matches!(
                refused,
                StorageError::Engine(EngineError::Unsupported { .. })
            ),
            "{keys:?}: {refused}"
        );
    }
    let key3: Option<String> = on_c.get("agent:key:3").await.unwrap();
    assert_eq!(key3, None);
    // An eventual collection cannot be asked for more than it gets: a typed error, not faked.
    let stronger = on_a
        .get_with_consistency::<i64>("notes:k0", ConsistencyLevel::Strong)
        .await
        .unwrap_err();
    assert!(
        matches!(
            stronger,
            StorageError::LevelUnavailable {
                delivered: ConsistencyLevel::Eventual,
                ..
            }
        ),
        "{stronger}"
    );
    let cas = on_a.compare_and_set("notes:k0", 9, None).await.unwrap_err();
    assert!(
        matches!(cas, StorageError::Engine(EngineError::Unsupported { .. })),
        "{cas}"
    );
    stop(nodes).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_repair_and_http_errors() {
    let nodes = cluster().await;
    let a = nodes[0].client;
    let client = NodeClient::new(&a.to_string());
    // Counters whose labels are known exist from the start, at zero.
    let (_, metrics) = http(a, "GET", "/metrics", "").await;
    exposition_is_valid(&metrics);
    for series in [
        r#"agentstore_node_conflicts_total{strategy="or_set"} 0"#,
        r#"agentstore_consistency_violations_total{guarantee="read_your_writes"} 0"#,
        r#"agentstore_node_requests_total{op="forwarded_write",outcome="quorum_failed"} 0"#,
    ] {
        assert!(metrics.contains(series), "{series} in {metrics}");
    }
    let status = client.status().await.unwrap();
    assert_eq!(status.node, "node-a");
    let shares: f64 = status.members.iter().map(|m| m.share).sum();
    assert!(
        (shares - 3.0).abs() < 1e-6,
        "the shares add up to N: {shares}"
    );
    let agent = status
        .collections
        .iter()
        .find(|c| c.name == "agent")
        .unwrap();
    assert_eq!(agent.consistency, ConsistencyLevel::Strong);
    assert_eq!(agent.guarantee.level, ConsistencyLevel::Strong, "{agent:?}");
    assert_eq!(status.raft.voters.len(), 3, "{status:?}");
    // The JSON the node serves is the same struct: what `GET /v1/status` answers reads back.
    let (code, body) = http(a, "GET", "/v1/status", "").await;
    assert_eq!(code, 200);
    let served: p2p_ai_agents::storage::NodeStatus = serde_json::from_str(&body).unwrap();
    assert_eq!(served.node, status.node);
    assert_eq!(served.collections, status.collections);

    let mut steps = Vec::new();
    client.repair(|step| steps.push(step)).await.unwrap();
    let members: Vec<&str> = steps
        .iter()
        .map(|s| s["member"].as_str().unwrap())
        .collect();
    assert_eq!(members, ["node-b", "node-c"]);
    assert!(steps.iter().all(|s| s["answered"] == true), "{steps:?}");
    assert_eq!(steps.last().unwrap()["done"], 2);

    // Stable error codes.
    let code = |body: &str| -> String {
        serde_json::from_str::<Json>(body).unwrap()["error"]["code"]
            .as_str()
            .unwrap()
            .to_owned()
    };
    let (status, body) = http(a, "GET", "/v1/keys/notes:missing", "").await;
    assert_eq!((status, code(&body).as_str()), (404, "not_found"));
    let (status, body) = http(a, "PUT", "/v1/keys/notes:x", "not json").await;
    assert_eq!((status, code(&body).as_str()), (400, "invalid_body"));
    let (status, body) = http(a, "PUT", "/v1/keys/notes:x?consistency=strong", "1").await;
    assert_eq!(
        (status, code(&body).as_str()),
        (409, "consistency_unavailable")
    );
    let (status, body) = http(a, "POST", "/v1/counters/notes:x", r#"{"delta":1}"#).await;
    assert_eq!((status, code(&body).as_str()), (409, "wrong_operation"));
    let (status, body) = http(a, "GET", "/v1/keys/:no-collection", "").await;
    assert_eq!((status, code(&body).as_str()), (400, "invalid_key"));
    // What axum answers by itself comes with the same JSON body.
    for (method, path, expected) in [
        ("GET", "/v1/no-such-route", (404, "not_found")),
        ("DELETE", "/v1/status", (405, "method_not_allowed")),
        ("GET", "/v1/scan/notes?limit=many", (400, "invalid_query")),
        (
            "GET",
            "/v1/keys/notes:x?no_such_parameter=1",
            (400, "invalid_query"),
        ),
    ] {
        let (status, body) = http(a, method, path, "").await;
        assert_eq!(
            (status, code(&body).as_str()),
            expected,
            "{method} {path}: {body}"
        );
    }
    stop(nodes).await;
}

/// `consistency=`, `stale=`, `if_version=`, fences and `context=` on every conflict strategy:
/// each is honoured, or refused with a typed error; none is silently ignored.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_strategy_honours_or_refuses_each_query_parameter() {
    let nodes = cluster().await;
    let a = nodes[0].client;
    let answer = |(status, body): (u16, String)| -> (u16, String, Json) {
        let json: Json = serde_json::from_str(&body).unwrap_or_default();
        let code = json["error"]["code"].as_str().unwrap_or("").to_owned();
        (status, code, json)
    };
    let call = |method: &'static str, path: String, body: &'static str| async move {
        answer(http(a, method, &path, body).await)
    };
    let refused = |(status, code, json): (u16, String, Json), expected: (u16, &str)| {
        assert_eq!((status, code.as_str()), expected, "{json}");
    };

    // consistency= stronger than the collection delivers: refused, whatever the strategy.
    for (method, path, body) in [
        ("GET", "/v1/keys/metrics:hits", ""),
        ("GET", "/v1/keys/peers:online", ""),
        ("GET", "/v1/keys/docs:plan", ""),
        ("POST", "/v1/counters/metrics:hits", r#"{"delta":1}"#),
        ("POST", "/v1/sets/peers:online", r#"{"add":"n1"}"#),
        ("PUT", "/v1/keys/docs:plan", r#""v1""#),
        ("DELETE", "/v1/keys/docs:plan", ""),
        ("DELETE", "/v1/keys/peers:online", ""),
    ] {
        let path = format!("{path}?consistency=strong");
        refused(
            call(method, path, body).await,
            (409, "consistency_unavailable"),
        );
    }
    // At the collection's own level: honoured.
    let (status, _, json) = call(
        "POST",
        "/v1/counters/metrics:hits?consistency=eventual".into(),
        r#"{"delta":2}"#,
    )
    .await;
    assert_eq!((status, json["value"].as_i64()), (200, Some(2)), "{json}");
    let (status, _, json) = call(
        "GET",
        "/v1/keys/metrics:hits?consistency=eventual".into(),
        "",
    )
    .await;
    assert_eq!((status, json["value"].as_i64()), (200, Some(2)), "{json}");

    // Parameters a strategy has no meaning for: refused.
    for (method, path, body) in [
        (
            "GET",
            "/v1/keys/metrics:hits?stale=true&consistency=eventual",
            "",
        ),
        ("GET", "/v1/keys/notes:a?if_version=absent", ""),
        ("GET", "/v1/keys/notes:a?fence_lock=l&fence_token=1", ""),
        (
            "POST",
            "/v1/counters/metrics:hits?if_version=absent",
            r#"{"delta":1}"#,
        ),
        (
            "POST",
            "/v1/sets/peers:online?fence_lock=l&fence_token=1",
            r#"{"add":"n1"}"#,
        ),
        ("PUT", "/v1/keys/docs:plan?if_version=absent", r#""v1""#),
        (
            "PUT",
            "/v1/keys/docs:plan?fence_lock=l&fence_token=1",
            r#""v1""#,
        ),
        ("PUT", "/v1/keys/notes:a?context=", r#""v1""#),
        ("PUT", "/v1/keys/notes:a?stale=true", r#""v1""#),
        ("DELETE", "/v1/keys/peers:online?if_version=absent", ""),
        ("DELETE", "/v1/keys/notes:a?if_version=absent", ""),
    ] {
        refused(
            call(method, path.into(), body).await,
            (400, "invalid_query"),
        );
    }

    // An eventual cluster collection cannot make conditions and fences hold: typed refusal.
    refused(
        call(
            "PUT",
            "/v1/keys/notes:a?if_version=absent".into(),
            r#""v1""#,
        )
        .await,
        (409, "unsupported"),
    );
    refused(
        call(
            "DELETE",
            "/v1/keys/notes:a?fence_lock=l&fence_token=1".into(),
            "",
        )
        .await,
        (409, "unsupported"),
    );
    // if_version= with a fence on a strong lww key: both honoured.
    let (status, _, first) = call("PUT", "/v1/keys/agent:a".into(), r#""v1""#).await;
    assert_eq!(status, 200, "{first}");
    let version = first["version"].as_str().unwrap().to_owned();
    refused(
        call(
            "PUT",
            "/v1/keys/agent:a?if_version=absent&fence_lock=agent:lock&fence_token=5".into(),
            r#""v2""#,
        )
        .await,
        (409, "version_mismatch"),
    );
    let (status, _, second) = call(
        "PUT",
        format!("/v1/keys/agent:a?if_version={version}&fence_lock=agent:lock&fence_token=5"),
        r#""v2""#,
    )
    .await;
    assert_eq!(status, 200, "{second}");
    refused(
        call(
            "PUT",
            "/v1/keys/agent:a?fence_lock=agent:lock&fence_token=4".into(),
            r#""stale holder""#,
        )
        .await,
        (409, "fenced"),
    );
    // A conditional delete: refused at an old version, done at the current one.
    refused(
        call(
            "DELETE",
            format!("/v1/keys/agent:a?if_version={version}"),
            "",
        )
        .await,
        (409, "version_mismatch"),
    );
    let current = second["version"].as_str().unwrap();
    let (status, _, json) = call(
        "DELETE",
        format!("/v1/keys/agent:a?if_version={current}"),
        "",
    )
    .await;
    assert_eq!(status, 200, "{json}");
    refused(
        call("GET", "/v1/keys/agent:a".into(), "").await,
        (404, "not_found"),
    );

    // A multi-value delete with a context drops only the values the context covers.
    call("PUT", "/v1/keys/docs:plan".into(), r#""seen""#).await;
    let (_, _, read) = call("GET", "/v1/keys/docs:plan".into(), "").await;
    let context = read["context"].as_str().unwrap().to_owned();
    call("PUT", "/v1/keys/docs:plan".into(), r#""concurrent""#).await;
    let (status, _, json) = call(
        "DELETE",
        format!("/v1/keys/docs:plan?context={context}"),
        "",
    )
    .await;
    assert_eq!(status, 200, "{json}");
    let (_, _, read) = call("GET", "/v1/keys/docs:plan".into(), "").await;
    assert_eq!(read["siblings"], json!(["concurrent"]), "{read}");
    stop(nodes).await;
}

/// A client given several nodes talks to the first it can reach, and moves on when the one it
/// talks to is gone: reads and writes go on through the others.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_of_several_nodes_moves_on_when_one_is_gone() {
    let mut nodes = cluster().await;
    let nothing = agentstore_engine::testkit::free_port();
    let (b, c) = (nodes[1].client, nodes[2].client);
    // Nothing listens at the first address: the client goes to the second.
    let client = NodeClient::new(&format!("127.0.0.1:{nothing},{b},{c}"));
    assert_eq!(client.status().await.unwrap().node, "node-b");
    assert_eq!(client.addr(), b.to_string());
    let storage = Storage::connect_client(client, Config::default())
        .await
        .unwrap();
    storage.set("notes:failover", "before").await.unwrap();
    // The node it talks to stops: the next call goes to node-c.
    nodes[1].stop().await;
    let read: Option<String> = storage.get("notes:failover").await.unwrap();
    assert_eq!(read.as_deref(), Some("before"));
    storage.set("notes:failover", "after").await.unwrap();
    let read: Option<String> = storage.get("notes:failover").await.unwrap();
    assert_eq!(read.as_deref(), Some("after"));
    stop(nodes).await;
}
