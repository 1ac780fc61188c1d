//! `agentstore`: the store from the shell.
//!
//! The binary stays thin: it parses arguments, builds a `Storage` and prints what the library
//! returns. Exit codes are part of its interface (see `ExitCode` below and the README).

mod admin;
mod check;
mod keys;
mod node;

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::path::PathBuf;
use std::process::ExitCode;

use agentstore_engine::{EngineError, PhysicalClock, SystemClock};
use agentstore_trust::{Capability, Operation, Right};
use clap::{Args, Parser, Subcommand};
use p2p_ai_agents::storage::{
    self, Config, ConsistencyLevel, NodeClient, Storage, StorageError, TextOp, Version,
    WriteReceipt, op_from_json, op_to_json,
};
use serde_json::{Value as Json, json};

/// Exit codes.
mod exit {
    /// Success.
    pub(crate) const OK: u8 = 0;
    /// A storage or runtime failure (I/O, data directory in use, corrupted data...).
    pub(crate) const FAILURE: u8 = 1;
    /// Bad command-line usage (also what clap uses).
    pub(crate) const USAGE: u8 = 2;
    /// `get` found no value.
    pub(crate) const NOT_FOUND: u8 = 3;
    /// The configuration is invalid.
    pub(crate) const CONFIG: u8 = 4;
    /// A conditional write lost (compare-and-set) or a key has siblings to resolve.
    pub(crate) const CONFLICT: u8 = 5;
}

#[derive(Parser)]
#[command(
    name = "agentstore",
    version,
    about = "A distributed store for AI agents with per-collection consistency levels.",
    long_about = "A distributed store for AI agents with per-collection consistency levels.\n\n\
        Without --config, agentstore runs as an embedded single node on the local engine,\n\
        keeping its data in --data-dir (default: $AGENTSTORE_DATA_DIR, else\n\
        ~/.local/share/agentstore).",
    after_help = "Exit codes: 0 ok, 1 storage failure, 2 usage error, 3 key not found,\n\
        4 invalid configuration, 5 conflict (compare-and-set lost, or siblings to resolve)."
)]
struct Cli {
    /// YAML configuration file (the spec's `storage:` format).
    #[arg(short, long, global = true, env = "AGENTSTORE_CONFIG")]
    config: Option<PathBuf>,
    /// Data directory of the local engine (overrides the configuration's `data_dir`).
    #[arg(short, long, global = true, env = "AGENTSTORE_DATA_DIR")]
    data_dir: Option<PathBuf>,
    /// Talk to the cluster node serving clients at ADDR (`host:port`) instead of opening an
    /// embedded store: its `local` collections live in the cluster. Several nodes
    /// (`host:port,host:port`): the first that answers, then the next if it goes away.
    #[arg(short, long, global = true, env = "AGENTSTORE_NODE")]
    node: Option<String>,
    /// The capability token to present to the node (`agentstore token issue` prints one);
    /// nodes of a cluster with an authority require one.
    #[arg(long, global = true, env = "AGENTSTORE_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// Sign writes to signed collections with --token's key. The node is shown an attenuated
    /// copy of the token (valid for an hour), so no node holds the key that signs.
    #[arg(long, global = true)]
    sign: bool,
    /// Speak HTTPS to the node, trusting the cluster authority's certificate in FILE
    /// (`authority.key.crt`, written by `agentstore authority new`).
    #[arg(long, global = true, env = "AGENTSTORE_CA_CERT", value_name = "FILE")]
    ca_cert: Option<PathBuf>,
    /// With --node: give up on a request after MS milliseconds (a paused or unreachable node
    /// fails the command instead of hanging it; a write may then have applied).
    #[arg(
        long,
        global = true,
        env = "AGENTSTORE_TIMEOUT_MS",
        value_name = "MS",
        default_value_t = 15_000
    )]
    timeout_ms: u64,
    /// Print machine-readable JSON.
    #[arg(long, global = true)]
    json: bool,
    /// How logs (on stderr; `RUST_LOG` sets how much) are written: `text` (colours only at
    /// a terminal) or `json` (one object per line, for log collectors).
    #[arg(long, global = true, env = "AGENTSTORE_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Args)]
struct LevelArg {
    /// Consistency level of the call (the collection's level applies if it is stronger).
    #[arg(long, value_parser = parse_level)]
    consistency: Option<ConsistencyLevel>,
}

/// A document edit in its JSON form (see `p2p_ai_agents::storage::op_from_json`).
fn parse_edit(s: &str) -> Result<TextOp, String> {
    let json: Json = serde_json::from_str(s).map_err(|e| format!("not JSON: {e}"))?;
    op_from_json(&json)
}

fn parse_level(s: &str) -> Result<ConsistencyLevel, String> {
    s.parse::<ConsistencyLevel>().map_err(|e| e.to_string())
}

/// How logs are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum LogFormat {
    /// Lines for people.
    Text,
    /// One JSON object per line.
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Write a value. VALUE is JSON; text that is not JSON is stored as a JSON string.
    Put {
        /// The key (`collection:rest`).
        key: String,
        /// The value.
        value: String,
        /// Store VALUE as a string even if it parses as JSON.
        #[arg(long)]
        string: bool,
        /// Write only if the key is at this version (compare-and-set); `-` means absent.
        #[arg(long, conflicts_with = "context")]
        if_version: Option<Version>,
        /// Replace the siblings this context covers (multi_value collections; from `get --siblings`).
        #[arg(long)]
        context: Option<Version>,
        /// Let the value expire this long after the write: 30s, 15m, 12h (lww collections);
        /// writing the key again before then renews it, as a heartbeat does.
        #[arg(long, value_parser = keys::parse_duration, conflicts_with_all = ["if_version", "context"])]
        ttl: Option<std::time::Duration>,
        #[command(flatten)]
        level: LevelArg,
    },
    /// Read a value (exit code 3 when there is none).
    Get {
        /// The key.
        key: String,
        /// Print every concurrent value and the context that replaces them.
        #[arg(long)]
        siblings: bool,
        /// Check the value's signature against the cluster authority (its public key, or a
        /// file holding it, such as `authority.key.pub`); fails unless it holds.
        #[arg(long, value_name = "AUTHORITY", conflicts_with = "siblings")]
        verify: Option<String>,
        #[command(flatten)]
        level: LevelArg,
    },
    /// Edit a text document (an ot_text collection) as it was at REVISION (from `document`
    /// or the last edit): the node transforms the edit past the edits applied since.
    /// Prints the document's new revision (`--json`: and the edit as applied).
    Edit {
        /// The key.
        key: String,
        /// The revision the edit was made against (0 for a document never edited).
        revision: u64,
        /// The edit as a JSON array over the whole text: `n` keeps n characters, `-n` deletes
        /// n, a string is inserted. `'["hello"]'` writes an empty document.
        #[arg(value_parser = parse_edit)]
        op: TextOp,
    },
    /// Read a text document (an ot_text collection): its revision, then its text.
    Document {
        /// The key.
        key: String,
    },
    /// Delete a key.
    Del {
        /// The key.
        key: String,
    },
    /// List live keys of a collection or key prefix, in key order.
    Scan {
        /// A collection name (`notes`) or a key prefix (`notes:2026-`).
        prefix: String,
        /// Most keys to list.
        #[arg(long, default_value_t = 100)]
        limit: usize,
        /// Start after this key (for paging).
        #[arg(long)]
        after: Option<String>,
    },
    /// Counters (collections with conflict g_counter or pn_counter).
    #[command(subcommand)]
    Counter(CounterCommand),
    /// Sets (collections with conflict g_set or or_set).
    #[command(subcommand)]
    Set(SetCommand),
    /// Configuration tools.
    #[command(subcommand)]
    Config(ConfigCommand),
    /// Run this machine as a cluster node (needs `storage.cluster` in --config): serves the
    /// HTTP API on `client_addr` and replicates with the peers until SIGTERM or Ctrl-C.
    Node,
    /// Show a node's view of the cluster (needs --node): members and their liveness, each
    /// member's share of the keys, and every collection's level, replication and guarantee.
    Status,
    /// Compare the node's data with every member now and exchange what differs (Merkle
    /// anti-entropy), with a progress bar (needs --node).
    Repair,
    /// Make the node leave the cluster for good: it hands its records to the replicas that
    /// take its place, then stops (needs --node).
    Leave,
    /// Write every live record the node holds to FILE (needs --node and an admin token): its
    /// data file and causal store each read in one transaction, its strong collections read
    /// from the Raft group. With fewer replicas than nodes, back up every node.
    Backup {
        /// Where to write the backup.
        file: std::path::PathBuf,
    },
    /// Write every record of a backup into the cluster of --node, as merges: joined with what
    /// each key holds, so a restore can be repeated and loses no newer write.
    Restore {
        /// The backup to read.
        file: std::path::PathBuf,
    },
    /// Change the Raft group that serves strong collections (needs --node; any member
    /// forwards the change to the leader).
    #[command(subcommand)]
    Raft(RaftCommand),
    /// The cluster authority: the key whose signature makes a process a node of the cluster.
    #[command(subcommand)]
    Authority(AuthorityCommand),
    /// Capability tokens for clients: what they may read, write or administer, until when.
    #[command(subcommand)]
    Token(TokenCommand),
    /// Admit a node (needs --data-dir, the node's data directory): create the node's key there
    /// if it has none, and write its admission there, signed by the authority's key.
    Admit {
        /// The authority's secret key file (from `agentstore authority new`).
        #[arg(long)]
        authority: PathBuf,
        /// The node's name: its `node_id`.
        #[arg(long)]
        name: String,
        /// A name or address clients reach the node's client API by (repeatable): writes the
        /// certificate, signed by the authority, that the API serves with `client_tls: true`.
        #[arg(long = "host", value_name = "HOST")]
        hosts: Vec<String>,
    },
    /// Print the completion script of a shell (`agentstore completions bash >
    /// /etc/bash_completion.d/agentstore`; zsh, fish, elvish and powershell too).
    Completions {
        /// The shell.
        shell: clap_complete::Shell,
    },
}

/// Rights of a token, as flags.
#[derive(Args)]
pub(crate) struct Rights {
    /// Let the holder read keys starting with PREFIX (repeatable; '' for every key).
    #[arg(long = "read", value_name = "PREFIX")]
    pub(crate) read: Vec<String>,
    /// Let the holder write keys starting with PREFIX (repeatable).
    #[arg(long = "write", value_name = "PREFIX")]
    pub(crate) write: Vec<String>,
    /// Let the holder change the cluster (Raft membership, leave, repair).
    #[arg(long)]
    pub(crate) admin: bool,
    /// How long the token works: 30s, 15m, 12h, 30d (default: no expiry).
    #[arg(long, value_parser = keys::parse_duration)]
    pub(crate) ttl: Option<std::time::Duration>,
}

#[derive(Subcommand)]
pub(crate) enum TokenCommand {
    /// Grant a token, signed by the authority's key.
    Issue {
        /// The authority's secret key file.
        #[arg(long)]
        authority: PathBuf,
        #[command(flatten)]
        rights: Rights,
    },
    /// Narrow a token (offline: needs only the token): the new token may do only what both
    /// allow, until the earlier expiry.
    Attenuate {
        /// The token to narrow.
        token: String,
        #[command(flatten)]
        rights: Rights,
    },
    /// Sign a write with a token, offline: prints the attestation an HTTP client sends in
    /// the `agentstore-attestation` header of `PUT` (or `DELETE`) `/v1/keys/KEY`, so the
    /// token itself never reaches a node. VALUE is read as `put` reads it.
    Sign {
        /// The token that signs.
        token: String,
        /// The key.
        key: String,
        /// The value (omit with --delete).
        #[arg(required_unless_present = "delete")]
        value: Option<String>,
        /// Store VALUE as a string even if it parses as JSON.
        #[arg(long)]
        string: bool,
        /// Sign a delete of KEY.
        #[arg(long, conflicts_with = "value")]
        delete: bool,
    },
    /// Show what a token grants (and, given --authority-key, whether it verifies).
    Show {
        /// The token.
        token: String,
        /// The authority's public key (`ed25519:…`) or the file holding it.
        #[arg(long)]
        authority_key: Option<String>,
    },
}

#[derive(Subcommand)]
enum AuthorityCommand {
    /// Create an authority: its secret key in FILE (mode 0600; an existing file is never
    /// replaced), its public key in FILE.pub, which nodes name as `storage.cluster.authority`,
    /// and its certificate in FILE.crt, which clients of an HTTPS client API trust.
    New {
        /// Where to write the secret key.
        file: PathBuf,
    },
}

#[derive(Subcommand)]
pub(crate) enum RaftCommand {
    /// Add a running node as a learner: it receives the log (or a snapshot) without voting.
    AddLearner {
        /// The node's id (`storage.node_id` in its configuration).
        id: String,
        /// Where it listens for peers (`storage.cluster.peer_addr`).
        peer_addr: String,
    },
    /// Make a learner a voter.
    Promote {
        /// The learner's id.
        id: String,
    },
    /// Remove a voter from the group (its data stays on its disk).
    Remove {
        /// The voter's id.
        id: String,
    },
}

#[derive(Subcommand)]
enum CounterCommand {
    /// Add DELTA (negative to subtract) and print the new total.
    Add {
        /// The key.
        key: String,
        /// The amount.
        #[arg(allow_negative_numbers = true)]
        delta: i64,
    },
    /// Print the total.
    Get {
        /// The key.
        key: String,
    },
}

#[derive(Subcommand)]
enum SetCommand {
    /// Add a member (JSON, or text stored as a string).
    Add {
        /// The key.
        key: String,
        /// The member.
        member: String,
    },
    /// Remove a member (or_set only).
    Remove {
        /// The key.
        key: String,
        /// The member.
        member: String,
    },
    /// List the members.
    Members {
        /// The key.
        key: String,
    },
}

#[derive(Subcommand)]
enum ConfigCommand {
    /// Validate a configuration file and print, per collection: backend, level, conflict
    /// strategy, replication and the guarantee it really delivers.
    Check {
        /// The file (default: --config).
        file: Option<PathBuf>,
    },
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(err) => {
            let _ = err.print();
            return ExitCode::from(if err.use_stderr() {
                exit::USAGE
            } else {
                exit::OK
            });
        }
    };
    let logs = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr);
    match cli.log_format {
        // One JSON object per line, for log collectors.
        LogFormat::Json => logs.json().init(),
        // Colours only for a person at a terminal, never in a file or a pipe.
        LogFormat::Text => logs
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .init(),
    }
    // A node serves many clients at once; one-shot commands need a single thread.
    let runtime = if matches!(cli.command, Command::Node) {
        tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()
    } else {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
    };
    let runtime = match runtime {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("error: cannot start the runtime: {err}");
            return ExitCode::from(exit::FAILURE);
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(code) => ExitCode::from(code),
        Err(err) => {
            eprintln!("error: {err}");
            ExitCode::from(exit_code(&err))
        }
    }
}

fn exit_code(err: &StorageError) -> u8 {
    match err {
        StorageError::Config(_)
        | StorageError::ConfigFile { .. }
        | StorageError::InvalidConfig(_) => exit::CONFIG,
        StorageError::Key { .. }
        | StorageError::WrongOperation { .. }
        | StorageError::LevelUnavailable { .. } => exit::USAGE,
        StorageError::VersionMismatch { .. }
        | StorageError::Siblings { .. }
        | StorageError::Engine(EngineError::EditRefused { .. }) => exit::CONFLICT,
        _ => exit::FAILURE,
    }
}

/// A client of the node at `addr`, with the command line's token and TLS settings.
fn node_client(cli: &Cli, addr: &str) -> Result<NodeClient, StorageError> {
    let tls = match &cli.ca_cert {
        None => None,
        Some(path) => {
            let roots = std::fs::read_to_string(path).map_err(|e| {
                StorageError::InvalidConfig(format!("--ca-cert {}: {e}", path.display()))
            })?;
            let config = agentstore_trust::client_api_client(&roots).map_err(|e| {
                StorageError::InvalidConfig(format!("--ca-cert {}: {e}", path.display()))
            })?;
            Some(config)
        }
    };
    let token = match signer(cli)? {
        Some(signing) => Some(presented(&signing)?),
        None => cli.token.clone(),
    };
    Ok(NodeClient::new(addr)
        .with_token(token)
        .with_tls(tls)
        .with_timeout(std::time::Duration::from_millis(cli.timeout_ms)))
}

/// The token that signs writes, with `--sign`.
fn signer(cli: &Cli) -> Result<Option<Capability>, StorageError> {
    match (&cli.token, cli.sign) {
        (_, false) => Ok(None),
        (None, true) => Err(StorageError::InvalidConfig(
            "--sign signs with the token: give --token (or AGENTSTORE_TOKEN)".into(),
        )),
        (Some(text), true) => Capability::from_text(text)
            .map(Some)
            .map_err(|e| StorageError::InvalidConfig(format!("--token: {e}"))),
    }
}

/// What a signing client shows the node: its token narrowed to an hour, whose proof is a new
/// key, so the node cannot sign as the token's author.
fn presented(token: &Capability) -> Result<String, StorageError> {
    let everything = Right::new(&[Operation::Read, Operation::Write, Operation::Admin], "")
        .expect("a valid right");
    let hour = SystemClock.now_ms() + 3_600_000;
    token
        .attenuate(vec![everything], hour)
        .map(|t| t.to_text())
        .map_err(|e| StorageError::InvalidConfig(format!("--token: {e}")))
}

fn load(cli: &Cli) -> Result<Config, StorageError> {
    let mut config = match &cli.config {
        Some(path) => storage::load_config(path)?,
        None => Config::default(),
    };
    if let Some(dir) = &cli.data_dir {
        config.data_dir = Some(dir.display().to_string());
    }
    Ok(config)
}

/// JSON from the command line: JSON if it parses, else the text as a string.
pub(crate) fn json_arg(text: &str, force_string: bool) -> Json {
    if force_string {
        return Json::String(text.to_owned());
    }
    serde_json::from_str(text).unwrap_or_else(|_| Json::String(text.to_owned()))
}

fn print_receipt(cli: &Cli, key: &str, receipt: &WriteReceipt) {
    if cli.json {
        let out = json!({
            "key": key,
            "version": receipt.version.to_string(),
            "level": receipt.level.as_str(),
            "delivered": receipt.delivered.as_str(),
        });
        println!("{out}");
    } else {
        println!(
            "ok {key} version={} level={} delivered={}",
            receipt.version, receipt.level, receipt.delivered
        );
    }
}

async fn run(cli: Cli) -> Result<u8, StorageError> {
    if let Command::Completions { shell } = &cli.command {
        use clap::CommandFactory;
        use std::io::Write as _;
        // Into memory first: clap_complete panics when its writer fails (a closed pipe).
        let mut script = Vec::new();
        clap_complete::generate(*shell, &mut Cli::command(), "agentstore", &mut script);
        let _ = std::io::stdout().write_all(&script);
        return Ok(exit::OK);
    }
    if let Command::Config(ConfigCommand::Check { file }) = &cli.command {
        let Some(path) = file.as_ref().or(cli.config.as_ref()) else {
            eprintln!("error: config check needs a FILE (or --config)");
            return Ok(exit::USAGE);
        };
        let config = storage::load_config(path)?;
        check::print(&config, cli.json);
        return Ok(exit::OK);
    }
    if let Command::Node = &cli.command {
        return node::run(load(&cli)?, cli.log_format == LogFormat::Json).await;
    }
    let trust_failed = |err: agentstore_trust::TrustError| {
        eprintln!("error: {err}");
        exit::FAILURE
    };
    if let Command::Authority(AuthorityCommand::New { file }) = &cli.command {
        return Ok(keys::new_authority(file, cli.json).unwrap_or_else(trust_failed));
    }
    if let Command::Token(command) = &cli.command {
        return Ok(keys::token(command, cli.json).unwrap_or_else(trust_failed));
    }
    if let Command::Admit {
        authority,
        name,
        hosts,
    } = &cli.command
    {
        let Some(data_dir) = &cli.data_dir else {
            eprintln!("error: admit writes into the node's data directory: give --data-dir DIR");
            return Ok(exit::USAGE);
        };
        return Ok(
            keys::admit(authority, name, data_dir, hosts, cli.json).unwrap_or_else(trust_failed)
        );
    }
    if matches!(
        cli.command,
        Command::Status
            | Command::Repair
            | Command::Leave
            | Command::Raft(_)
            | Command::Backup { .. }
            | Command::Restore { .. }
    ) {
        let Some(addr) = &cli.node else {
            eprintln!("error: this command talks to a node: give --node HOST:PORT");
            return Ok(exit::USAGE);
        };
        return admin::run(&cli.command, node_client(&cli, addr)?, cli.json).await;
    }
    let storage = match &cli.node {
        Some(addr) => Storage::connect_client(node_client(&cli, addr)?, load(&cli)?).await?,
        None => Storage::new(load(&cli)?).await?,
    };
    let storage = match signer(&cli)? {
        Some(token) => storage.signing_with(token),
        None => storage,
    };
    match &cli.command {
        Command::Put {
            key,
            value,
            string,
            if_version,
            context,
            ttl,
            level,
        } => {
            let value = json_arg(value, *string);
            let receipt = match (if_version, context) {
                _ if ttl.is_some() => {
                    let storage = match level.consistency {
                        Some(level) => storage.at_level(level),
                        None => storage.clone(),
                    };
                    let ttl = ttl.unwrap_or_default();
                    storage.set_with_ttl(key, value, ttl).await?
                }
                (Some(version), _) => {
                    let expected = (!version.vector().is_empty()).then_some(version);
                    storage.compare_and_set(key, value, expected).await?
                }
                (None, Some(context)) => storage.set_with_context(key, value, context).await?,
                (None, None) => match level.consistency {
                    Some(level) => storage.set_with_consistency(key, value, level).await?,
                    None => storage.set(key, value).await?,
                },
            };
            print_receipt(&cli, key, &receipt);
        }
        Command::Get {
            key,
            siblings: true,
            ..
        } => {
            let siblings = storage.get_siblings::<Json>(key).await?;
            if siblings.values.is_empty() {
                return Ok(exit::NOT_FOUND);
            }
            if cli.json {
                println!(
                    "{}",
                    json!({ "key": key, "values": siblings.values, "context": siblings.context.to_string() })
                );
            } else {
                for value in &siblings.values {
                    println!("{value}");
                }
                println!("context={}", siblings.context);
            }
        }
        Command::Get {
            key, level, verify, ..
        } => {
            let read = match level.consistency {
                Some(level) => {
                    storage
                        .get_versioned_with_consistency::<Json>(key, level)
                        .await?
                }
                None => storage.get_versioned::<Json>(key).await?,
            };
            let Some(read) = read else {
                if cli.json {
                    println!("{}", json!({ "key": key, "value": null }));
                }
                return Ok(exit::NOT_FOUND);
            };
            if let Some(authority) = verify {
                let authority = agentstore_trust::authority_from(authority)
                    .map_err(|e| StorageError::InvalidConfig(format!("--verify: {e}")))?;
                let Some(signed) = &read.signed else {
                    eprintln!("error: {key} is not signed");
                    return Ok(exit::FAILURE);
                };
                if let Err(err) = signed.verify(&authority) {
                    eprintln!("error: the signature of {key} does not hold: {err}");
                    return Ok(exit::FAILURE);
                }
            }
            if cli.json {
                let mut out =
                    json!({ "key": key, "value": read.value, "version": read.version.to_string() });
                if let Some(signed) = &read.signed {
                    out["signed"] = signed.to_json();
                    out["signed"]["verified"] = json!(verify.is_some());
                }
                println!("{out}");
            } else {
                println!("{}", read.value);
                if let Some(signed) = &read.signed {
                    let checked = if verify.is_some() { ", verified" } else { "" };
                    eprintln!("signed by {}{checked}", signed.author);
                }
            }
        }
        Command::Del { key } => {
            let receipt = storage.delete(key).await?;
            print_receipt(&cli, key, &receipt);
        }
        Command::Edit { key, revision, op } => {
            let edited = storage.edit(key, *revision, op).await?;
            if cli.json {
                println!(
                    "{}",
                    json!({
                        "key": key,
                        "revision": edited.revision,
                        "applied": op_to_json(&edited.applied),
                        "version": edited.receipt.version.to_string(),
                    })
                );
            } else {
                println!("revision {}", edited.revision);
            }
        }
        Command::Document { key } => {
            let document = storage.document(key).await?;
            if cli.json {
                println!(
                    "{}",
                    json!({ "key": key, "revision": document.revision, "text": document.text })
                );
            } else {
                println!("revision {}\n{}", document.revision, document.text);
            }
        }
        Command::Scan {
            prefix,
            limit,
            after,
        } => {
            let entries = storage.scan(prefix, after.as_deref(), *limit).await?;
            if cli.json {
                let list: Vec<Json> = entries
                    .iter()
                    .map(|e| json!({ "key": e.key, "value": e.value }))
                    .collect();
                println!("{}", Json::Array(list));
            } else {
                for entry in entries {
                    println!("{}\t{}", entry.key, entry.value);
                }
            }
        }
        Command::Counter(CounterCommand::Add { key, delta }) => {
            let total = storage.counter_add(key, *delta).await?;
            print_value(&cli, key, json!(total));
        }
        Command::Counter(CounterCommand::Get { key }) => {
            let total = storage.counter(key).await?;
            print_value(&cli, key, json!(total));
        }
        Command::Set(SetCommand::Add { key, member }) => {
            let receipt = storage.set_add(key, json_arg(member, false)).await?;
            print_receipt(&cli, key, &receipt);
        }
        Command::Set(SetCommand::Remove { key, member }) => {
            let receipt = storage.set_remove(key, json_arg(member, false)).await?;
            print_receipt(&cli, key, &receipt);
        }
        Command::Set(SetCommand::Members { key }) => {
            let members = storage.set_members::<Json>(key).await?;
            print_value(&cli, key, Json::Array(members));
        }
        Command::Config(_)
        | Command::Authority(_)
        | Command::Token(_)
        | Command::Admit { .. }
        | Command::Completions { .. }
        | Command::Node
        | Command::Status
        | Command::Repair
        | Command::Leave
        | Command::Raft(_)
        | Command::Backup { .. }
        | Command::Restore { .. } => {
            unreachable!("handled before the store is opened")
        }
    }
    Ok(exit::OK)
}

fn print_value(cli: &Cli, key: &str, value: Json) {
    if cli.json {
        println!("{}", json!({ "key": key, "value": value }));
    } else {
        println!("{value}");
    }
}
