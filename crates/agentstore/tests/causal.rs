//! Causal collections on three `agentstore node` processes: sessions that move between nodes
//! keep their guarantees (checked by the causal checker) while a node is paused and catches
//! up, and the spec's use cases — task dependencies, a conversation, a workflow — appear in
//! causal order on every node.

mod common;

use std::net::SocketAddr;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use agentstore_check::causal::{CausalOp, check_causal};
use common::{NodeProcess, cluster, eventually, http, http_session};
use serde_json::Value as Json;

const COLLECTIONS: &str = "  collections:\n    tasks:\n      consistency: causal\n    conv:\n      consistency: causal\n    flow:\n      consistency: causal\n    hist:\n      consistency: causal\n";

/// How a call in a session ended.
enum Answer {
    Ok(Json),
    Missing,
    /// The node could not catch up with the session in time: nothing happened.
    Behind,
    /// Anything else: a write may have applied.
    Unknown(#[allow(dead_code)] String),
}

/// A client session over HTTP: it sends its token and keeps the one it is answered.
#[derive(Default)]
struct Session {
    token: String,
}

impl Session {
    fn call(&mut self, node: SocketAddr, method: &str, path: &str, body: &str) -> Answer {
        match http_session(node, method, path, body, &self.token) {
            Ok((status, body, token)) => {
                if let Some(token) = token {
                    self.token = token;
                }
                match status {
                    200 => Answer::Ok(serde_json::from_str(&body).unwrap_or(Json::Null)),
                    404 => Answer::Missing,
                    503 if body.contains(r#""code":"session_behind""#) => Answer::Behind,
                    _ => Answer::Unknown(format!("{status} {body}")),
                }
            }
            Err(err) => Answer::Unknown(err.to_string()),
        }
    }

    fn put(&mut self, node: SocketAddr, key: &str, value: &Json) -> Answer {
        self.call(node, "PUT", &format!("/v1/keys/{key}"), &value.to_string())
    }

    fn get(&mut self, node: SocketAddr, key: &str) -> Answer {
        self.call(node, "GET", &format!("/v1/keys/{key}"), "")
    }
}

/// One consistent view of a node: the live keys under `prefix` and their values.
fn scan(node: SocketAddr, prefix: &str) -> Option<Vec<(String, Json)>> {
    let (status, body) = http(node, "GET", &format!("/v1/scan/{prefix}?limit=1000"), "").ok()?;
    if status != 200 {
        return None;
    }
    let page: Json = serde_json::from_str(&body).ok()?;
    Some(
        page["entries"]
            .as_array()?
            .iter()
            .map(|e| {
                (
                    e["key"].as_str().unwrap_or("").to_owned(),
                    e["value"].clone(),
                )
            })
            .collect(),
    )
}

fn applied(node: &NodeProcess) -> Option<String> {
    let (status, body) = http(node.client, "GET", "/v1/status", "").ok()?;
    let status: Json = (status == 200).then(|| serde_json::from_str(&body).ok())??;
    status["causal"]["applied"].as_str().map(str::to_owned)
}

fn signal(node: &NodeProcess, signal: &str) {
    let pid = node.child.as_ref().unwrap().id().to_string();
    let stopped = std::process::Command::new("kill")
        .args([signal, &pid])
        .status()
        .unwrap();
    assert!(stopped.success());
}

fn metric(node: &NodeProcess, name: &str) -> f64 {
    let (_, text) = http(node.client, "GET", "/metrics", "").unwrap();
    text.lines()
        .find_map(|line| line.strip_prefix(name)?.trim().parse().ok())
        .unwrap_or(0.0)
}

type History = Vec<CausalOp<String, String>>;

/// One session: random writes of unique values and reads of three keys, each through a
/// random node that is not paused, until `stop`.
fn session(n: usize, nodes: &[SocketAddr], paused: &AtomicUsize, stop: &AtomicBool) -> History {
    let mut rng = agentstore_sim::Rng::new(0xca05a1 + n as u64);
    let mut client = Session::default();
    let mut history = Vec::new();
    let mut written = 0;
    while !stop.load(Ordering::Relaxed) {
        let node = loop {
            let i = rng.below(nodes.len() as u64) as usize;
            if i != paused.load(Ordering::SeqCst) {
                break i;
            }
        };
        let key = format!("hist:k{}", rng.below(3));
        if rng.below(2) == 0 {
            written += 1;
            let value = format!("s{n}-{written}");
            match client.put(nodes[node], &key, &Json::String(value.clone())) {
                Answer::Ok(_) => history.push(CausalOp::Write { key, value }),
                Answer::Behind => {}
                Answer::Missing | Answer::Unknown(_) => {
                    // Maybe applied: it stays in the history, and the session ends, since
                    // its later calls could not say whether they follow it.
                    history.push(CausalOp::Write { key, value });
                    break;
                }
            }
        } else {
            match client.get(nodes[node], &key) {
                Answer::Ok(body) => history.push(CausalOp::Read {
                    key,
                    value: body["value"].as_str().map(str::to_owned),
                }),
                Answer::Missing => history.push(CausalOp::Read { key, value: None }),
                Answer::Behind | Answer::Unknown(_) => {}
            }
        }
        std::thread::sleep(Duration::from_millis(rng.below(4)));
    }
    history
}

#[test]
fn sessions_keep_causality_while_they_move_between_nodes_and_a_node_is_paused() {
    let dir = tempfile::tempdir().unwrap();
    let nodes = cluster(dir.path(), COLLECTIONS);
    let addrs: Vec<SocketAddr> = nodes.iter().map(|n| n.client).collect();
    let (paused, stop) = (AtomicUsize::new(usize::MAX), AtomicBool::new(false));
    let histories: Vec<History> = std::thread::scope(|s| {
        let sessions: Vec<_> = (0..4)
            .map(|n| {
                let (addrs, paused, stop) = (&addrs, &paused, &stop);
                s.spawn(move || session(n, addrs, paused, stop))
            })
            .collect();
        std::thread::sleep(Duration::from_millis(1500));
        // node-c stops answering and receiving; the others go on without it.
        paused.store(2, Ordering::SeqCst);
        std::thread::sleep(Duration::from_millis(200));
        signal(&nodes[2], "-STOP");
        std::thread::sleep(Duration::from_millis(2500));
        signal(&nodes[2], "-CONT");
        // Sessions that saw writes node-c missed go to it at once: it must catch up first.
        paused.store(usize::MAX, Ordering::SeqCst);
        std::thread::sleep(Duration::from_millis(2500));
        stop.store(true, Ordering::Relaxed);
        sessions.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let writes = histories
        .iter()
        .flatten()
        .filter(|op| matches!(op, CausalOp::Write { .. }))
        .count();
    let reads_of_others = histories
        .iter()
        .enumerate()
        .flat_map(|(n, h)| h.iter().map(move |op| (n, op)))
        .filter(|(n, op)| {
            matches!(op, CausalOp::Read { value: Some(v), .. } if !v.starts_with(&format!("s{n}-")))
        })
        .count();
    assert!(writes > 100, "too few writes to say anything: {writes}");
    assert!(reads_of_others > 10, "sessions never read each other");
    if let Err(violation) = check_causal(&histories) {
        panic!("causal violation: {violation:?}");
    }
    // Every node ends with every write, and the same values.
    eventually("the nodes converge", || {
        let vectors: Vec<Option<String>> = nodes.iter().map(applied).collect();
        let views: Vec<Option<Vec<(String, Json)>>> =
            addrs.iter().map(|a| scan(*a, "hist")).collect();
        if vectors.iter().all(|v| v.is_some() && *v == vectors[0])
            && views.iter().all(|v| v.is_some() && *v == views[0])
        {
            Ok(())
        } else {
            Err(format!("{vectors:?}"))
        }
    });
    eprintln!(
        "{writes} writes, {reads_of_others} reads of other sessions' writes; node-c waited for \
         sessions {} times",
        metric(&nodes[2], "agentstore_causal_session_waits_total")
    );
}

/// A view's violations of the use cases' orders, if any.
fn out_of_order(
    tasks: &[(String, Json)],
    conv: &[(String, Json)],
    flow: &[(String, Json)],
) -> Option<String> {
    let has = |view: &[(String, Json)], key: &str| view.iter().any(|(k, _)| k == key);
    // A task is never visible without the task it depends on.
    for (key, value) in tasks {
        if let Some(after) = value["after"].as_str()
            && !has(tasks, after)
        {
            return Some(format!("{key} visible without {after}"));
        }
    }
    // A conversation's messages are visible as a prefix: a reply never without what it
    // answers.
    let messages: Vec<u64> = conv.iter().filter_map(|(_, v)| v["n"].as_u64()).collect();
    if messages.iter().enumerate().any(|(i, n)| *n != i as u64 + 1) {
        return Some(format!("conversation out of order: {messages:?}"));
    }
    // A workflow's current step has every earlier step done.
    let done = flow
        .iter()
        .filter(|(k, _)| k.starts_with("flow:done:"))
        .count() as u64;
    if let Some((_, job)) = flow.iter().find(|(k, _)| k == "flow:job")
        && job["step"].as_u64().unwrap_or(0) > done
    {
        return Some(format!(
            "workflow at step {} with {done} steps done",
            job["step"]
        ));
    }
    None
}

#[test]
fn task_dependencies_conversations_and_workflows_appear_in_causal_order_on_every_node() {
    const ROUNDS: u64 = 60;
    let dir = tempfile::tempdir().unwrap();
    let nodes = cluster(dir.path(), COLLECTIONS);
    let addrs: Vec<SocketAddr> = nodes.iter().map(|n| n.client).collect();
    let stop = AtomicBool::new(false);
    let problems = Mutex::new(Vec::new());
    let views = AtomicUsize::new(0);
    std::thread::scope(|s| {
        // Observers: one per node, no session, one consistent view of each collection at a
        // time.
        for addr in &addrs {
            let (stop, problems, views) = (&stop, &problems, &views);
            s.spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    let (Some(tasks), Some(conv), Some(flow)) = (
                        scan(*addr, "tasks"),
                        scan(*addr, "conv"),
                        scan(*addr, "flow"),
                    ) else {
                        continue;
                    };
                    views.fetch_add(1, Ordering::Relaxed);
                    if let Some(problem) = out_of_order(&tasks, &conv, &flow) {
                        problems.lock().unwrap().push(format!("{addr}: {problem}"));
                    }
                }
            });
        }
        // The agents write through node-a and node-b; node-c is paused for a while, so that
        // when it resumes, both peers' writes and their catch-up answers reach it at once, in
        // no particular order.
        s.spawn(|| {
            std::thread::sleep(Duration::from_millis(200));
            signal(&nodes[2], "-STOP");
            std::thread::sleep(Duration::from_millis(1000));
            signal(&nodes[2], "-CONT");
        });
        let writers = [
            // Tasks: B is created on another node than A, after A, by the same agent.
            s.spawn(|| {
                let mut agent = Session::default();
                for i in 0..ROUNDS {
                    let (here, there) = (addrs[i as usize % 2], addrs[(i as usize + 1) % 2]);
                    std::thread::sleep(Duration::from_millis(10));
                    let a = format!("tasks:t{i:02}a");
                    assert!(matches!(
                        agent.put(here, &a, &serde_json::json!({"title": "fetch"})),
                        Answer::Ok(_)
                    ));
                    let b = serde_json::json!({"title": "summarize", "after": a});
                    assert!(matches!(
                        agent.put(there, &format!("tasks:t{i:02}b"), &b),
                        Answer::Ok(_)
                    ));
                }
            }),
            // A workflow: one agent moving to another node at every step.
            s.spawn(|| {
                let mut agent = Session::default();
                for step in 1..=ROUNDS {
                    let node = addrs[step as usize % 2];
                    std::thread::sleep(Duration::from_millis(10));
                    let done = format!("flow:done:{step:02}");
                    assert!(matches!(
                        agent.put(node, &done, &serde_json::json!(true)),
                        Answer::Ok(_)
                    ));
                    let job = serde_json::json!({ "step": step });
                    assert!(matches!(agent.put(node, "flow:job", &job), Answer::Ok(_)));
                }
            }),
        ];
        // A conversation: three agents, each replying to the message before (it reads it
        // first, in its session).
        let talkers: Vec<_> = (0..3u64)
            .map(|agent| {
                let addrs = &addrs;
                s.spawn(move || {
                    let node = addrs[agent as usize % 2];
                    let mut session = Session::default();
                    for n in (1..=ROUNDS).filter(|n| n % 3 == agent) {
                        if n > 1 {
                            let previous = format!("conv:m{:02}", n - 1);
                            let deadline = Instant::now() + Duration::from_secs(20);
                            while !matches!(session.get(node, &previous), Answer::Ok(_)) {
                                assert!(Instant::now() < deadline, "{previous} never arrived");
                                std::thread::sleep(Duration::from_millis(2));
                            }
                        }
                        let message = serde_json::json!({ "n": n, "from": agent });
                        let key = format!("conv:m{n:02}");
                        assert!(matches!(session.put(node, &key, &message), Answer::Ok(_)));
                    }
                })
            })
            .collect();
        for writer in writers.into_iter().chain(talkers) {
            writer.join().unwrap();
        }
        // Let the observers see the end state too.
        eventually("every node has every write", || {
            let ends: Vec<usize> = addrs
                .iter()
                .map(|a| {
                    ["tasks", "conv", "flow"]
                        .iter()
                        .map(|p| scan(*a, p).map_or(0, |v| v.len()))
                        .sum()
                })
                .collect();
            let all = (ROUNDS * 2 + ROUNDS + ROUNDS + 1) as usize;
            if ends.iter().all(|n| *n == all) {
                Ok(())
            } else {
                Err(format!("{ends:?} of {all}"))
            }
        });
        stop.store(true, Ordering::Relaxed);
    });
    let problems = problems.into_inner().unwrap();
    assert!(problems.is_empty(), "{problems:#?}");
    assert!(
        views.load(Ordering::Relaxed) > 30,
        "the observers saw too little"
    );
}

#[test]
fn acknowledged_causal_writes_survive_a_killed_node_and_reach_the_others() {
    let dir = tempfile::tempdir().unwrap();
    let mut nodes = cluster(dir.path(), COLLECTIONS);
    // node-b and node-c hear nothing for a while: node-a's writes live only on node-a.
    signal(&nodes[1], "-STOP");
    signal(&nodes[2], "-STOP");
    let mut agent = Session::default();
    for i in 0..20 {
        let answer = agent.put(
            nodes[0].client,
            &format!("tasks:t{i:02}"),
            &serde_json::json!(i),
        );
        assert!(matches!(answer, Answer::Ok(_)), "write {i}");
    }
    assert_eq!(agent.token, "node-a=20");
    nodes[0].signal("-KILL");
    signal(&nodes[1], "-CONT");
    signal(&nodes[2], "-CONT");
    nodes[0].start();
    // Nothing acknowledged is lost, and the others get it from the restarted node.
    for node in &nodes {
        eventually("every write on every node", || {
            let view = scan(node.client, "tasks").ok_or("no scan")?;
            (view.len() == 20).then_some(()).ok_or(format!(
                "{} of 20 on {}",
                view.len(),
                node.client
            ))
        });
    }
    // The restarted node numbers its next write after the ones it made before the crash.
    let answer = agent.put(nodes[0].client, "tasks:next", &serde_json::json!("after"));
    assert!(matches!(answer, Answer::Ok(_)));
    assert_eq!(agent.token, "node-a=21");
    let mut elsewhere = Session {
        token: agent.token.clone(),
    };
    assert!(matches!(
        elsewhere.get(nodes[2].client, "tasks:next"),
        Answer::Ok(_)
    ));
}

#[test]
fn a_node_that_joins_after_the_logs_were_trimmed_gets_a_snapshot() {
    let dir = tempfile::tempdir().unwrap();
    let nodes = cluster(dir.path(), COLLECTIONS);
    let mut agent = Session::default();
    for i in 0..300 {
        let node = nodes[i % 3].client;
        let answer = agent.put(node, &format!("tasks:t{i:03}"), &serde_json::json!(i));
        assert!(matches!(answer, Answer::Ok(_)), "write {i}");
    }
    // Every member has every write, so each trims its log.
    for node in &nodes {
        eventually("every member trims its log", || {
            let trimmed = metric(node, "agentstore_causal_log_trimmed_writes");
            (trimmed == 300.0)
                .then_some(())
                .ok_or(format!("{trimmed} of 300 trimmed"))
        });
    }
    // A fourth node joins with an empty data directory.
    let peers: Vec<(&str, u16)> = ["node-a", "node-b", "node-c"]
        .into_iter()
        .zip(nodes.iter().map(|n| n.peer_port))
        .collect();
    let mut joining = common::node(
        dir.path(),
        "node-d",
        agentstore_engine::testkit::free_port(),
        &peers,
        COLLECTIONS,
    );
    joining.start();
    eventually("the new node has every causal write", || {
        let view = scan(joining.client, "tasks").ok_or("no scan")?;
        (view.len() == 300)
            .then_some(())
            .ok_or(format!("{} of 300", view.len()))
    });
    assert!(
        metric(&joining, "agentstore_causal_snapshots_applied_total") >= 1.0,
        "the writes came as a snapshot, the logs having been trimmed"
    );
    // And the session that made them is served there.
    let mut moved = Session {
        token: agent.token.clone(),
    };
    assert!(matches!(
        moved.get(joining.client, "tasks:t299"),
        Answer::Ok(_)
    ));
}
