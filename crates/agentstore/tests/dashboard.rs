//! The node's web dashboard, loaded in headless Chromium from a real three-node cluster that
//! checks tokens: with a token it shows the members, each collection's level and delivered
//! guarantee, replication lag, conflicts and quorum availability; without one it shows the
//! node's refusal and no data.

mod common;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;

use common::{eventually, http, http_bearer, issue_token, token_cluster};

const COLLECTIONS: &str = "  collections:\n    ledger:\n      consistency: strong\n    hits:\n      conflict: pn_counter\n";

/// The Chromium to drive: `$AGENTSTORE_CHROMIUM`, else the first of the usual names on PATH.
fn chromium() -> PathBuf {
    if let Some(path) = std::env::var_os("AGENTSTORE_CHROMIUM") {
        return PathBuf::from(path);
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    for dir in std::env::split_paths(&path) {
        for name in ["chromium", "chromium-browser", "google-chrome", "chrome"] {
            if dir.join(name).is_file() {
                return dir.join(name);
            }
        }
    }
    panic!(
        "the dashboard test needs Chromium: install it (`sudo scripts/test-prerequisites.sh`, \
         or Debian's `chromium` package) or point AGENTSTORE_CHROMIUM at it"
    );
}

/// The page at `url` as headless Chromium has it once its scripts ran: the serialized DOM.
/// Virtual time lets the page's timers run without waiting for them in real time; Chromium
/// holds it while a request is in flight, so the page's fetches complete first.
fn rendered(profile: &Path, url: &str) -> String {
    let out = Command::new(chromium())
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--no-first-run",
            "--virtual-time-budget=5000",
            "--dump-dom",
        ])
        .arg(format!("--user-data-dir={}", profile.display()))
        .arg(url)
        .output()
        .expect("Chromium runs");
    assert!(
        out.status.success(),
        "Chromium failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The `<tr>` elements of the table `id` in `dom`, each as its opening tag and its cells' text.
fn rows(dom: &str, id: &str) -> Vec<(String, Vec<String>)> {
    let start = dom
        .find(&format!("<table id=\"{id}\""))
        .unwrap_or_else(|| panic!("no table {id} in {dom}"));
    let table = &dom[start..start + dom[start..].find("</table>").unwrap()];
    let body = &table[table.find("<tbody>").unwrap()..];
    body.split("<tr")
        .skip(1)
        .map(|row| {
            let tag = row[..row.find('>').unwrap()].to_owned();
            let cells = row
                .split("<td>")
                .skip(1)
                .map(|cell| cell[..cell.find("</td>").unwrap()].to_owned())
                .collect();
            (tag, cells)
        })
        .collect()
}

/// The row of `table` whose tag has `attribute="value"`.
fn row<'a>(
    table: &'a [(String, Vec<String>)],
    attribute: &str,
    value: &str,
) -> &'a (String, Vec<String>) {
    let wanted = format!("{attribute}=\"{value}\"");
    table
        .iter()
        .find(|(tag, _)| tag.contains(&wanted))
        .unwrap_or_else(|| panic!("no row with {wanted} in {table:?}"))
}

fn status(node: SocketAddr, token: &str) -> serde_json::Value {
    let (code, body) = http_bearer(node, "GET", "/v1/status", "", token).unwrap();
    assert_eq!(code, 200, "{body}");
    serde_json::from_str(&body).unwrap()
}

#[test]
fn the_dashboard_shows_the_cluster_to_a_token_holder_and_nothing_without_one() {
    let dir = tempfile::tempdir().unwrap();
    let nodes = token_cluster(dir.path(), COLLECTIONS);
    let a = nodes[0].client;
    // A read-only token on a prefix no key is under: any valid token may see the status.
    let viewer = issue_token(dir.path(), &["--read", "nothing:"]);
    let writer = issue_token(dir.path(), &["--write", ""]);
    eventually("node-a sees three live members", || {
        let alive = status(a, &viewer)["members"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|m| m["liveness"] == "alive")
            .count();
        (alive == 3).then_some(()).ok_or(format!("{alive} alive"))
    });
    for i in 0..20 {
        let (code, body) =
            http_bearer(a, "PUT", &format!("/v1/keys/notes:{i}"), "1", &writer).unwrap();
        assert_eq!(code, 200, "{body}");
    }
    eventually("the quorum probe has run", || {
        let (_, metrics) = http_bearer(a, "GET", "/metrics", "", &viewer).unwrap();
        metrics
            .contains("agentstore_quorum_reachable_ratio{op=\"write\"} 1")
            .then_some(())
            .ok_or(metrics)
    });

    // The files are served without a token and name no data.
    let (code, page) = http(a, "GET", "/dashboard", "").unwrap();
    assert_eq!(code, 200, "{page}");
    assert!(!page.contains("node-b"), "{page}");

    let profile = dir.path().join("chromium");
    let dom = rendered(&profile, &format!("http://{a}/dashboard#token={viewer}"));
    assert!(dom.contains("data-state=\"ready\""), "{dom}");

    let members = rows(&dom, "members");
    assert_eq!(members.len(), 3, "{members:?}");
    for name in ["node-a", "node-b", "node-c"] {
        let (tag, cells) = row(&members, "data-member", name);
        assert!(tag.contains("data-liveness=\"alive\""), "{tag}");
        assert_eq!(cells[1], "alive", "{cells:?}");
    }

    let collections = rows(&dom, "collections");
    let (tag, cells) = row(&collections, "data-collection", "ledger");
    assert!(tag.contains("data-level=\"strong\""), "{tag}");
    assert!(tag.contains("data-delivered=\"strong\""), "{tag}");
    assert!(cells[5].starts_with("strong: "), "{cells:?}");
    let (_, cells) = row(&collections, "data-collection", "hits");
    assert_eq!(cells[3], "pn_counter", "{cells:?}");
    let (tag, cells) = row(&collections, "data-collection", "(default)");
    assert!(tag.contains("data-level=\"eventual\""), "{tag}");
    assert!(cells[4].contains("N=3 W=2 R=2"), "{cells:?}");

    // Twenty writes coordinated by node-a, each sent to the two other replicas.
    let lag = rows(&dom, "lag");
    let (tag, cells) = row(&lag, "data-level", "eventual");
    let measured: u64 = cells[2].parse().unwrap();
    assert!(measured >= 20, "{tag}: {cells:?}");
    assert!(
        cells[3].ends_with(" ms") || cells[3].ends_with(" s"),
        "{cells:?}"
    );

    let quorum = rows(&dom, "quorum");
    let (_, cells) = row(&quorum, "data-op", "write");
    assert_eq!(cells[1], "100.0%", "{cells:?}");

    let conflicts = rows(&dom, "conflicts");
    let (_, cells) = row(&conflicts, "data-strategy", "lww");
    assert_eq!(cells[1], "0", "no concurrent writes were made: {cells:?}");

    let violations = rows(&dom, "violations");
    let (_, cells) = row(&violations, "data-guarantee", "read_your_writes");
    assert_eq!(cells[1], "0", "{cells:?}");

    let raft = rows(&dom, "raft");
    let (_, cells) = row(&raft, "data-field", "voters");
    assert_eq!(cells[1], "node-a, node-b, node-c", "{cells:?}");

    // Another profile, so no token is left in the tab's storage: the node's 401 is shown,
    // with the token form, and no data.
    let dom = rendered(
        &dir.path().join("chromium-anonymous"),
        &format!("http://{a}/dashboard"),
    );
    assert!(dom.contains("data-state=\"failed\""), "{dom}");
    assert!(dom.contains("401 unauthenticated"), "{dom}");
    assert!(!dom.contains("node-b"), "{dom}");
    assert!(
        dom.contains("<form id=\"login\">"),
        "the token form shows: {dom}"
    );
    assert!(
        dom.contains("<main id=\"content\" hidden=\"\">"),
        "the tables stay hidden: {dom}"
    );
}
