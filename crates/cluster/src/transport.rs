//! TCP between nodes: one connection per pair of nodes, wire frames both ways, bounded queues.
//!
//! A node that has a message for a peer it has no connection to dials it; a connection starts
//! with a hello frame naming the dialer and then carries wire frames in both directions. When
//! two nodes dial each other at once, both keep the connection dialled by the node with the
//! smaller id (each decides alone, by the same rule) and drop the other once it is drained.
//!
//! Sending never blocks: each connection has a bounded queue, and a message that does not
//! fit, or that finds its peer unreachable, is dropped and counted (the protocol tolerates
//! loss: a missing acknowledgement becomes a hint, anti-entropy repairs the rest). A
//! connection that fails is forgotten and dialled again for the next message. Incoming frames
//! go to one bounded inbox, so a slow node slows its peers' readers instead of growing
//! without bound.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use agentstore_core::NodeId;
use agentstore_core::replication::Message;
use agentstore_wire::{Envelope, FrameDecoder, encode_frame, message_name};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};

/// Messages waiting for one peer's connection.
const PEER_QUEUE: usize = 1024;
/// Messages received and not yet handled.
const INBOX: usize = 4096;
/// How long sent data may stay unacknowledged by the peer before the connection is dropped.
const USER_TIMEOUT: Duration = Duration::from_secs(3);
/// How long one frame may take to reach the peer's socket before the connection is dropped.
const WRITE_TIMEOUT: Duration = Duration::from_secs(2);
/// How long a dial may take.
const DIAL_TIMEOUT: Duration = Duration::from_secs(1);
/// The longest node id a hello may carry.
const MAX_HELLO: usize = 64;

/// A message from a peer.
#[derive(Debug)]
pub struct Incoming {
    /// Who sent it (as its hello said).
    pub from: NodeId,
    /// The message.
    pub envelope: Envelope,
}

/// The label of the dropped-messages counter: which kind of message was lost.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Dropped {
    message: &'static str,
}

/// The connection used to send to one peer.
#[derive(Debug)]
struct Link {
    /// Identifies the connection (a reader that ends forgets only its own link).
    id: u64,
    /// Who dialled it.
    dialer: NodeId,
    queue: mpsc::Sender<Envelope>,
}

#[derive(Debug)]
struct Shared {
    node: NodeId,
    peers: Mutex<BTreeMap<NodeId, SocketAddr>>,
    links: Mutex<BTreeMap<NodeId, Link>>,
    inbox: mpsc::Sender<Incoming>,
    /// Where Raft messages go, once a Raft member is attached (else to `inbox`).
    raft: Mutex<Option<mpsc::Sender<Incoming>>>,
    stopped: watch::Receiver<bool>,
    dropped: Family<Dropped, Counter>,
    next_link: AtomicU64,
}

/// The sending side of a node's transport. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Transport {
    shared: Arc<Shared>,
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|p| p.into_inner())
}

impl Shared {
    fn count_drop(&self, envelope: &Envelope) {
        let message = message_name(&envelope.message);
        self.dropped.get_or_create(&Dropped { message }).inc();
    }

    /// A new link to `peer` dialled by `dialer`: its id and the receiving end of its queue.
    fn link(&self, dialer: NodeId) -> (Link, mpsc::Receiver<Envelope>) {
        let (queue, messages) = mpsc::channel(PEER_QUEUE);
        let id = self.next_link.fetch_add(1, Ordering::Relaxed);
        (Link { id, dialer, queue }, messages)
    }

    /// Forgets the link to `peer` if it is still connection `id`.
    fn forget(&self, peer: &NodeId, id: u64) {
        let mut links = lock(&self.links);
        if links.get(peer).is_some_and(|l| l.id == id) {
            links.remove(peer);
        }
    }
}

impl Transport {
    /// Starts accepting peers on `listener`; returns the sender and the inbox.
    /// Stops accepting when `stopped` turns true; counts lost messages in `dropped`.
    pub fn start(
        node: NodeId,
        listener: TcpListener,
        peers: BTreeMap<NodeId, SocketAddr>,
        stopped: watch::Receiver<bool>,
        dropped: Family<Dropped, Counter>,
    ) -> (Self, mpsc::Receiver<Incoming>) {
        let (inbox, incoming) = mpsc::channel(INBOX);
        let shared = Arc::new(Shared {
            node,
            peers: Mutex::new(peers),
            links: Mutex::new(BTreeMap::new()),
            inbox,
            raft: Mutex::new(None),
            stopped,
            dropped,
            next_link: AtomicU64::new(1),
        });
        tokio::spawn(accept(Arc::clone(&shared), listener));
        (Self { shared }, incoming)
    }

    /// Sends Raft messages received from now on to `inbox` instead of the main inbox.
    pub fn route_raft(&self, inbox: mpsc::Sender<Incoming>) {
        *lock(&self.shared.raft) = Some(inbox);
    }

    /// Learns (or updates) where `node` listens for peers.
    pub fn add_peer(&self, node: &NodeId, addr: SocketAddr) {
        let mut peers = lock(&self.shared.peers);
        if peers.insert(node.clone(), addr) != Some(addr) {
            // A new address: the next message dials it.
            lock(&self.shared.links).remove(node);
        }
    }

    /// Queues `envelope` for `to`; drops it (and counts it) if the peer's queue is full or the
    /// peer is unknown.
    pub fn send(&self, to: &NodeId, envelope: Envelope) {
        let shared = &self.shared;
        let mut links = lock(&shared.links);
        if !links.contains_key(to) {
            let Some(addr) = lock(&shared.peers).get(to).copied() else {
                drop(links);
                shared.count_drop(&envelope);
                return;
            };
            let (link, messages) = shared.link(shared.node.clone());
            tokio::spawn(dial(
                Arc::clone(shared),
                to.clone(),
                addr,
                link.id,
                messages,
            ));
            links.insert(to.clone(), link);
        }
        let Some(link) = links.get(to) else { return };
        if let Err(err) = link.queue.try_send(envelope) {
            let closed = matches!(err, mpsc::error::TrySendError::Closed(_));
            let (mpsc::error::TrySendError::Full(envelope)
            | mpsc::error::TrySendError::Closed(envelope)) = err;
            if closed {
                links.remove(to);
            }
            drop(links);
            shared.count_drop(&envelope);
        }
    }
}

fn hello(node: &NodeId) -> Vec<u8> {
    let id = node.as_str().as_bytes();
    let mut frame = (id.len() as u32).to_be_bytes().to_vec();
    frame.extend_from_slice(id);
    frame
}

fn tune(stream: &TcpStream) {
    let _ = stream.set_nodelay(true);
    // Data the peer has not acknowledged within this time aborts the connection (the next
    // write fails and the peer is dialled again): without it, a healed partition waits for
    // TCP's backed-off retransmission, tens of seconds.
    let _ = socket2::SockRef::from(stream).set_tcp_user_timeout(Some(USER_TIMEOUT));
}

/// Dials `peer` for link `id`, then runs the connection. A failed dial drops the message that
/// asked for it (counted); the next message dials again.
async fn dial(
    shared: Arc<Shared>,
    peer: NodeId,
    addr: SocketAddr,
    id: u64,
    mut messages: mpsc::Receiver<Envelope>,
) {
    while let Some(envelope) = messages.recv().await {
        let connected = tokio::time::timeout(DIAL_TIMEOUT, TcpStream::connect(addr)).await;
        if let Ok(Ok(mut stream)) = connected {
            tune(&stream);
            if stream.write_all(&hello(&shared.node)).await.is_ok() {
                let (reader, writer) = stream.into_split();
                tokio::spawn(read(Arc::clone(&shared), peer.clone(), reader, Some(id)));
                write(shared, peer, id, writer, Some(envelope), messages).await;
                return;
            }
        }
        // Unreachable: this message is lost (counted); the protocol copes.
        shared.count_drop(&envelope);
    }
}

/// Writes a link's queued messages until the queue closes or the connection fails.
async fn write(
    shared: Arc<Shared>,
    peer: NodeId,
    id: u64,
    mut writer: OwnedWriteHalf,
    first: Option<Envelope>,
    mut messages: mpsc::Receiver<Envelope>,
) {
    let mut next = first;
    loop {
        let envelope = match next.take() {
            Some(envelope) => envelope,
            None => match messages.recv().await {
                Some(envelope) => envelope,
                None => return,
            },
        };
        // A peer that stops reading (a partition: TCP retransmits in silence) must not hold
        // the queue: give up on the connection, and the next message dials again.
        let written =
            tokio::time::timeout(WRITE_TIMEOUT, writer.write_all(&encode_frame(&envelope))).await;
        if !matches!(written, Ok(Ok(()))) {
            shared.count_drop(&envelope);
            shared.forget(&peer, id);
            return;
        }
    }
}

async fn accept(shared: Arc<Shared>, listener: TcpListener) {
    let mut stopped = shared.stopped.clone();
    loop {
        tokio::select! {
            // Returning drops the listener: the port is free again.
            _ = stopped.changed() => return,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    tune(&stream);
                    tokio::spawn(greet(Arc::clone(&shared), stream));
                }
                Err(err) => {
                    tracing::warn!(%err, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
        }
    }
}

/// Reads an accepted connection's hello, then decides whether it becomes the link to that
/// peer: yes if there is none, if the peer dialled the one we have (it is stale), or if both
/// dialled each other and the peer's id is the smaller. Either way the connection is read.
async fn greet(shared: Arc<Shared>, mut stream: TcpStream) {
    let mut len = [0u8; 4];
    if stream.read_exact(&mut len).await.is_err() {
        return;
    }
    let len = u32::from_be_bytes(len) as usize;
    if len == 0 || len > MAX_HELLO {
        return;
    }
    let mut id = vec![0u8; len];
    if stream.read_exact(&mut id).await.is_err() {
        return;
    }
    let Some(peer) = String::from_utf8(id)
        .ok()
        .and_then(|id| NodeId::new(id).ok())
    else {
        return;
    };
    let (reader, writer) = stream.into_split();
    let adopted = {
        let mut links = lock(&shared.links);
        let adopt = match links.get(&peer) {
            None => true,
            Some(link) if link.dialer == peer => true,
            Some(_) => peer < shared.node,
        };
        adopt.then(|| {
            let (link, messages) = shared.link(peer.clone());
            let id = link.id;
            links.insert(peer.clone(), link);
            (id, messages)
        })
    };
    match adopted {
        Some((id, messages)) => {
            tokio::spawn(read(Arc::clone(&shared), peer.clone(), reader, Some(id)));
            write(shared, peer, id, writer, None, messages).await;
        }
        // Read-only: the peer drains and closes it once it adopts ours.
        None => read(shared, peer, reader, None).await,
    }
}

/// Reads one connection until it closes or sends something invalid; then forgets its link.
async fn read(shared: Arc<Shared>, from: NodeId, mut reader: OwnedReadHalf, link: Option<u64>) {
    let mut stopped = shared.stopped.clone();
    let mut decoder = FrameDecoder::new();
    let mut buffer = vec![0u8; 64 * 1024];
    loop {
        let read = tokio::select! {
            _ = stopped.changed() => break,
            read = reader.read(&mut buffer) => read,
        };
        let n = match read {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        decoder.push(&buffer[..n]);
        loop {
            match decoder.next_envelope() {
                Ok(Some(envelope)) => {
                    let incoming = Incoming {
                        from: from.clone(),
                        envelope,
                    };
                    let raft = match incoming.envelope.message {
                        Message::Raft { .. } | Message::RaftReply { .. } => {
                            lock(&shared.raft).clone()
                        }
                        _ => None,
                    };
                    // Raft traffic has its own inbox so a busy replication loop never delays
                    // heartbeats into a needless election.
                    let inbox = raft.as_ref().unwrap_or(&shared.inbox);
                    if inbox.send(incoming).await.is_err() {
                        return;
                    }
                }
                Ok(None) => break,
                Err(err) => {
                    // The stream is out of sync: drop the connection; the sender dials again.
                    tracing::warn!(%from, %err, "invalid frame; closing the connection");
                    if let Some(id) = link {
                        shared.forget(&from, id);
                    }
                    return;
                }
            }
        }
    }
    if let Some(id) = link {
        shared.forget(&from, id);
    }
}
