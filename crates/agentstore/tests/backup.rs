//! Backup and restore with the CLI between two clusters of real node processes: every level's
//! live records come back, deleted and expired ones do not, and a restore is a merge.

mod common;

use common::{cli, cluster, eventually, http};

const COLLECTIONS: &str = "  collections:\n    hits:\n      conflict: pn_counter\n    chat:\n      consistency: causal\n    ledger:\n      consistency: strong\n";

fn put(node: std::net::SocketAddr, key: &str, value: &str) {
    let (status, body) = http(node, "PUT", &format!("/v1/keys/{key}"), value).unwrap();
    assert_eq!(status, 200, "{key}: {body}");
}

#[test]
fn a_backup_of_one_cluster_restores_every_level_into_another() {
    let dir = tempfile::tempdir().unwrap();
    for cluster_dir in ["old", "new"] {
        std::fs::create_dir_all(dir.path().join(cluster_dir)).unwrap();
    }
    let old = cluster(&dir.path().join("old"), COLLECTIONS);
    let a = old[0].client;
    eventually("the Raft group has a leader", || {
        let (status, body) =
            http(a, "PUT", "/v1/keys/ledger:total", "100").map_err(|e| e.to_string())?;
        (status == 200).then_some(()).ok_or(body)
    });
    put(a, "notes:kept", "\"a note\"");
    put(a, "notes:deleted", "\"gone soon\"");
    let (status, _) = http(a, "DELETE", "/v1/keys/notes:deleted", "").unwrap();
    assert_eq!(status, 200);
    let (status, _) = http(a, "PUT", "/v1/keys/notes:expired?ttl_ms=1", "1").unwrap();
    assert_eq!(status, 200);
    put(a, "chat:hello", "\"hi\"");
    let (status, _) = http(a, "POST", "/v1/counters/hits:page", "{\"delta\":7}").unwrap();
    assert_eq!(status, 200);
    // The causal write reaches every node before the backup is taken from another one.
    let b = old[1].client;
    eventually("node-b has the causal write", || {
        let (status, body) =
            http(b, "GET", "/v1/keys/chat:hello", "").map_err(|e| e.to_string())?;
        (status == 200).then_some(()).ok_or(body)
    });

    let file = dir.path().join("cluster.backup");
    let file_arg = file.to_str().unwrap();
    let (code, out, err) = cli(&["--node", &b.to_string(), "--json", "backup", file_arg]);
    assert_eq!(code, 0, "{err}");
    let count: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(
        count["backed_up"], 4,
        "notes:kept, chat:hello, hits:page, ledger:total; no tombstone, nothing expired: {out}"
    );
    drop(old);

    let new = cluster(&dir.path().join("new"), COLLECTIONS);
    let c = new[2].client;
    put(
        new[0].client,
        "notes:newer",
        "\"written before the restore\"",
    );
    let (code, out, err) = cli(&["--node", &c.to_string(), "restore", file_arg]);
    assert_eq!(code, 0, "{out} {err}");
    let read = |key: &str| http(new[1].client, "GET", &format!("/v1/keys/{key}"), "").unwrap();
    for (key, value) in [
        ("notes:kept", "\"a note\""),
        ("chat:hello", "\"hi\""),
        ("hits:page", "7"),
        ("ledger:total", "100"),
        ("notes:newer", "\"written before the restore\""),
    ] {
        let (status, body) = read(key);
        assert!(
            status == 200 && body.contains(&format!("\"value\":{value}")),
            "{key}: {status} {body}"
        );
    }
    for key in ["notes:deleted", "notes:expired"] {
        assert_eq!(read(key).0, 404, "{key} came back");
    }
    // Restoring again changes nothing: a merge of what is there already.
    let (code, _, err) = cli(&["--node", &c.to_string(), "restore", file_arg]);
    assert_eq!(code, 0, "{err}");
    let (_, body) = read("hits:page");
    assert!(body.contains("\"value\":7"), "{body}");

    // A file that is not a backup is refused with its name.
    std::fs::write(dir.path().join("junk"), b"junk").unwrap();
    let junk = dir.path().join("junk");
    let (code, _, err) = cli(&["--node", &c.to_string(), "restore", junk.to_str().unwrap()]);
    assert_ne!(code, 0);
    assert!(
        err.contains("junk") && err.contains("not an agentstore backup"),
        "{err}"
    );
}
