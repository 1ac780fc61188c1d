//! Concurrent editors of one `ot_text` document on three real node processes: each edits
//! through its own node against the revision it last read, most edits are made against a
//! revision others have moved past, and yet every node ends with the same text, no editor's
//! insert is lost or misplaced, and the applied edits replay to that text.

mod common;

use std::net::SocketAddr;
use std::sync::{Arc, Barrier};

use agentstore_core::ot::TextOp;
use common::{cluster, eventually, http};
use p2p_ai_agents::storage::{op_from_json, op_to_json};
use serde_json::{Value as Json, json};

const COLLECTIONS: &str =
    "  collections:\n    docs:\n      consistency: strong\n      conflict: ot_text\n";
const KEY: &str = "docs:shared";
const EDITS: usize = 15;
const DOTS: usize = 20;

/// The document at `node`: (revision, text). `stale`: this node's own copy.
fn read(node: SocketAddr, stale: bool) -> (u64, String) {
    let path = format!("/v1/keys/{KEY}{}", if stale { "?stale=true" } else { "" });
    let (status, body) = http(node, "GET", &path, "").unwrap();
    assert_eq!(status, 200, "{body}");
    let body: Json = serde_json::from_str(&body).unwrap();
    (
        body["revision"].as_u64().unwrap(),
        body["value"].as_str().unwrap().to_owned(),
    )
}

/// Posts `op` against `revision` at `node`: (status, answer).
fn edit(node: SocketAddr, revision: u64, op: &TextOp) -> (u16, Json) {
    let body = json!({ "revision": revision, "op": op_to_json(op) }).to_string();
    let (status, answer) = http(node, "POST", &format!("/v1/documents/{KEY}"), &body).unwrap();
    (status, serde_json::from_str(&answer).unwrap_or(Json::Null))
}

/// A small seeded generator: the same seed makes the same choices.
struct Seeded(u64);

impl Seeded {
    fn below(&mut self, n: usize) -> usize {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        (self.0 % n.max(1) as u64) as usize
    }
}

/// Editor `editor`'s edits through `node`: each reads the document, inserts its next marker
/// right after its previous one (the first at a random place) and deletes the dot after it,
/// if there is one. Every editor reads before any sends in each round (`round`), so each
/// round's edits are concurrent. Returns (base revision, revision, applied edit) of each.
fn editor(node: SocketAddr, editor: usize, round: &Barrier) -> Vec<(u64, u64, TextOp)> {
    let mut random = Seeded(0x9e37_79b9_7f4a_7c15 ^ editor as u64);
    let mut applied = Vec::new();
    for k in 0..EDITS {
        let (revision, text) = read(node, false);
        let chars: Vec<char> = text.chars().collect();
        let at = match k {
            0 => random.below(chars.len() + 1),
            _ => {
                let previous = format!("<{editor}.{}>", k - 1);
                let byte = text.find(&previous).expect("my previous marker is there");
                text[..byte].chars().count() + previous.chars().count()
            }
        };
        let mut op = TextOp::new()
            .retain(at as u64)
            .insert(&format!("<{editor}.{k}>"));
        let rest = (chars.len() - at) as u64;
        op = if chars.get(at) == Some(&'.') {
            op.delete(1).retain(rest - 1)
        } else {
            op.retain(rest)
        };
        round.wait();
        let (status, answer) = edit(node, revision, &op);
        assert_eq!(status, 200, "editor {editor}, edit {k}: {answer}");
        applied.push((
            revision,
            answer["revision"].as_u64().unwrap(),
            op_from_json(&answer["applied"]).unwrap(),
        ));
    }
    applied
}

#[test]
fn concurrent_editors_on_three_nodes_converge_without_losing_an_edit() {
    let dir = tempfile::tempdir().unwrap();
    let nodes = cluster(dir.path(), COLLECTIONS);
    let addrs: Vec<SocketAddr> = nodes.iter().map(|n| n.client).collect();
    let start = TextOp::new().insert(&".".repeat(DOTS));
    eventually("the Raft group takes the first edit", || {
        let (status, answer) = edit(addrs[0], 0, &start);
        (status == 200).then_some(()).ok_or(answer.to_string())
    });

    let round = Arc::new(Barrier::new(addrs.len()));
    let editors: Vec<_> = addrs
        .iter()
        .enumerate()
        .map(|(i, &node)| {
            let round = Arc::clone(&round);
            std::thread::spawn(move || editor(node, i, &round))
        })
        .collect();
    let mut history: Vec<(u64, TextOp)> = vec![(1, start)];
    let mut transformed = 0;
    for editor in editors {
        for (base, revision, applied) in editor.join().unwrap() {
            transformed += usize::from(revision > base + 1);
            history.push((revision, applied));
        }
    }
    // In each round only the first edit found its base revision current.
    assert!(
        transformed >= (addrs.len() - 1) * EDITS,
        "{transformed} edits were made against a revision others had moved past"
    );

    let (revision, text) = read(addrs[1], false);
    assert_eq!(revision, 1 + (addrs.len() * EDITS) as u64);
    // Every node's own copy reaches the same document.
    for &node in &addrs {
        eventually("the node's copy catches up", || {
            let copy = read(node, true);
            (copy == (revision, text.clone()))
                .then_some(())
                .ok_or(format!("{copy:?}"))
        });
    }
    // The applied edits, one per revision, replay to that document.
    history.sort_by_key(|(revision, _)| *revision);
    let revisions: Vec<u64> = history.iter().map(|(r, _)| *r).collect();
    assert_eq!(revisions, (1..=revision).collect::<Vec<_>>());
    let replayed = history
        .iter()
        .try_fold(String::new(), |doc, (_, op)| op.apply(&doc))
        .unwrap();
    assert_eq!(replayed, text);
    // A reader that held the first revision catches up by the edits since, over HTTP.
    let (status, body) =
        http(addrs[2], "GET", &format!("/v1/documents/{KEY}?since=1"), "").unwrap();
    assert_eq!(status, 200, "{body}");
    let caught: Json = serde_json::from_str(&body).unwrap();
    assert_eq!(caught["revision"].as_u64(), Some(revision));
    let caught_up = caught["edits"]
        .as_array()
        .unwrap()
        .iter()
        .map(|op| op_from_json(op).unwrap())
        .try_fold(".".repeat(DOTS), |doc, op| op.apply(&doc))
        .unwrap();
    assert_eq!(caught_up, text);
    let (status, body) = http(
        addrs[2],
        "GET",
        &format!("/v1/documents/{KEY}?since=999"),
        "",
    )
    .unwrap();
    assert_eq!(
        status, 409,
        "a revision the document has not reached: {body}"
    );
    // Every marker once, each editor's in the order it wrote them; only dots were deleted.
    let mut rest = text.clone();
    for editor in 0..addrs.len() {
        let mut last = 0;
        for k in 0..EDITS {
            let marker = format!("<{editor}.{k}>");
            assert_eq!(text.matches(&marker).count(), 1, "{marker} in {text}");
            let at = text.find(&marker).unwrap();
            assert!(at >= last, "{marker} out of order in {text}");
            last = at;
            rest = rest.replace(&marker, "");
        }
    }
    assert!(
        rest.chars().all(|c| c == '.') && rest.len() < DOTS,
        "only some of the dots are left: {rest:?}"
    );
}
