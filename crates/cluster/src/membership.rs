//! Who is in the cluster and who is up: SWIM failure detection (the `foca` crate) behind a
//! small sans-io wrapper.
//!
//! foca decides; this module turns its decisions into [`Event`]s for the node loop (send
//! these bytes to that peer, this peer is up, that one is down) and keeps its timers. Time is
//! an argument, so the wrapper never reads a clock.
//!
//! A node starts from its configured peers (seeds): it records them as down and announces
//! itself to each; whichever answers brings it the rest of the cluster. It keeps announcing
//! to members it believes down every two seconds, so a seed that starts later, or a
//! partition that heals, is found again without a restart.
//!
//! Being *up* is not being a *member*: placement (which nodes replicate a key) changes only
//! when a node joins or leaves, never because one stopped answering. A down replica gets
//! hints and anti-entropy; its keys do not move.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::num::{NonZeroU32, NonZeroUsize};
use std::time::{Duration, Instant};

use agentstore_core::NodeId;
use foca::{AccumulatingRuntime, Config, Foca, Identity, Member, OwnedNotification, PostcardCodec};
use rand::SeedableRng;
use rand::rngs::StdRng;
use serde::{Deserialize, Serialize};

/// A node as the membership protocol knows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Peer {
    /// The node's id.
    pub id: NodeId,
    /// Where it listens for peers.
    pub peer_addr: SocketAddr,
    /// Where it listens for clients (unknown for a seed that has not answered yet).
    pub client_addr: Option<SocketAddr>,
    /// Renewed each time the node rejoins after being declared down.
    incarnation: u64,
}

impl Peer {
    /// A running node (this one).
    pub fn new(id: NodeId, peer_addr: SocketAddr, client_addr: SocketAddr) -> Self {
        Self {
            id,
            peer_addr,
            client_addr: Some(client_addr),
            incarnation: 1,
        }
    }

    /// A seed from the configuration: its id and peer address, nothing else yet.
    pub(crate) fn seed(id: NodeId, peer_addr: SocketAddr) -> Self {
        Self {
            id,
            peer_addr,
            client_addr: None,
            incarnation: 0,
        }
    }
}

impl Identity for Peer {
    type Addr = NodeId;

    fn renew(&self) -> Option<Self> {
        Some(Self {
            incarnation: self.incarnation.wrapping_add(1).max(1),
            ..self.clone()
        })
    }

    fn addr(&self) -> NodeId {
        self.id.clone()
    }

    fn win_addr_conflict(&self, adversary: &Self) -> bool {
        self.incarnation > adversary.incarnation
    }
}

pub use agentstore_core::node_state::Liveness;

/// What the node loop must do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// Send this membership packet to the peer.
    Send(Peer, Vec<u8>),
    /// The peer is up (it may be new to the cluster).
    Up(Peer),
    /// The peer is down.
    Down(Peer),
}

/// One node's membership state.
pub struct Membership {
    foca: Foca<Peer, PostcardCodec, StdRng, foca::NoCustomBroadcast>,
    runtime: AccumulatingRuntime<Peer>,
    timers: Vec<(Instant, foca::Timer<Peer>)>,
}

impl std::fmt::Debug for Membership {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Membership")
            .field("members", &self.foca.num_members())
            .finish_non_exhaustive()
    }
}

impl Membership {
    /// The membership of node `me`, expecting a cluster of about `size` nodes; `seed` seeds
    /// the protocol's random choices (whom to probe).
    pub fn new(me: Peer, size: usize, seed: u64) -> Self {
        let size = NonZeroU32::new(u32::try_from(size.max(1)).unwrap_or(u32::MAX))
            .unwrap_or(NonZeroU32::MIN);
        let config = Config {
            // Probe every 500 ms and wait 250 ms for an answer: loopback and LAN clusters
            // notice a dead node within a few seconds.
            probe_period: Duration::from_millis(500),
            probe_rtt: Duration::from_millis(250),
            periodic_announce_to_down_members: Some(foca::PeriodicParams {
                frequency: Duration::from_secs(2),
                num_members: NonZeroUsize::new(3).unwrap_or(NonZeroUsize::MIN),
            }),
            // Members are never forgotten: a dead member is still a replica (see the module
            // documentation), and its status stays visible.
            remove_down_after: None,
            ..Config::new_lan(size)
        };
        Self {
            foca: Foca::new(me, config, StdRng::seed_from_u64(seed), PostcardCodec),
            runtime: AccumulatingRuntime::new(),
            timers: Vec::new(),
        }
    }

    /// Starts from the configured seeds: announce this node to each of them.
    pub fn start(&mut self, seeds: &BTreeMap<NodeId, SocketAddr>, now: Instant) -> Vec<Event> {
        let seeds: Vec<Peer> = seeds
            .iter()
            .map(|(id, addr)| Peer::seed(id.clone(), *addr))
            .collect();
        let _ = self.foca.apply_many(
            seeds.iter().cloned().map(Member::down),
            false,
            &mut self.runtime,
        );
        for seed in seeds {
            if let Err(err) = self.foca.announce(seed, &mut self.runtime) {
                tracing::debug!(%err, "announce failed");
            }
        }
        self.drain(now)
    }

    /// A membership packet from a peer.
    pub fn receive(&mut self, data: &[u8], now: Instant) -> Vec<Event> {
        if let Err(err) = self.foca.handle_data(data, &mut self.runtime) {
            tracing::debug!(%err, "membership packet refused");
        }
        self.drain(now)
    }

    /// Fires the timers that are due.
    pub fn tick(&mut self, now: Instant) -> Vec<Event> {
        let (due, later): (Vec<_>, Vec<_>) = std::mem::take(&mut self.timers)
            .into_iter()
            .partition(|(at, _)| *at <= now);
        self.timers = later;
        for (_, timer) in due {
            if let Err(err) = self.foca.handle_timer(timer, &mut self.runtime) {
                tracing::debug!(%err, "membership timer failed");
            }
        }
        self.drain(now)
    }

    /// Tells the cluster this node is leaving.
    pub fn leave(&mut self, now: Instant) -> Vec<Event> {
        let _ = self.foca.leave_cluster(&mut self.runtime);
        self.drain(now)
    }

    /// Every other member this node has heard of, with its liveness.
    pub fn members(&self) -> Vec<(Peer, Liveness)> {
        self.foca
            .iter_membership_state()
            .map(|member| {
                let liveness = match member.state() {
                    foca::State::Alive => Liveness::Alive,
                    foca::State::Suspect => Liveness::Suspect,
                    foca::State::Down => Liveness::Dead,
                };
                (member.id().clone(), liveness)
            })
            .collect()
    }

    /// The liveness of `node` (`Dead` if unknown).
    pub fn liveness(&self, node: &NodeId) -> Liveness {
        self.foca
            .iter_membership_state()
            .find(|m| m.id().id == *node)
            .map_or(Liveness::Dead, |m| match m.state() {
                foca::State::Alive => Liveness::Alive,
                foca::State::Suspect => Liveness::Suspect,
                foca::State::Down => Liveness::Dead,
            })
    }

    fn drain(&mut self, now: Instant) -> Vec<Event> {
        let mut events = Vec::new();
        while let Some((to, data)) = self.runtime.to_send() {
            events.push(Event::Send(to, data.to_vec()));
        }
        while let Some((after, timer)) = self.runtime.to_schedule() {
            self.timers.push((now + after, timer));
        }
        while let Some(notification) = self.runtime.to_notify() {
            match notification {
                OwnedNotification::MemberUp(peer) | OwnedNotification::Rename(_, peer) => {
                    events.push(Event::Up(peer));
                }
                OwnedNotification::MemberDown(peer) => events.push(Event::Down(peer)),
                _ => {}
            }
        }
        events
    }
}

#[cfg(test)]
mod tests {
    use std::collections::{BTreeSet, VecDeque};

    use super::*;

    /// Three memberships exchanging packets in memory on a virtual clock; `cut` pairs drop
    /// their packets.
    struct World {
        nodes: Vec<Membership>,
        ids: Vec<NodeId>,
        now: Instant,
        queue: VecDeque<(usize, Vec<u8>)>,
        cut: BTreeSet<(usize, usize)>,
    }

    impl World {
        fn new(n: usize, seed: u64) -> Self {
            let ids: Vec<NodeId> = (0..n)
                .map(|i| NodeId::new(format!("n{i}")).unwrap())
                .collect();
            let addr = |i: usize| SocketAddr::from(([127, 0, 0, 1], 7000 + i as u16));
            let now = Instant::now();
            let mut world = Self {
                nodes: Vec::new(),
                ids: ids.clone(),
                now,
                queue: VecDeque::new(),
                cut: BTreeSet::new(),
            };
            for (i, id) in ids.iter().enumerate() {
                let me = Peer::new(id.clone(), addr(i), addr(i));
                world.nodes.push(Membership::new(me, n, seed + i as u64));
            }
            for i in 0..n {
                let seeds: BTreeMap<NodeId, SocketAddr> = (0..n)
                    .filter(|j| *j != i)
                    .map(|j| (ids[j].clone(), addr(j)))
                    .collect();
                let events = world.nodes[i].start(&seeds, now);
                world.deliver(i, events);
            }
            world
        }

        fn index(&self, id: &NodeId) -> usize {
            self.ids.iter().position(|i| i == id).unwrap()
        }

        fn deliver(&mut self, from: usize, events: Vec<Event>) {
            for event in events {
                if let Event::Send(to, data) = event {
                    let to = self.index(&to.id);
                    if !self.cut.contains(&(from.min(to), from.max(to))) {
                        self.queue.push_back((to, data));
                    }
                }
            }
        }

        /// Runs `ms` of virtual time in 10 ms steps.
        fn run(&mut self, ms: u64) {
            for _ in 0..ms / 10 {
                self.now += Duration::from_millis(10);
                while let Some((to, data)) = self.queue.pop_front() {
                    let events = self.nodes[to].receive(&data, self.now);
                    self.deliver(to, events);
                }
                for i in 0..self.nodes.len() {
                    let events = self.nodes[i].tick(self.now);
                    self.deliver(i, events);
                }
            }
        }

        fn alive(&self, i: usize) -> Vec<NodeId> {
            self.nodes[i]
                .members()
                .into_iter()
                .filter(|(_, l)| *l == Liveness::Alive)
                .map(|(p, _)| p.id)
                .collect()
        }
    }

    #[test]
    fn members_find_each_other_lose_a_partitioned_one_and_get_it_back() {
        for seed in 0..20 {
            let mut world = World::new(3, seed * 7);
            world.run(3_000);
            for i in 0..3 {
                assert_eq!(world.alive(i).len(), 2, "seed {seed}: node {i} sees all");
            }
            world.cut.insert((0, 2));
            world.cut.insert((1, 2));
            world.run(20_000);
            assert_eq!(world.alive(0), [world.ids[1].clone()], "seed {seed}");
            assert!(world.alive(2).is_empty(), "seed {seed}");
            world.cut.clear();
            world.run(20_000);
            for i in 0..3 {
                assert_eq!(
                    world.alive(i).len(),
                    2,
                    "seed {seed}: node {i} after the heal"
                );
            }
        }
    }
}
