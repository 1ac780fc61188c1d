//! The `agentstore` command as a user runs it: real processes, real data directories.

use std::path::Path;
use std::process::{Command, Output};

struct Run {
    code: i32,
    stdout: String,
    stderr: String,
}

fn agentstore(dir: &Path, args: &[&str]) -> Run {
    let output: Output = Command::new(env!("CARGO_BIN_EXE_agentstore"))
        .arg("--data-dir")
        .arg(dir)
        .args(args)
        .env_remove("AGENTSTORE_CONFIG")
        .output()
        .unwrap();
    Run {
        code: output.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
    }
}

fn repo_file(path: &str) -> String {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .join(path)
        .display()
        .to_string()
}

#[test]
fn put_get_delete_and_scan_with_exit_codes() {
    let dir = tempfile::tempdir().unwrap();
    let put = agentstore(dir.path(), &["put", "notes:hello", "world"]);
    assert_eq!(put.code, 0, "{}", put.stderr);
    assert!(
        put.stdout.starts_with("ok notes:hello version=local:1"),
        "{}",
        put.stdout
    );
    assert_eq!(
        agentstore(dir.path(), &["get", "notes:hello"]).stdout,
        "\"world\"\n"
    );
    agentstore(dir.path(), &["put", "notes:n", "42"]);
    agentstore(dir.path(), &["put", "notes:s", "42", "--string"]);
    let scan = agentstore(dir.path(), &["scan", "notes"]);
    assert_eq!(
        scan.stdout,
        "notes:hello\t\"world\"\nnotes:n\t42\nnotes:s\t\"42\"\n"
    );
    assert_eq!(agentstore(dir.path(), &["del", "notes:hello"]).code, 0);
    let missing = agentstore(dir.path(), &["get", "notes:hello"]);
    assert_eq!((missing.code, missing.stdout.as_str()), (3, ""));
}

#[test]
fn json_output_is_machine_readable() {
    let dir = tempfile::tempdir().unwrap();
    let put = agentstore(
        dir.path(),
        &[
            "--json",
            "put",
            "agent:identity:123",
            r#"{"name":"ada"}"#,
            "--consistency",
            "strong",
        ],
    );
    let receipt: serde_json::Value = serde_json::from_str(&put.stdout).unwrap();
    assert_eq!(receipt["level"], "strong");
    assert_eq!(receipt["delivered"], "strong");
    let get = agentstore(dir.path(), &["--json", "get", "agent:identity:123"]);
    let read: serde_json::Value = serde_json::from_str(&get.stdout).unwrap();
    assert_eq!(read["value"]["name"], "ada");
    assert_eq!(read["version"], receipt["version"]);
}

#[test]
fn a_lost_compare_and_set_exits_5_and_writes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    assert_eq!(
        agentstore(dir.path(), &["put", "locks:job", "a", "--if-version", "-"]).code,
        0
    );
    let lost = agentstore(dir.path(), &["put", "locks:job", "b", "--if-version", "-"]);
    assert_eq!(lost.code, 5, "{}", lost.stderr);
    assert!(
        lost.stderr.contains("compare-and-set failed"),
        "{}",
        lost.stderr
    );
    let won = agentstore(
        dir.path(),
        &["put", "locks:job", "c", "--if-version", "local:1"],
    );
    assert_eq!(won.code, 0, "{}", won.stderr);
    assert_eq!(
        agentstore(dir.path(), &["get", "locks:job"]).stdout,
        "\"c\"\n"
    );
}

#[test]
fn counters_sets_and_siblings_follow_the_config() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("agentstore.yaml");
    std::fs::write(
        &config,
        "storage:\n  collections:\n    hits:\n      conflict: pn_counter\n    peers:\n      conflict: or_set\n    docs:\n      conflict: multi_value\n",
    )
    .unwrap();
    let c = config.to_str().unwrap();
    assert_eq!(
        agentstore(dir.path(), &["-c", c, "counter", "add", "hits:home", "5"]).stdout,
        "5\n"
    );
    assert_eq!(
        agentstore(dir.path(), &["-c", c, "counter", "add", "hits:home", "-2"]).stdout,
        "3\n"
    );
    assert_eq!(
        agentstore(dir.path(), &["-c", c, "counter", "get", "hits:home"]).stdout,
        "3\n"
    );
    agentstore(dir.path(), &["-c", c, "set", "add", "peers:online", "p1"]);
    agentstore(dir.path(), &["-c", c, "set", "add", "peers:online", "p2"]);
    agentstore(
        dir.path(),
        &["-c", c, "set", "remove", "peers:online", "p1"],
    );
    assert_eq!(
        agentstore(dir.path(), &["-c", c, "set", "members", "peers:online"]).stdout,
        "[\"p2\"]\n"
    );
    agentstore(dir.path(), &["-c", c, "put", "docs:plan", "a"]);
    agentstore(dir.path(), &["-c", c, "put", "docs:plan", "b"]);
    let conflict = agentstore(dir.path(), &["-c", c, "get", "docs:plan"]);
    assert_eq!(
        conflict.code, 5,
        "siblings must be resolved: {}",
        conflict.stderr
    );
    let siblings = agentstore(
        dir.path(),
        &["-c", c, "--json", "get", "--siblings", "docs:plan"],
    );
    let siblings: serde_json::Value = serde_json::from_str(&siblings.stdout).unwrap();
    assert_eq!(siblings["values"].as_array().unwrap().len(), 2);
    let context = siblings["context"].as_str().unwrap();
    assert_eq!(
        agentstore(
            dir.path(),
            &["-c", c, "put", "docs:plan", "ab", "--context", context]
        )
        .code,
        0
    );
    assert_eq!(
        agentstore(dir.path(), &["-c", c, "get", "docs:plan"]).stdout,
        "\"ab\"\n"
    );
    let wrong = agentstore(dir.path(), &["-c", c, "counter", "add", "docs:plan", "1"]);
    assert_eq!(wrong.code, 2);
    assert!(
        wrong
            .stderr
            .contains("storage.collections.docs.conflict: pn_counter"),
        "{}",
        wrong.stderr
    );
}

#[test]
fn config_check_reports_what_each_collection_really_gets() {
    let dir = tempfile::tempdir().unwrap();
    let check = agentstore(
        dir.path(),
        &["config", "check", &repo_file("examples/agentstore.yaml")],
    );
    assert_eq!(check.code, 0, "{}", check.stderr);
    assert!(
        check
            .stdout
            .contains("quorum N=3 W=2 R=2 -> overlapping quorums"),
        "{}",
        check.stdout
    );
    let task = check
        .stdout
        .lines()
        .find(|l| l.starts_with("task "))
        .unwrap();
    assert!(task.contains("redis") && task.contains("causal"), "{task}");
    assert!(
        task.contains("WAIT") && task.contains("not linearizable"),
        "{task}"
    );
    let metrics = check
        .stdout
        .lines()
        .find(|l| l.starts_with("metrics "))
        .unwrap();
    assert!(
        metrics.contains("eventual: asynchronous Redis replication"),
        "{metrics}"
    );
    let json = agentstore(
        dir.path(),
        &[
            "--json",
            "config",
            "check",
            &repo_file("examples/agentstore.yaml"),
        ],
    );
    let parsed: serde_json::Value = serde_json::from_str(&json.stdout).unwrap();
    assert_eq!(parsed["replication"]["overlapping"], true);
}

#[test]
fn config_check_on_a_cluster_file_shows_the_clusters_guarantees() {
    let dir = tempfile::tempdir().unwrap();
    let check = agentstore(
        dir.path(),
        &[
            "--json",
            "config",
            "check",
            &repo_file("examples/cluster/node-a.yaml"),
        ],
    );
    assert_eq!(check.code, 0, "{}", check.stderr);
    let parsed: serde_json::Value = serde_json::from_str(&check.stdout).unwrap();
    assert_eq!(parsed["cluster"], true);
    let level = |name: &str| -> (String, String) {
        let plan = parsed["collections"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["collection"] == name)
            .unwrap_or_else(|| panic!("{name} in {parsed}"));
        let guarantee = &plan["guarantee"];
        (
            guarantee["level"].as_str().unwrap().to_owned(),
            guarantee["summary"].as_str().unwrap().to_owned(),
        )
    };
    // Not the embedded engine's "one ACID engine on one node": what the cluster delivers.
    let (eventual, summary) = level("metrics");
    assert_eq!(eventual, "eventual");
    assert!(summary.contains("leaderless replication"), "{summary}");
    let (causal, summary) = level("tasks");
    assert_eq!(causal, "causal");
    assert!(summary.contains("causal"), "{summary}");
    let (strong, summary) = level("accounts");
    assert_eq!(strong, "strong");
    assert!(summary.contains("Raft"), "{summary}");
}

#[test]
fn an_invalid_config_exits_4_naming_file_line_column_and_field() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("bad.yaml");
    std::fs::write(
        &config,
        "storage:\n  consistency_overrides:\n    agents: strnog\n",
    )
    .unwrap();
    let check = agentstore(dir.path(), &["config", "check", config.to_str().unwrap()]);
    assert_eq!(check.code, 4);
    let expected = format!(
        "{}:3:13: field `storage.consistency_overrides.agents`",
        config.display()
    );
    assert!(check.stderr.contains(&expected), "{}", check.stderr);
    assert!(
        check.stderr.contains("did you mean `strong`?"),
        "{}",
        check.stderr
    );
    let put = agentstore(
        dir.path(),
        &["-c", config.to_str().unwrap(), "put", "a:b", "1"],
    );
    assert_eq!(put.code, 4);
}

#[tokio::test]
async fn a_second_process_on_the_same_data_directory_gets_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let config = p2p_ai_agents::storage::Config {
        data_dir: Some(dir.path().display().to_string()),
        ..Default::default()
    };
    let _held = p2p_ai_agents::storage::Storage::new(config).await.unwrap();
    let run = agentstore(dir.path(), &["get", "a:b"]);
    assert_eq!(run.code, 1);
    assert!(
        run.stderr.contains("in use by another agentstore process"),
        "{}",
        run.stderr
    );
}

#[test]
fn usage_errors_exit_2() {
    let dir = tempfile::tempdir().unwrap();
    assert_eq!(agentstore(dir.path(), &["frobnicate"]).code, 2);
    let bad_level = agentstore(
        dir.path(),
        &["put", "a:b", "1", "--consistency", "strongest"],
    );
    assert_eq!(bad_level.code, 2);
    assert!(
        bad_level.stderr.contains("unknown consistency level"),
        "{}",
        bad_level.stderr
    );
    assert_eq!(agentstore(dir.path(), &["put", ":b", "1"]).code, 2);
    assert_eq!(agentstore(dir.path(), &["--help"]).code, 0);
}

#[test]
fn completions_are_valid_scripts_that_know_the_commands() {
    let dir = tempfile::tempdir().unwrap();
    let bash = agentstore(dir.path(), &["completions", "bash"]);
    assert_eq!(bash.code, 0, "{}", bash.stderr);
    for word in ["put", "status", "--node", "--timeout-ms"] {
        assert!(bash.stdout.contains(word), "{word} in the bash completions");
    }
    let script = dir.path().join("agentstore.bash");
    std::fs::write(&script, &bash.stdout).unwrap();
    let parsed = Command::new("bash")
        .arg("-n")
        .arg(&script)
        .status()
        .unwrap();
    assert!(parsed.success(), "bash -n rejects the script");
    for shell in ["zsh", "fish"] {
        let run = agentstore(dir.path(), &["completions", shell]);
        assert_eq!(run.code, 0, "{shell}: {}", run.stderr);
        assert!(run.stdout.contains("agentstore"), "{shell}");
    }
}

#[test]
fn documents_are_edited_against_a_revision_from_the_command_line() {
    let dir = tempfile::tempdir().unwrap();
    let config = repo_file("examples/documents.yaml");
    let run = |args: &[&str]| agentstore(dir.path(), &[&["-c", config.as_str()], args].concat());
    let first = run(&["edit", "pages:plan", "0", "[\"hello\"]"]);
    assert_eq!(
        (first.code, first.stdout.as_str()),
        (0, "revision 1\n"),
        "{}",
        first.stderr
    );
    // Made against revision 1 by two writers: the second is transformed past the first.
    assert_eq!(run(&["edit", "pages:plan", "1", "[-1, \"H\", 4]"]).code, 0);
    let second = run(&["--json", "edit", "pages:plan", "1", "[5, \" world\"]"]);
    assert_eq!(second.code, 0, "{}", second.stderr);
    let answer: serde_json::Value = serde_json::from_str(&second.stdout).unwrap();
    assert_eq!(answer["revision"], 3);
    assert_eq!(answer["applied"], serde_json::json!([5, " world"]));
    assert_eq!(
        run(&["document", "pages:plan"]).stdout,
        "revision 3\nHello world\n"
    );
    assert_eq!(run(&["get", "pages:plan"]).stdout, "\"Hello world\"\n");
    // A revision the document has not reached: a conflict; an edit that is not JSON: usage.
    let ahead = run(&["edit", "pages:plan", "9", "[11]"]);
    assert_eq!(ahead.code, 5, "{}", ahead.stderr);
    assert!(ahead.stderr.contains("revision 9"), "{}", ahead.stderr);
    assert_eq!(run(&["edit", "pages:plan", "3", "[11, oops]"]).code, 2);
    // A document is edited, not put.
    assert_eq!(run(&["put", "pages:plan", "x"]).code, 2);
}
