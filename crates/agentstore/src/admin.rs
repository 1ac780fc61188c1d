//! `agentstore status|repair|leave|raft|backup|restore --node ADDR`: administration of a
//! running node.

use std::io::Write as _;

use futures_util::StreamExt as _;

use p2p_ai_agents::storage::{NodeClient, NodeStatus, StorageError};
use serde_json::Value as Json;

use crate::{Command, RaftCommand, exit};

pub(crate) async fn run(
    command: &Command,
    client: NodeClient,
    json: bool,
) -> Result<u8, StorageError> {
    let addr = client.addr().to_owned();
    let client = &client;
    match command {
        Command::Status => {
            let status = client.status().await?;
            if json {
                println!("{}", serde_json::to_value(&status).unwrap_or_default());
            } else {
                print_status(&status);
            }
        }
        Command::Repair => repair(client, json).await?,
        Command::Leave => {
            client.leave().await?;
            if json {
                println!("{}", serde_json::json!({ "left": true }));
            } else {
                println!("the node at {addr} left the cluster and stopped");
            }
        }
        Command::Backup { file } => {
            let records = client.backup().await?;
            let mut bytes = BACKUP_MAGIC.to_vec();
            bytes.extend(agentstore_wire::encode_entries(&records));
            write_file(file, &bytes)?;
            report(
                json,
                "backed_up",
                records.len(),
                &format!("records from {addr} to {}", file.display()),
            );
        }
        Command::Restore { file } => {
            let records = read_backup(file)?;
            let count = records.len();
            // A few at once: each is one request, and the node orders its own work.
            let mut pending = futures_util::stream::iter(records)
                .map(|(key, record)| client.restore(key, record))
                .buffer_unordered(16);
            while let Some(done) = pending.next().await {
                done?;
            }
            report(
                json,
                "restored",
                count,
                &format!("records into the cluster of {addr}"),
            );
        }
        Command::Raft(change) => {
            let done = raft(client, change).await?;
            if json {
                println!("{}", serde_json::json!({ "done": done }));
            } else {
                println!("{done}");
            }
        }
        _ => return Ok(exit::USAGE),
    }
    Ok(exit::OK)
}

/// The first bytes of a backup file: its format.
const BACKUP_MAGIC: &[u8] = b"agentstore-backup 1\n";

fn report(json: bool, field: &str, count: usize, what: &str) {
    if json {
        println!("{}", serde_json::json!({ field: count }));
    } else {
        println!("{field} {count} {what}");
    }
}

fn write_file(path: &std::path::Path, bytes: &[u8]) -> Result<(), StorageError> {
    // Written beside, then renamed: an interrupted backup never leaves a cut file in place.
    let partial = path.with_extension("partial");
    std::fs::write(&partial, bytes)
        .and_then(|()| std::fs::rename(&partial, path))
        .map_err(|e| StorageError::InvalidConfig(format!("cannot write {}: {e}", path.display())))
}

fn read_backup(
    path: &std::path::Path,
) -> Result<Vec<(agentstore_core::Key, agentstore_core::Record)>, StorageError> {
    let invalid = |why: String| StorageError::InvalidConfig(format!("{}: {why}", path.display()));
    let bytes = std::fs::read(path).map_err(|e| invalid(e.to_string()))?;
    let entries = bytes
        .strip_prefix(BACKUP_MAGIC)
        .ok_or_else(|| invalid("not an agentstore backup (format 1)".into()))?;
    agentstore_wire::decode_entries(entries).map_err(|e| invalid(format!("a damaged backup: {e}")))
}

/// Makes a Raft membership change; returns what was done, in words.
async fn raft(client: &NodeClient, change: &RaftCommand) -> Result<String, StorageError> {
    if let RaftCommand::AddLearner { id, peer_addr } = change {
        client.add_learner(id, peer_addr).await?;
        return Ok(format!(
            "{id} ({peer_addr}) is a learner; `agentstore status` shows it catching up"
        ));
    }
    let raft = client.status().await?.raft;
    let mut voters = raft.voters;
    match change {
        RaftCommand::Promote { id } => {
            if !raft.learners.contains(id) && !voters.contains(id) {
                return Err(StorageError::InvalidConfig(format!(
                    "{id} is not a learner of the group; add it first with `agentstore raft add-learner`"
                )));
            }
            if !voters.contains(id) {
                voters.push(id.clone());
            }
            client.set_voters(&voters).await?;
            Ok(format!("voters: {}", voters.join(", ")))
        }
        RaftCommand::Remove { id } => {
            if !voters.contains(id) {
                return Err(StorageError::InvalidConfig(format!(
                    "{id} is not a voter of the group (voters: {})",
                    voters.join(", ")
                )));
            }
            voters.retain(|v| v != id);
            client.set_voters(&voters).await?;
            Ok(format!("{id} removed; voters: {}", voters.join(", ")))
        }
        RaftCommand::AddLearner { .. } => unreachable!("handled above"),
    }
}

/// An optional field as the status prints it.
fn shown(value: Option<impl ToString>) -> String {
    value.map_or_else(|| "-".to_owned(), |v| v.to_string())
}

/// A list as the status prints it.
fn listed(names: &[String]) -> String {
    if names.is_empty() {
        "-".to_owned()
    } else {
        names.join(", ")
    }
}

fn print_status(status: &NodeStatus) {
    println!(
        "node {}: N={} W={} R={}, {} request(s) in flight",
        status.node, status.replicas, status.write_quorum, status.read_quorum, status.in_flight
    );
    println!("\nmembers:");
    println!(
        "  {:<16} {:<8} {:>7}  {:<22} client",
        "id", "liveness", "share", "peer"
    );
    for member in &status.members {
        println!(
            "  {:<16} {:<8} {:>6.1}%  {:<22} {}",
            member.id,
            member.liveness,
            member.share * 100.0,
            shown(member.peer_addr),
            shown(member.client_addr),
        );
    }
    println!("  (a share is the part of the keys a member replicates; the shares add up to N)");
    let raft = &status.raft;
    println!(
        "\nraft (strong collections): {} in term {}, leader {}; log {}, committed {}, applied {}, snapshot {}",
        raft.state,
        raft.term,
        shown(raft.leader.as_ref()),
        shown(raft.last_log),
        shown(raft.committed),
        shown(raft.applied),
        shown(raft.snapshot),
    );
    println!(
        "  voters: {}; learners: {}",
        listed(&raft.voters),
        listed(&raft.learners)
    );
    if let Some(failure) = &raft.failure {
        println!("  failing: {failure}");
    }
    println!("\ncollections:");
    for c in &status.collections {
        let r = &c.replication;
        println!(
            "  {}: backend {}, level {}, conflict {}, replication {} N={} W={} R={}",
            c.name,
            c.backend,
            c.consistency.as_str(),
            c.conflict.as_str(),
            r.strategy,
            r.n,
            r.w,
            r.r
        );
        let g = &c.guarantee;
        println!("    delivers {}: {}", g.level.as_str(), g.summary);
        if let Some(caveat) = &g.caveat {
            println!("    caveat: {caveat}");
        }
    }
}

async fn repair(client: &NodeClient, json: bool) -> Result<(), StorageError> {
    let mut unanswered = 0;
    let mut differing = 0;
    client
        .repair(|step| {
            if json {
                println!("{step}");
                return;
            }
            let (done, total) = (
                step["done"].as_u64().unwrap_or(0),
                step["total"].as_u64().unwrap_or(1).max(1),
            );
            let filled = (done * 30 / total) as usize;
            let outcome = if step["answered"] == Json::Bool(true) {
                let buckets = step["buckets_differing"].as_u64().unwrap_or(0);
                differing += buckets;
                format!("{buckets} bucket(s) differed")
            } else {
                unanswered += 1;
                "did not answer".to_owned()
            };
            eprint!(
                "\r[{}{}] {done}/{total} {}: {outcome}\x1b[K",
                "#".repeat(filled),
                ".".repeat(30 - filled),
                step["member"].as_str().unwrap_or("-"),
            );
            let _ = std::io::stderr().flush();
        })
        .await?;
    if !json {
        eprintln!();
        println!(
            "repair done: {differing} differing bucket(s) exchanged, {unanswered} member(s) did not answer"
        );
    }
    Ok(())
}
