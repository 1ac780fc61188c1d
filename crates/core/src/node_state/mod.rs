//! One node of the leaderless cluster, as a sans-io state machine.
//!
//! [`NodeState::step`] takes one [`Input`] (a client's call, a peer's message, the answer of
//! an engine operation, a change of a member's liveness, or time passing) at a time given by
//! the caller, and returns the [`Effect`]s to carry out, in order. It never reads a clock,
//! touches a disk or opens a socket: the node runtime (`agentstore-cluster`) executes the
//! effects on the engine and the transport, and the simulator (`agentstore-sim`) executes the
//! same effects on in-memory stores and a simulated network.
//!
//! Its duties, each in its own module:
//!
//! - coordinating client reads and writes over the key's replicas ([`Coordinator`]), and a
//!   replica's part in others' requests (merge and acknowledge, answer reads);
//! - forwarding a write to one of its key's replicas when this node is not one of them
//!   ([`forwarding`]);
//! - hinted handoff: delivering stored hints to the replica that missed a write ([`upkeep`]);
//! - handoff of records whose key moved away (a member joined, or this node leaves), and
//!   collection of tombstones every replica holds ([`upkeep`]);
//! - Merkle-tree anti-entropy rounds and repairs ([`anti_entropy`]);
//! - scans across the members ([`scans`]).
//!
//! Every request this node sends and waits for has one id from one counter, and one typed
//! [`Job`] saying whose it is: no bits of the id carry meaning.

pub mod anti_entropy;
pub mod forwarding;
pub mod observe;
pub mod scans;
pub mod upkeep;

use std::collections::{BTreeMap, BTreeSet};

use crate::key::Key;
use crate::node::NodeId;
use crate::placement::Ring;
use crate::record::{Mutation, Record};
use crate::replication::{self, Coordinator, LocalFailure, Message, Outcome, RequestId};

pub use anti_entropy::{Change, RecordsJob, RepairStep, SWEEP_EVERY};
pub use scans::ScanPage;
pub use upkeep::{Purpose, StoredHint};

use anti_entropy::Repair;
use forwarding::Forwarded;
use observe::AcknowledgedWrites;
use scans::PendingScan;
use upkeep::Asked;

/// Identifies a caller of the node (the runtime's or the simulator's own number): the
/// answers to its [`Call`] carry it.
pub type Caller = u64;

/// Keys whose last acknowledged write a node remembers (read-your-writes violations).
const ACKNOWLEDGED_KEYS: usize = 16_384;

/// How a node behaves: the cluster's N, W and R, and its timings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settings {
    /// This node.
    pub id: NodeId,
    /// Replicas per key (N).
    pub replicas: usize,
    /// Write quorum (W).
    pub write_quorum: usize,
    /// Read quorum (R).
    pub read_quorum: usize,
    /// How long a request waits for its quorum.
    pub request_timeout_ms: u64,
    /// How often this node compares its data with peers, taking them in turn: one a round in
    /// a cluster of up to 9 nodes, more in a larger one, so that every member is compared
    /// with once in [`anti_entropy::SWEEP_ROUNDS`] rounds. Each round also hands off and
    /// collects tombstones. The first round is one interval after
    /// start: a node just started has no connection yet, and a round racing the first writes
    /// would repair what replication is still delivering.
    pub anti_entropy_interval_ms: u64,
    /// How old a tombstone must be before it is collected (once every replica holds it).
    /// Longer than a replica may stay down with hints waiting for it: a hint older than the
    /// tombstone, delivered after the collection, would bring the deleted value back.
    pub tombstone_grace_ms: u64,
    /// How often stored hints are delivered (and quorum reachability observed).
    pub hint_interval_ms: u64,
    /// How long a handoff, a tombstone question or a hint delivery waits for its answers
    /// before it is asked again.
    pub retry_ms: u64,
    /// How long a repair waits for one member's comparison.
    pub repair_wait_ms: u64,
    /// How long a leave may take to hand every record over.
    pub leave_timeout_ms: u64,
    /// Virtual nodes per member on the placement ring.
    pub vnodes: u16,
    /// Depth of the first level of anti-entropy comparison (`2^depth` buckets, their sums
    /// sent whole every round).
    pub tree_depth: u8,
    /// Depth of the second level: only the subtrees of buckets that differ are sent, so only
    /// the records of the sub-buckets that differ cross the network.
    pub fine_depth: u8,
}

impl Settings {
    /// The settings of node `id` with N, W and R, and the default timings.
    pub fn new(id: NodeId, replicas: usize, write_quorum: usize, read_quorum: usize) -> Self {
        Self {
            id,
            replicas,
            write_quorum,
            read_quorum,
            request_timeout_ms: 5_000,
            anti_entropy_interval_ms: 30_000,
            tombstone_grace_ms: 24 * 3_600_000,
            hint_interval_ms: 500,
            retry_ms: 5_000,
            repair_wait_ms: 5_000,
            leave_timeout_ms: 60_000,
            vnodes: 64,
            tree_depth: 6,
            fine_depth: 12,
        }
    }
}

/// Whether a member answers, as this node's failure detector sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Liveness {
    /// Answers probes.
    Alive,
    /// Missed probes; declared dead unless it refutes in time.
    Suspect,
    /// Declared dead (or never heard from: a seed not yet reached).
    Dead,
}

impl Liveness {
    /// `alive`, `suspect` or `dead`, as the status shows it.
    pub fn as_str(self) -> &'static str {
        match self {
            Liveness::Alive => "alive",
            Liveness::Suspect => "suspect",
            Liveness::Dead => "dead",
        }
    }
}

/// What a client asks of the node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Call {
    /// Write `mutation` to `key` (coordinated here if this node is a replica, else forwarded).
    Write {
        /// The key.
        key: Key,
        /// The change.
        mutation: Mutation,
    },
    /// Read `key` from R of its replicas.
    Read {
        /// The key.
        key: Key,
    },
    /// List the records of keys starting with `prefix`, after `after`, at most `limit`, from
    /// every member.
    Scan {
        /// The key prefix.
        prefix: Vec<u8>,
        /// Resume after this key.
        after: Option<Key>,
        /// At most this many records.
        limit: u32,
    },
    /// Compare with every member now, one after the other.
    Repair,
    /// Leave the cluster for good, after handing every record to its new replicas.
    Leave,
}

/// The answer to a [`Call`].
#[derive(Debug, Clone, PartialEq)]
pub enum Answer {
    /// A write's outcome.
    Write(Outcome),
    /// A read's outcome.
    Read(Outcome),
    /// A scan's page.
    Scan(ScanPage),
    /// How a repair goes: several answers, the last one [`RepairEvent::Over`].
    Repair(RepairEvent),
    /// The leave is over: `Err` with the records not yet handed over if it took too long (0:
    /// every record is over, but a live member has not confirmed it knows)
    /// (the node is still a member, and may be asked to leave again).
    Leave(Result<(), usize>),
}

/// A repair's progress, as its caller hears it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RepairEvent {
    /// Another repair runs: this one is refused.
    Refused,
    /// The repair started.
    Started,
    /// One member was compared.
    Step(RepairStep),
    /// Every member was compared.
    Over,
}

/// What happened that the runtime measures (its metrics).
#[derive(Debug, Clone, PartialEq)]
pub enum Observation {
    /// A replica acknowledged a client write this long after it was sent.
    ReplicationLag {
        /// Milliseconds.
        ms: u64,
    },
    /// The share of keys whose write and read quorums are reachable, held for `over_ms`.
    QuorumReachable {
        /// Share with a reachable write quorum.
        write: f64,
        /// Share with a reachable read quorum.
        read: f64,
        /// Milliseconds since the last observation.
        over_ms: u64,
    },
    /// A peer's read or forwarded write arrived after its deadline and was dropped.
    Expired,
    /// A read through this node missed a write this node acknowledged.
    ReadYourWritesMissed,
    /// Anti-entropy sent a peer one record it lacked.
    Repaired,
    /// A write this node coordinated for a peer ended so.
    ForwardedWrite(Outcome),
}

/// What happens to the node.
#[derive(Debug, Clone, PartialEq)]
pub enum Input {
    /// A client calls.
    Call {
        /// Who waits for the answer.
        caller: Caller,
        /// What it asks.
        call: Call,
    },
    /// A peer's message (`deadline_ms`: when its sender stops waiting; 0 for never).
    Received {
        /// The sender.
        from: NodeId,
        /// The message.
        message: Message,
        /// The envelope's deadline.
        deadline_ms: u64,
    },
    /// [`Effect::Apply`] is done.
    Applied {
        /// The request.
        request: RequestId,
        /// The resulting record, or why it failed.
        result: Result<Record, LocalFailure>,
    },
    /// [`Effect::Read`] is done.
    LocalRead {
        /// The request.
        request: RequestId,
        /// The record (`None` also when the read failed: the other replicas still answer).
        record: Option<Record>,
    },
    /// [`Effect::ScanLocal`] is done (an empty page if it failed).
    LocalPage {
        /// The scan.
        request: RequestId,
        /// The records.
        entries: Vec<(Key, Record)>,
    },
    /// [`Effect::LoadRecords`] is done: the local records it asked for (every one, or those
    /// of the fine buckets of [`RecordsJob::buckets`]), in key order, read in one snapshot.
    Records {
        /// What they were loaded for.
        job: RecordsJob,
        /// The last commit the snapshot includes (as numbered in [`Input::Committed`]).
        seq: u64,
        /// The records.
        records: Vec<(Key, Record)>,
    },
    /// [`Effect::LoadRecords`] failed (the engine could not read): nothing was loaded.
    LoadFailed {
        /// What the load was for.
        job: RecordsJob,
    },
    /// The local engine committed changes to records (any write: a coordinated write, a
    /// merge, a purge), numbered in commit order; `None`: it changed records it cannot
    /// describe. The anti-entropy trees follow these, so a comparison needs no load.
    Committed {
        /// The commit's number.
        seq: u64,
        /// What changed.
        changes: Option<Vec<Change>>,
    },
    /// [`Effect::LoadHints`] is done.
    Hints {
        /// The peer they are for.
        peer: NodeId,
        /// Its stored hints.
        hints: Vec<StoredHint>,
    },
    /// The failure detector's view of a member changed (`Alive` for a node not known yet:
    /// it joined).
    Liveness {
        /// The member.
        member: NodeId,
        /// How it is.
        liveness: Liveness,
    },
    /// Time passed (the runtime ticks every 10 ms).
    Tick,
}

/// What the runtime must do.
#[derive(Debug, Clone, PartialEq)]
pub enum Effect {
    /// Send `message` to `to` (`deadline_ms`: when this node stops waiting; 0 for never).
    Send {
        /// The recipient.
        to: NodeId,
        /// The message.
        message: Message,
        /// The envelope's deadline.
        deadline_ms: u64,
    },
    /// Apply `mutation` to `key` on the local engine (checking its signature, if the
    /// collection is signed), then feed [`Input::Applied`].
    Apply {
        /// The request.
        request: RequestId,
        /// The key.
        key: Key,
        /// The change.
        mutation: Mutation,
    },
    /// Read `key` on the local engine, then feed [`Input::LocalRead`].
    Read {
        /// The request.
        request: RequestId,
        /// The key.
        key: Key,
    },
    /// Merge `record` into `key` on the local engine, unless its signature does not hold, or
    /// it is a tombstone stamped at or before `horizon_ms` and nothing of the key is stored
    /// (see [`upkeep::past_grace_tombstone`]). Once it is durable (or was already held), send
    /// [`Message::Replicated`] for `ack`'s request to `ack`'s node, if any.
    Merge {
        /// The key.
        key: Key,
        /// The state to merge.
        record: Record,
        /// The collection horizon.
        horizon_ms: u64,
        /// Whom to acknowledge.
        ack: Option<(NodeId, RequestId)>,
    },
    /// Read `key` on the local engine and send it to `to` as [`Message::ReadReply`].
    ServeRead {
        /// The asking node.
        to: NodeId,
        /// Its request.
        request: RequestId,
        /// The key.
        key: Key,
    },
    /// Scan the local engine and send the page to `to` as [`Message::Scanned`].
    ServeScan {
        /// The asking node.
        to: NodeId,
        /// Its request.
        request: RequestId,
        /// The key prefix.
        prefix: Vec<u8>,
        /// Resume after this key.
        after: Option<Key>,
        /// At most this many records.
        limit: usize,
    },
    /// Scan the local engine for this node's own scan, then feed [`Input::LocalPage`].
    ScanLocal {
        /// The scan.
        request: RequestId,
        /// The key prefix.
        prefix: Vec<u8>,
        /// Resume after this key.
        after: Option<Key>,
        /// At most this many records.
        limit: usize,
    },
    /// Load every local record (or, when [`RecordsJob::buckets`] says so, those of some fine
    /// buckets) in one snapshot, then feed [`Input::Records`].
    LoadRecords {
        /// What for.
        job: RecordsJob,
    },
    /// Remove `key` from the local engine if it still holds exactly `record`.
    Purge {
        /// The key.
        key: Key,
        /// The record the other replicas hold.
        record: Record,
        /// Why.
        purpose: Purpose,
    },
    /// Store `record` for `node` durably (a hint), to deliver when it is reachable again.
    StoreHint {
        /// The replica that missed the write.
        node: NodeId,
        /// The key.
        key: Key,
        /// The state to deliver.
        record: Record,
    },
    /// Load the hints stored for `peer`, then feed [`Input::Hints`].
    LoadHints {
        /// The peer.
        peer: NodeId,
    },
    /// `peer` holds the hint `id`: remove it.
    RemoveHint {
        /// The peer.
        peer: NodeId,
        /// The hint.
        id: u64,
    },
    /// Answer a caller.
    Answer {
        /// The caller.
        caller: Caller,
        /// The answer.
        answer: Answer,
    },
    /// The members that hold keys besides this node changed: these, in id order.
    Placement {
        /// The other members.
        others: Vec<NodeId>,
    },
    /// Every record is with its new replicas: leave the membership protocol.
    Left,
    /// Something to measure.
    Observe(Observation),
}

/// Who waits for a request the coordinator runs.
#[derive(Debug)]
enum Waiter {
    /// A client of this node.
    Client {
        caller: Caller,
        key: Key,
        write: bool,
    },
    /// A node that forwarded the write, under its own request id.
    Peer { origin: NodeId, theirs: RequestId },
}

/// Whose is each request this node sent and waits for.
#[derive(Debug)]
enum Job {
    /// A read or write the coordinator runs.
    Coordinated(Waiter),
    /// A write forwarded to one of its replicas.
    Forwarded(Forwarded),
    /// A record handed to the replicas of a key this node no longer replicates.
    Handoff(Asked),
    /// A tombstone whose copies the other replicas are asked for before it is collected.
    Collect(Asked),
    /// A stored hint being delivered.
    Hint { peer: NodeId, id: u64, sent_ms: u64 },
    /// A scan across the members.
    Scan(PendingScan),
}

/// A leave in progress.
#[derive(Debug)]
struct Leaving {
    callers: Vec<Caller>,
    until_ms: u64,
    /// Members that confirmed they took this node out of placement.
    informed: BTreeSet<NodeId>,
}

/// One node.
#[derive(Debug)]
pub struct NodeState {
    settings: Settings,
    coordinator: Coordinator,
    ring: Ring,
    /// The other members (they hold keys, whether they answer or not) and their liveness.
    members: BTreeMap<NodeId, Liveness>,
    /// Members that left (told us so): the failure detector no longer makes them members.
    departed: BTreeSet<NodeId>,
    jobs: BTreeMap<RequestId, Job>,
    /// When each client write was first sent to the replicas (replication lag).
    replicating: BTreeMap<RequestId, u64>,
    acknowledged: AcknowledgedWrites,
    repair: Option<Repair>,
    leaving: Option<Leaving>,
    /// This node left the cluster: it places nothing on itself any more.
    left: bool,
    next_request: RequestId,
    /// The peer the next anti-entropy round compares with.
    next_peer: usize,
    next_round_ms: u64,
    next_hints_ms: u64,
    observed_ms: u64,
    /// A round's records are being loaded (one round at a time).
    round_loading: bool,
    /// The anti-entropy trees, kept current by the engine's commits (dropped when placement
    /// changes: trees of another placement compare other key sets; rebuilt by a load).
    trees: anti_entropy::Trees,
    /// Rounds run, for the sweeps (a load of every record) every [`SWEEP_EVERY`] rounds.
    rounds: u64,
    /// The time of the last [`Input::Tick`].
    last_tick_ms: u64,
    /// The replicas of the sample keys quorum reachability is measured on, under the current
    /// placement (computed when first needed: sampling the ring costs hundreds of lookups).
    samples: Option<Vec<Vec<NodeId>>>,
}

impl NodeState {
    /// A node started at `now_ms`, with `seeds` as members (they hold keys from the start, and
    /// count as dead until the failure detector hears from them).
    pub fn new(settings: Settings, seeds: impl IntoIterator<Item = NodeId>, now_ms: u64) -> Self {
        let members: BTreeMap<NodeId, Liveness> = seeds
            .into_iter()
            .filter(|id| *id != settings.id)
            .map(|id| (id, Liveness::Dead))
            .collect();
        let mut state = Self {
            coordinator: Coordinator::new(settings.id.clone()),
            ring: Ring::new([settings.id.clone()], settings.vnodes),
            members,
            departed: BTreeSet::new(),
            jobs: BTreeMap::new(),
            replicating: BTreeMap::new(),
            acknowledged: AcknowledgedWrites::new(ACKNOWLEDGED_KEYS),
            repair: None,
            leaving: None,
            left: false,
            next_request: 1,
            // Nodes start their sweeps at different members, so a round's comparisons spread.
            next_peer: crate::hash::stable_hash(0, settings.id.as_str().as_bytes()) as usize % 1024,
            next_round_ms: now_ms + settings.anti_entropy_interval_ms,
            next_hints_ms: now_ms + settings.hint_interval_ms,
            observed_ms: now_ms,
            round_loading: false,
            trees: anti_entropy::Trees::default(),
            rounds: 0,
            last_tick_ms: now_ms,
            samples: None,
            settings,
        };
        state.rebuild_ring(&mut Vec::new());
        state
    }

    /// The node's settings.
    pub fn settings(&self) -> &Settings {
        &self.settings
    }

    /// The key's replicas under the current placement.
    pub fn replicas(&self, key: &Key) -> Vec<NodeId> {
        self.ring.replicas(key.as_bytes(), self.settings.replicas)
    }

    /// The other members and their liveness.
    pub fn members(&self) -> &BTreeMap<NodeId, Liveness> {
        &self.members
    }

    /// Whether this node is leaving (it places nothing on itself).
    pub fn is_leaving(&self) -> bool {
        self.leaving.is_some()
    }

    /// Whether this node left the cluster.
    pub fn has_left(&self) -> bool {
        self.left
    }

    /// Whether placement counts this node (it neither leaves nor left).
    fn places_on_itself(&self) -> bool {
        self.leaving.is_none() && !self.left
    }

    /// Requests in flight: coordinated (waiting for a quorum or late replicas) and forwarded.
    pub fn in_flight(&self) -> usize {
        let forwarded = self
            .jobs
            .values()
            .filter(|job| matches!(job, Job::Forwarded(_)))
            .count();
        self.coordinator.in_flight() + forwarded
    }

    /// Each member's share of keys (of N copies each; the shares add up to N), this node
    /// included, from a fixed sample of keys.
    pub fn shares(&self) -> BTreeMap<NodeId, f64> {
        const SAMPLE: usize = 4096;
        let mut shares: BTreeMap<NodeId, f64> =
            self.members.keys().map(|id| (id.clone(), 0.0)).collect();
        shares.insert(self.settings.id.clone(), 0.0);
        for i in 0..SAMPLE {
            for node in self
                .ring
                .replicas(format!("sample:{i}").as_bytes(), self.settings.replicas)
            {
                if let Some(share) = shares.get_mut(&node) {
                    *share += 1.0 / SAMPLE as f64;
                }
            }
        }
        shares
    }

    /// Feeds one input at time `now_ms`; returns what to do, in order.
    pub fn step(&mut self, input: Input, now_ms: u64) -> Vec<Effect> {
        let mut effects = Vec::new();
        match input {
            Input::Call { caller, call } => self.call(caller, call, now_ms, &mut effects),
            Input::Received {
                from,
                message,
                deadline_ms,
            } => self.received(from, message, deadline_ms, now_ms, &mut effects),
            Input::Applied { request, result } => {
                let input = replication::Input::LocalApplied { request, result };
                self.coordinate(input, now_ms, &mut effects);
            }
            Input::LocalRead { request, record } => {
                let input = replication::Input::LocalRead { request, record };
                self.coordinate(input, now_ms, &mut effects);
            }
            Input::LocalPage { request, entries } => {
                self.local_page(request, entries, &mut effects)
            }
            Input::Records { job, seq, records } => {
                self.records(job, seq, records, now_ms, &mut effects)
            }
            Input::Committed { seq, changes } => self.committed(seq, changes),
            Input::LoadFailed { job } => self.load_failed(job),
            Input::Hints { peer, hints } => self.deliver_hints(peer, hints, now_ms, &mut effects),
            Input::Liveness { member, liveness } => self.liveness(member, liveness, &mut effects),
            Input::Tick => self.tick(now_ms, &mut effects),
        }
        effects
    }

    fn next_request(&mut self) -> RequestId {
        let request = self.next_request;
        self.next_request += 1;
        request
    }

    fn deadline(&self, now_ms: u64) -> u64 {
        now_ms + self.settings.request_timeout_ms
    }

    fn call(&mut self, caller: Caller, call: Call, now_ms: u64, effects: &mut Vec<Effect>) {
        let deadline_ms = self.deadline(now_ms);
        match call {
            Call::Write { key, mutation } => {
                let request = self.next_request();
                let replicas = self.replicas(&key);
                if !replicas.contains(&self.settings.id) {
                    self.forward(caller, request, key, mutation, replicas, now_ms, effects);
                    return;
                }
                let waiter = Waiter::Client {
                    caller,
                    key: key.clone(),
                    write: true,
                };
                self.jobs.insert(request, Job::Coordinated(waiter));
                let input = replication::Input::Write {
                    request,
                    key,
                    mutation,
                    replicas,
                    w: self.settings.write_quorum,
                    deadline_ms,
                };
                self.coordinate(input, now_ms, effects);
            }
            Call::Read { key } => {
                let request = self.next_request();
                let waiter = Waiter::Client {
                    caller,
                    key: key.clone(),
                    write: false,
                };
                self.jobs.insert(request, Job::Coordinated(waiter));
                let input = replication::Input::Read {
                    request,
                    replicas: self.replicas(&key),
                    key,
                    r: self.settings.read_quorum,
                    deadline_ms,
                };
                self.coordinate(input, now_ms, effects);
            }
            Call::Scan {
                prefix,
                after,
                limit,
            } => self.start_scan(caller, prefix, after, limit, deadline_ms, effects),
            Call::Repair => self.start_repair(caller, now_ms, effects),
            Call::Leave => {
                // One leave at a time: a second caller hears how the first one ends.
                let leaving = self.leaving.get_or_insert_with(|| Leaving {
                    callers: Vec::new(),
                    until_ms: now_ms + self.settings.leave_timeout_ms,
                    informed: BTreeSet::new(),
                });
                leaving.callers.push(caller);
                self.rebuild_ring(effects);
                self.load(RecordsJob::Round { compare: false }, effects);
            }
        }
    }

    /// A peer's message: a replica's duties, and answers to this node's requests.
    fn received(
        &mut self,
        from: NodeId,
        message: Message,
        deadline_ms: u64,
        now_ms: u64,
        effects: &mut Vec<Effect>,
    ) {
        // Work whose requester has given up is dropped (reads, and forwarded writes, which the
        // forwarding node has answered as indeterminate by now).
        let reads_or_forwards = matches!(message, Message::Read { .. } | Message::Forward { .. });
        if reads_or_forwards && deadline_ms != 0 && deadline_ms < now_ms {
            effects.push(Effect::Observe(Observation::Expired));
            return;
        }
        match message {
            Message::Replicate {
                request,
                key,
                record,
            } => effects.push(Effect::Merge {
                key,
                record,
                horizon_ms: self.collect_horizon(now_ms),
                ack: (request != 0).then_some((from, request)),
            }),
            Message::Read { request, key } => effects.push(Effect::ServeRead {
                to: from,
                request,
                key,
            }),
            Message::Forward {
                request: theirs,
                key,
                mutation,
            } => {
                let request = self.next_request();
                let waiter = Waiter::Peer {
                    origin: from,
                    theirs,
                };
                self.jobs.insert(request, Job::Coordinated(waiter));
                let input = replication::Input::Write {
                    request,
                    replicas: self.replicas(&key),
                    key,
                    mutation,
                    w: self.settings.write_quorum,
                    deadline_ms: self.deadline(now_ms),
                };
                self.coordinate(input, now_ms, effects);
            }
            Message::Forwarded { request, outcome } => self.forwarded(request, outcome, effects),
            Message::Scan {
                request,
                prefix,
                after,
                limit,
            } => effects.push(Effect::ServeScan {
                to: from,
                request,
                prefix,
                after,
                // At most 1000 records a page: a page stays far below the frame limit.
                limit: limit.min(1000) as usize,
            }),
            Message::Scanned { request, entries } => self.scanned(&from, request, entries, effects),
            Message::Leaving => {
                // Confirmed every time: the leaving node waits for it.
                effects.push(Effect::Send {
                    to: from.clone(),
                    message: Message::Departed {
                        nodes: vec![from.clone()],
                    },
                    deadline_ms: 0,
                });
                self.departed([from], effects)
            }
            Message::Departed { nodes } => {
                if let Some(leaving) = &mut self.leaving
                    && nodes.contains(&self.settings.id)
                {
                    leaving.informed.insert(from.clone());
                }
                self.departed(nodes, effects)
            }
            Message::TreeLeaves { depth, leaves } => {
                if depth == self.settings.tree_depth {
                    // Answered from the trees the commits keep current: a comparison costs
                    // no load of every record.
                    if self.has_trees() {
                        self.answer_leaves(from, leaves, effects);
                    } else {
                        self.load(RecordsJob::CompareTrees { from, leaves }, effects);
                    }
                }
            }
            Message::SubLeaves {
                depth,
                coarse,
                buckets,
            } => {
                let width = 1usize << self.settings.fine_depth.saturating_sub(coarse);
                let fits = depth == self.settings.fine_depth
                    && coarse == self.settings.tree_depth
                    && buckets.iter().all(|(_, leaves)| leaves.len() == width);
                if fits && self.has_trees() {
                    self.compare_sub_leaves(&from, buckets, None, effects);
                } else if fits {
                    self.load(RecordsJob::CompareSubLeaves { from, buckets }, effects);
                }
            }
            Message::Buckets { depth, buckets } => {
                if depth == self.settings.fine_depth && !buckets.is_empty() {
                    let buckets = buckets.into_iter().map(|b| b as usize).collect();
                    self.load(RecordsJob::SendBuckets { to: from, buckets }, effects);
                }
            }
            Message::ReadReply { request, record } => match self.jobs.get(&request) {
                Some(Job::Collect(_)) => self.tombstone_confirmed(&from, request, record, effects),
                _ => {
                    let message = Message::ReadReply { request, record };
                    let input = replication::Input::Received { from, message };
                    self.coordinate(input, now_ms, effects);
                }
            },
            Message::Replicated { request } => match self.jobs.get(&request) {
                Some(Job::Handoff(_)) => self.handoff_acknowledged(&from, request, effects),
                Some(Job::Hint { .. }) => {
                    if let Some(Job::Hint { peer, id, .. }) = self.jobs.remove(&request) {
                        effects.push(Effect::RemoveHint { peer, id });
                    }
                }
                _ => {
                    if let Some(sent) = self.replicating.get(&request) {
                        let ms = now_ms.saturating_sub(*sent);
                        effects.push(Effect::Observe(Observation::ReplicationLag { ms }));
                    }
                    let message = Message::Replicated { request };
                    let input = replication::Input::Received { from, message };
                    self.coordinate(input, now_ms, effects);
                }
            },
            // Another layer's traffic (the membership protocol, Raft, causal replication).
            Message::Gossip { .. }
            | Message::Raft { .. }
            | Message::RaftReply { .. }
            | Message::CausalWrites { .. }
            | Message::CausalHave { .. }
            | Message::CausalSnapshot { .. } => {}
        }
    }

    /// Runs the coordinator on one input and turns its effects into the node's.
    fn coordinate(&mut self, input: replication::Input, now_ms: u64, effects: &mut Vec<Effect>) {
        for effect in self.coordinator.step(input, now_ms) {
            match effect {
                replication::Effect::ApplyLocal {
                    request,
                    key,
                    mutation,
                } => effects.push(Effect::Apply {
                    request,
                    key,
                    mutation,
                }),
                replication::Effect::ReadLocal { request, key } => {
                    effects.push(Effect::Read { request, key })
                }
                replication::Effect::MergeLocal { key, record } => effects.push(Effect::Merge {
                    key,
                    record,
                    horizon_ms: self.collect_horizon(now_ms),
                    ack: None,
                }),
                replication::Effect::Send { to, message } => {
                    let deadline_ms = match &message {
                        Message::Replicate { request, .. } => {
                            if *request != 0 {
                                self.replicating.entry(*request).or_insert(now_ms);
                            }
                            // A write is always applied: it is durable where it lands.
                            0
                        }
                        // A read is worth answering only while its coordinator waits.
                        Message::Read { .. } => self.deadline(now_ms),
                        _ => 0,
                    };
                    effects.push(Effect::Send {
                        to,
                        message,
                        deadline_ms,
                    });
                }
                replication::Effect::Hint { node, key, record } => {
                    effects.push(Effect::StoreHint { node, key, record })
                }
                replication::Effect::Reply { request, outcome } => {
                    self.reply(request, outcome, effects)
                }
            }
        }
    }

    /// The coordinator answers a request: to this node's client, or to the forwarding peer.
    fn reply(&mut self, request: RequestId, outcome: Outcome, effects: &mut Vec<Effect>) {
        match self.jobs.remove(&request) {
            Some(Job::Coordinated(Waiter::Client { caller, key, write })) => {
                match &outcome {
                    Outcome::Written { record } => {
                        self.acknowledged.acknowledged(&key, &record.version)
                    }
                    Outcome::Read { record } => {
                        let version = record.as_ref().map(|r| &r.version);
                        if self.acknowledged.missed(&key, version) {
                            effects.push(Effect::Observe(Observation::ReadYourWritesMissed));
                        }
                    }
                    _ => {}
                }
                let answer = if write {
                    Answer::Write(outcome)
                } else {
                    Answer::Read(outcome)
                };
                effects.push(Effect::Answer { caller, answer });
            }
            Some(Job::Coordinated(Waiter::Peer { origin, theirs })) => {
                effects.push(Effect::Observe(Observation::ForwardedWrite(
                    outcome.clone(),
                )));
                effects.push(Effect::Send {
                    to: origin,
                    message: Message::Forwarded {
                        request: theirs,
                        outcome,
                    },
                    deadline_ms: 0,
                });
            }
            Some(other) => {
                // Not the coordinator's: put it back.
                self.jobs.insert(request, other);
            }
            None => {}
        }
    }

    /// The failure detector's news.
    fn liveness(&mut self, member: NodeId, liveness: Liveness, effects: &mut Vec<Effect>) {
        if member == self.settings.id || self.departed.contains(&member) {
            return;
        }
        match self.members.get_mut(&member) {
            Some(known) => *known = liveness,
            None if liveness == Liveness::Alive => {
                self.members.insert(member, liveness);
                self.rebuild_ring(effects);
            }
            None => {}
        }
    }

    /// These nodes left the cluster for good: they leave placement, and the failure detector
    /// no longer makes them members.
    fn departed(&mut self, nodes: impl IntoIterator<Item = NodeId>, effects: &mut Vec<Effect>) {
        let mut changed = false;
        for node in nodes {
            if node != self.settings.id {
                changed |= self.members.remove(&node).is_some();
                self.departed.insert(node);
            }
        }
        if changed {
            self.rebuild_ring(effects);
        }
    }

    /// Placement over the members; a leaving node places nothing on itself.
    fn rebuild_ring(&mut self, effects: &mut Vec<Effect>) {
        self.trees.invalidate();
        let mut nodes: Vec<NodeId> = self.members.keys().cloned().collect();
        if self.places_on_itself() {
            nodes.push(self.settings.id.clone());
        }
        self.ring = Ring::new(nodes, self.settings.vnodes);
        self.samples = None;
        effects.push(Effect::Placement {
            others: self.members.keys().cloned().collect(),
        });
    }

    /// Time passed: deadlines fire, and the periodic duties run when due.
    fn tick(&mut self, now_ms: u64, effects: &mut Vec<Effect>) {
        self.last_tick_ms = now_ms;
        self.coordinate(replication::Input::Tick, now_ms, effects);
        self.expire_forwarded(now_ms, effects);
        self.finish_scans(Some(now_ms), effects);
        self.repair_tick(now_ms, effects);
        if now_ms >= self.next_hints_ms {
            self.next_hints_ms = now_ms + self.settings.hint_interval_ms;
            self.load_hints(now_ms, effects);
            self.observe_quorums(now_ms, effects);
        }
        if now_ms >= self.next_round_ms && !self.round_loading {
            self.next_round_ms = now_ms + self.settings.anti_entropy_interval_ms;
            self.rounds += 1;
            // A sweep loads every record: handoff and tombstone collection need them, and the
            // trees are rebuilt (so no drift outlives a sweep). Between sweeps a round compares
            // from the trees the commits keep current.
            if !self.has_trees() || self.rounds.is_multiple_of(SWEEP_EVERY) {
                self.round_loading = true;
                self.load(RecordsJob::Round { compare: true }, effects);
            } else {
                self.compare_round(effects);
            }
        }
    }

    /// Records how much of the key space has a reachable quorum now, and forgets the send
    /// times of writes old enough that no acknowledgement will be measured for them.
    fn observe_quorums(&mut self, now_ms: u64, effects: &mut Vec<Effect>) {
        let mut alive: BTreeSet<NodeId> = self
            .members
            .iter()
            .filter(|(_, liveness)| **liveness != Liveness::Dead)
            .map(|(id, _)| id.clone())
            .collect();
        alive.insert(self.settings.id.clone());
        let (ring, n) = (&self.ring, self.settings.replicas);
        let samples = self
            .samples
            .get_or_insert_with(|| observe::sample_replicas(ring, n, 256));
        let write = observe::reachable_among(samples, &alive, self.settings.write_quorum);
        let read = observe::reachable_among(samples, &alive, self.settings.read_quorum);
        effects.push(Effect::Observe(Observation::QuorumReachable {
            write,
            read,
            over_ms: now_ms.saturating_sub(self.observed_ms),
        }));
        self.observed_ms = now_ms;
        let horizon = now_ms.saturating_sub(self.settings.request_timeout_ms * 4);
        self.replicating.retain(|_, sent| *sent >= horizon);
    }

    /// Tombstones stamped at or before this time are past the grace period.
    fn collect_horizon(&self, now_ms: u64) -> u64 {
        now_ms.saturating_sub(self.settings.tombstone_grace_ms)
    }

    /// Checks the invariants that hold between any two steps; `Err` names the first broken.
    pub fn validate(&self) -> Result<(), String> {
        let me = &self.settings.id;
        if self.members.contains_key(me) {
            return Err(format!("{me} counts itself among the other members"));
        }
        if let Some(both) = self.members.keys().find(|m| self.departed.contains(*m)) {
            return Err(format!("{both} is both a member and departed"));
        }
        let ring = self.ring.nodes();
        let placed = self.members.len() + usize::from(self.places_on_itself());
        let misplaced = ring.len() != placed
            || ring.contains(me) != self.places_on_itself()
            || self.members.keys().any(|m| !ring.contains(m));
        if misplaced {
            return Err(format!(
                "placement is over {ring:?}, the other members are {:?} and this node {}",
                self.members.keys().collect::<Vec<_>>(),
                if self.places_on_itself() {
                    "holds keys"
                } else {
                    "leaves"
                }
            ));
        }
        if let Some((id, _)) = self.jobs.range(self.next_request..).next() {
            return Err(format!(
                "request {id} is not below the next id {}",
                self.next_request
            ));
        }
        for (id, job) in &self.jobs {
            match job {
                Job::Coordinated(_) if !self.coordinator.is_pending(*id) => {
                    return Err(format!(
                        "request {id} waits for an answer its coordinator forgot"
                    ));
                }
                Job::Forwarded(f) if f.deadline_ms < self.last_tick_ms => {
                    return Err(format!("forwarded write {id} outlived its deadline"));
                }
                Job::Scan(s) if s.deadline_ms < self.last_tick_ms => {
                    return Err(format!("scan {id} outlived its deadline"));
                }
                Job::Collect(asked) if asked.record.dead_since_ms().is_none() => {
                    return Err(format!("collection {id} is of a live record"));
                }
                Job::Handoff(asked) | Job::Collect(asked) if asked.waiting.is_empty() => {
                    return Err(format!("request {id} waits for nobody"));
                }
                _ => {}
            }
        }
        if let Some(repair) = &self.repair {
            repair.validate()?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests;
