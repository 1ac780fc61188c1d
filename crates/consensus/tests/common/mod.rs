//! Raft groups in one process on an in-memory network that misbehaves on demand: links cut
//! one by one (any partition shape), members paused (their messages wait and arrive late,
//! as with a stopped process), members stopped and restarted from their files, and a
//! skewed clock per member.

#![allow(dead_code, unreachable_pub)]

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use agentstore_consensus::{Group, GroupConfig, MemberId, Rpc, RpcError, RpcFuture};
use agentstore_core::record::{Mutation, Value};
use agentstore_core::{Key, Record};
use agentstore_engine::{PhysicalClock, SystemClock, Write};

pub fn id(s: &str) -> MemberId {
    MemberId::from(s)
}

pub fn key(s: &str) -> Key {
    Key::new(s.as_bytes()).unwrap()
}

pub fn put(k: &str, v: &str) -> Write {
    Write::new(key(k), Mutation::Put(v.as_bytes().to_vec()))
}

pub fn value(record: &Option<Record>) -> Option<String> {
    match record.as_ref().map(|r| &r.value) {
        Some(Value::Register(Some(bytes))) => Some(String::from_utf8(bytes.to_vec()).unwrap()),
        _ => None,
    }
}

/// Running members by id, and the faults between them.
#[derive(Debug, Default)]
pub struct Switchboard {
    pub members: Mutex<BTreeMap<MemberId, Group>>,
    /// Cut links, each pair stored smallest id first.
    cut: Mutex<BTreeSet<(MemberId, MemberId)>>,
    paused: Mutex<BTreeSet<MemberId>>,
}

fn pair(a: &MemberId, b: &MemberId) -> (MemberId, MemberId) {
    if a <= b {
        (a.clone(), b.clone())
    } else {
        (b.clone(), a.clone())
    }
}

impl Switchboard {
    pub fn is_cut(&self, a: &MemberId, b: &MemberId) -> bool {
        self.cut.lock().unwrap().contains(&pair(a, b))
    }

    pub fn cut(&self, a: &MemberId, b: &MemberId) {
        self.cut.lock().unwrap().insert(pair(a, b));
    }

    /// Cuts every link of `member`.
    pub fn isolate(&self, member: &MemberId, all: &[MemberId]) {
        for other in all.iter().filter(|o| *o != member) {
            self.cut(member, other);
        }
    }

    /// Cuts every link between members of different sides (a member on no side keeps
    /// every link: with two sides, it is a bridge between them).
    pub fn partition(&self, sides: &[Vec<MemberId>]) {
        for (i, side) in sides.iter().enumerate() {
            for other in &sides[i + 1..] {
                for a in side {
                    for b in other {
                        self.cut(a, b);
                    }
                }
            }
        }
    }

    /// Members in a ring, each linked only to its two neighbours: with five, every member
    /// sees a majority (itself and two), and no two see the same one.
    pub fn ring(&self, order: &[MemberId]) {
        let n = order.len();
        for i in 0..n {
            for j in i + 1..n {
                let adjacent = j == i + 1 || (i == 0 && j == n - 1);
                if !adjacent {
                    self.cut(&order[i], &order[j]);
                }
            }
        }
    }

    pub fn heal(&self) {
        self.cut.lock().unwrap().clear();
    }

    pub fn pause(&self, member: &MemberId) {
        self.paused.lock().unwrap().insert(member.clone());
    }

    pub fn resume(&self, member: &MemberId) {
        self.paused.lock().unwrap().remove(member);
    }

    pub fn resume_all(&self) {
        self.paused.lock().unwrap().clear();
    }

    fn is_paused(&self, member: &MemberId) -> bool {
        self.paused.lock().unwrap().contains(member)
    }

    /// Waits until neither member is paused.
    pub async fn until_running(&self, a: &MemberId, b: &MemberId) {
        while self.is_paused(a) || self.is_paused(b) {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    pub fn group(&self, member: &MemberId) -> Option<Group> {
        self.members.lock().unwrap().get(member).cloned()
    }
}

/// One member's side of the in-memory network.
#[derive(Debug)]
pub struct MemRpc {
    pub from: MemberId,
    pub board: Arc<Switchboard>,
}

impl Rpc for MemRpc {
    fn call(&self, to: &MemberId, _addr: &str, request: Vec<u8>, timeout: Duration) -> RpcFuture {
        let board = Arc::clone(&self.board);
        let (from, to) = (self.from.clone(), to.clone());
        Box::pin(async move {
            if board.is_cut(&from, &to) || board.group(&to).is_none() {
                tokio::time::sleep(timeout.min(Duration::from_millis(50))).await;
                return Err(RpcError::Unreachable(to.0));
            }
            // The message travels on its own: if the caller gives up, a paused member still
            // receives it late, as a stopped process reads its socket when it resumes.
            let (reply_to, reply) = tokio::sync::oneshot::channel();
            let member = to.clone();
            tokio::spawn(async move {
                board.until_running(&from, &member).await;
                let Some(group) = board.group(&member) else {
                    return;
                };
                if board.is_cut(&from, &member) {
                    return;
                }
                let answer = group.serve(&request).await;
                board.until_running(&from, &member).await;
                if !board.is_cut(&from, &member) {
                    let _ = reply_to.send(answer);
                }
            });
            match tokio::time::timeout(timeout, reply).await {
                Ok(Ok(answer)) => Ok(answer),
                _ => Err(RpcError::Timeout {
                    member: to.0,
                    timeout,
                }),
            }
        })
    }
}

/// The real clock moved by a fixed offset.
#[derive(Debug)]
pub struct Skewed(pub i64);

impl PhysicalClock for Skewed {
    fn now_ms(&self) -> u64 {
        SystemClock.now_ms().saturating_add_signed(self.0)
    }
}

/// How the members of a [`Cluster`] are set up.
#[derive(Debug, Clone)]
pub struct Settings {
    pub snapshot_every: u64,
    pub kept_behind_snapshot: u64,
    pub request_timeout: Duration,
    /// Clock offset of each member, in ms (members not named run on the real clock).
    pub skew_ms: BTreeMap<MemberId, i64>,
    /// Where a member's files go (members not named: under the system's temporary dir).
    pub parent_dir: BTreeMap<MemberId, std::path::PathBuf>,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            snapshot_every: 10_000,
            kept_behind_snapshot: 0,
            request_timeout: Duration::from_secs(5),
            skew_ms: BTreeMap::new(),
            parent_dir: BTreeMap::new(),
        }
    }
}

pub struct Cluster {
    pub board: Arc<Switchboard>,
    pub dirs: BTreeMap<MemberId, tempfile::TempDir>,
    pub voters: BTreeMap<MemberId, String>,
    pub settings: Settings,
}

impl Cluster {
    pub async fn new(names: &[&str], snapshot_every: u64) -> Self {
        let settings = Settings {
            snapshot_every,
            ..Settings::default()
        };
        Self::with(names, settings).await
    }

    pub async fn with(names: &[&str], settings: Settings) -> Self {
        let voters: BTreeMap<MemberId, String> =
            names.iter().map(|n| (id(n), format!("mem:{n}"))).collect();
        let mut cluster = Cluster {
            board: Arc::default(),
            dirs: BTreeMap::new(),
            voters,
            settings,
        };
        for name in names {
            let dir = match cluster.settings.parent_dir.get(&id(name)) {
                Some(parent) => tempfile::tempdir_in(parent),
                None => tempfile::tempdir(),
            };
            cluster.dirs.insert(id(name), dir.unwrap());
        }
        for name in names {
            cluster.start(name).await;
        }
        cluster
    }

    pub fn ids(&self) -> Vec<MemberId> {
        self.voters.keys().cloned().collect()
    }

    pub async fn start(&self, name: &str) -> Group {
        let member = id(name);
        let mut config = GroupConfig::new(
            member.clone(),
            format!("mem:{name}"),
            self.dirs[&member].path().to_owned(),
            self.voters.clone(),
        );
        config.snapshot_every = self.settings.snapshot_every;
        config.kept_behind_snapshot = self.settings.kept_behind_snapshot;
        config.request_timeout = self.settings.request_timeout;
        if let Some(skew) = self.settings.skew_ms.get(&member) {
            config.clock = Arc::new(Skewed(*skew));
        }
        // A stopped member's files stay open until the calls that were inside it when it
        // stopped return (clients and peers hold it for up to a request timeout): a restart
        // right after a stop waits for them.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        let group = loop {
            let rpc = Arc::new(MemRpc {
                from: member.clone(),
                board: Arc::clone(&self.board),
            });
            match Group::start(config.clone(), rpc).await {
                Ok(group) => break group,
                Err(err) if tokio::time::Instant::now() < deadline => {
                    eprintln!("{name} restarts once its earlier run lets go of its files: {err}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(err) => panic!("{name} could not start: {err}"),
            }
        };
        self.board
            .members
            .lock()
            .unwrap()
            .insert(member, group.clone());
        group
    }

    pub fn group(&self, name: &str) -> Group {
        self.board.members.lock().unwrap()[&id(name)].clone()
    }

    pub async fn stop(&self, name: &str) {
        let group = self.board.members.lock().unwrap().remove(&id(name));
        if let Some(group) = group {
            group.shutdown().await;
        }
    }

    /// The member every running voter agrees leads, if any.
    pub fn agreed_leader(&self) -> Option<String> {
        let groups: Vec<Group> = self
            .board
            .members
            .lock()
            .unwrap()
            .values()
            .cloned()
            .collect();
        let statuses: Vec<_> = groups.iter().map(Group::status).collect();
        let leader = statuses.iter().find(|s| s.state == "leader")?;
        statuses
            .iter()
            .all(|s| s.leader.as_deref() == Some(leader.id.as_str()))
            .then(|| leader.id.clone())
    }

    /// Waits until some member leads and every running voter knows it; returns its name.
    pub async fn leader(&self) -> String {
        for _ in 0..400 {
            if let Some(leader) = self.agreed_leader() {
                return leader;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("no leader elected in 20 s");
    }
}
