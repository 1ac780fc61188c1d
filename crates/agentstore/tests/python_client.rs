//! The Python client (`clients/python`) against three real node processes: its own tests,
//! run by the interpreter with the nodes' addresses.

mod common;

use std::path::PathBuf;
use std::process::Command;

use common::cluster;

const COLLECTIONS: &str = "  collections:\n    hits:\n      conflict: pn_counter\n    tags:\n      conflict: or_set\n    ledger:\n      consistency: strong\n    chat:\n      consistency: causal\n    docs:\n      consistency: strong\n      conflict: ot_text\n";

#[test]
fn the_python_clients_tests_pass_against_a_three_node_cluster() {
    let dir = tempfile::tempdir().unwrap();
    let nodes = cluster(dir.path(), COLLECTIONS);
    let addresses: Vec<String> = nodes.iter().map(|n| n.client.to_string()).collect();
    let package = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../clients/python");
    let run = Command::new("python3")
        .args(["-m", "unittest", "discover", "-v", "-s", "tests"])
        .current_dir(&package)
        .env("PYTHONPATH", &package)
        .env("PYTHONDONTWRITEBYTECODE", "1")
        .env("AGENTSTORE_NODES", addresses.join(","))
        .output()
        .expect("python3 runs (the README lists it among the test prerequisites)");
    let report = String::from_utf8_lossy(&run.stderr);
    assert!(
        run.status.success(),
        "the Python client's tests failed:\n{report}"
    );
    assert!(
        report.contains("Ran 10 tests") && report.trim_end().ends_with("OK"),
        "every test ran:\n{report}"
    );
}
