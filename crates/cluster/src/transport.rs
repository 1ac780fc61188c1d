//! TCP between nodes: one connection per pair of nodes, wire frames both ways, bounded queues.
//!
//! A node that has a message for a peer it has no connection to dials it. By default
//! ([`PeerSecurity::Tls`]) a connection is mutual TLS 1.3 in which each side proves it holds
//! its node key, and each side's first message over it is its admission, signed by the
//! cluster's authority for that key (`agentstore_trust`): a process the authority never
//! admitted, or one naming another node without that node's key, is refused before it can
//! send or receive anything, and the dialler also refuses a node at the address that is not
//! the one it dialled. Every message between nodes (gossip, forwards, scans, hints, Raft,
//! causal replication) rides these links, so the sender a message is attributed to is
//! authenticated. [`PeerSecurity::Plaintext`] keeps the old unauthenticated hello that just
//! names the dialler (closed networks and benchmarks only). Handshake and hello must finish
//! within a deadline, and only a bounded number of connections may be in that phase at once.
//! When
//! two nodes dial each other at once, both keep the connection dialled by the node with the
//! smaller id (each decides alone, by the same rule) and drop the other once it is drained.
//!
//! Sending never blocks. A frame for a connection with nothing queued is written to the socket
//! at once by the sender, when the socket takes it whole (the common case on an idle link: no
//! task is woken on the way, which on a strong write's path is most of what a message costs).
//! Otherwise it waits in the connection's bounded queue for the connection's writer task, in
//! order. A message that does not fit, or that finds its peer unreachable, is dropped and
//! counted (the protocol tolerates loss: a missing acknowledgement becomes a hint,
//! anti-entropy repairs the rest). A connection that fails is forgotten and dialled again for
//! the next message. Incoming frames go to one bounded inbox, so a slow node slows its peers'
//! readers instead of growing without bound.

use std::collections::{BTreeMap, VecDeque};
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use agentstore_core::NodeId;
use agentstore_core::replication::Message;
use agentstore_engine::lock;
use agentstore_trust::{PeerTls, PeerTrust, peer_key};
use agentstore_wire::{Envelope, FrameDecoder, encode_frame, message_name};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Notify, Semaphore, mpsc, watch};

/// Frames waiting for one peer's connection.
const PEER_QUEUE: usize = 1024;
/// Bytes of frames waiting for one peer's connection (a frame larger than this still goes
/// alone): a slow or stuck peer holds at most this much of the node's memory.
const PEER_BYTES: usize = 64 << 20;
/// Messages received and not yet handled.
const INBOX: usize = 4096;
/// How long sent data may stay unacknowledged by the peer before the connection is dropped.
const USER_TIMEOUT: Duration = Duration::from_secs(3);
/// How long one frame may take to reach the peer's socket before the connection is dropped.
const WRITE_TIMEOUT: Duration = Duration::from_secs(2);
/// How long a dial may take.
const DIAL_TIMEOUT: Duration = Duration::from_secs(1);
/// The longest hello accepted (an admission is at most 162 bytes).
const MAX_HELLO: usize = 256;
/// How long a new connection may take to finish its TLS handshake and hellos.
const HELLO_DEADLINE: Duration = Duration::from_secs(5);
/// Accepted connections that may be in their handshake at once; more are closed at once, so
/// strangers opening connections cannot exhaust the node.
const MAX_GREETING: usize = 64;

/// How a node's peer links are secured.
#[derive(Debug, Clone)]
pub enum PeerSecurity {
    /// Mutual TLS with node keys, and admissions checked both ways (the default).
    Tls(Arc<PeerTrust>),
    /// No encryption and no authentication: the hello names the dialler and is believed.
    /// Only for a closed network or a benchmark (`storage.cluster.insecure: true`).
    Plaintext,
}

/// The TLS session of one connection, shared by its reader (which decrypts) and its writer
/// (which encrypts); `None` on a plaintext link.
type Session = Option<Arc<Mutex<rustls::Connection>>>;

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

/// What [`RaftRoute::requests`] returns.
pub(crate) type ServeFuture = std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>;

/// Where a Raft member takes its traffic.
#[derive(Clone)]
pub(crate) struct RaftRoute {
    /// Takes a request from another member; the connection's reader awaits the future
    /// (which waits for a free serving slot, then starts serving) before reading on, so a
    /// member with every slot busy slows its peers down rather than queueing without bound.
    pub(crate) requests: Arc<dyn Fn(Incoming) -> ServeFuture + Send + Sync>,
    /// Answers to this member's requests, by request id: handed to the waiting caller from
    /// the connection's reader, with no task in between on a strong write's path.
    pub(crate) replies: Arc<dyn Fn(u64, Vec<u8>) + Send + Sync>,
}

impl std::fmt::Debug for RaftRoute {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RaftRoute").finish_non_exhaustive()
    }
}

/// The connection used to send to one peer.
#[derive(Debug)]
struct Link {
    /// Identifies the connection (a reader that ends forgets only its own link).
    id: u64,
    /// Who dialled it.
    dialer: NodeId,
    outbox: Arc<Outbox>,
}

impl Drop for Link {
    /// A link that is replaced or forgotten lets its writer drain what is queued, then stop.
    fn drop(&mut self) {
        self.outbox.close();
    }
}

/// One encoded frame, and what it carries (to count it if it is dropped).
#[derive(Debug)]
struct Frame {
    /// One or more encoded frames, back to back (each carries its length).
    bytes: Vec<u8>,
    /// The message of each, for the count of dropped messages.
    messages: Vec<&'static str>,
}

/// Frames on their way to one peer, shared by the senders and the connection's writer task.
/// Every write to the socket happens under `pending`'s lock, so frames go out whole and in
/// order whoever writes them; only the wait for the socket to drain happens outside it.
#[derive(Debug)]
struct Outbox {
    pending: Mutex<Pending>,
    /// The connection, once it is up (a dialled link has none while it dials).
    stream: OnceLock<Wire>,
    /// Wakes the writer task when frames wait or the link closes.
    wake: Notify,
}

/// The sending half of a connection: the socket, and the TLS session that seals each frame.
#[derive(Debug)]
struct Wire {
    stream: OwnedWriteHalf,
    tls: Session,
}

/// How much of a frame [`Wire::send`] took.
#[derive(Debug, Clone, Copy)]
struct Sent {
    /// Bytes taken: written to the socket (plaintext), or sealed into the session (TLS, all
    /// or nothing).
    taken: usize,
    /// Whether everything taken reached the socket (a TLS session may hold some back).
    flushed: bool,
}

impl Wire {
    /// Writes what a TLS session still holds of frames sealed earlier, under its lock;
    /// `Ok(false)` while the socket takes no more.
    fn drain_session(tls: &mut rustls::Connection, stream: &OwnedWriteHalf) -> io::Result<bool> {
        while tls.wants_write() {
            match tls.write_tls(&mut SocketWriter(stream)) {
                Ok(_) => {}
                Err(err) if err.kind() == io::ErrorKind::WouldBlock => return Ok(false),
                Err(err) => return Err(err),
            }
        }
        Ok(true)
    }

    /// Writes what the TLS session still holds; `Ok(false)` while the socket takes no more.
    /// A plaintext link holds nothing.
    fn drain(&self) -> io::Result<bool> {
        match &self.tls {
            None => Ok(true),
            Some(tls) => Self::drain_session(&mut lock(tls), &self.stream),
        }
    }

    /// Sends (the rest of) a frame after whatever the session still holds, without waiting:
    /// a plaintext link writes what the socket takes; a TLS link seals the whole frame (once
    /// the session holds nothing back) and writes what the socket takes of it, keeping the
    /// rest for the next [`Wire::drain`]. One lock of the session either way.
    fn send(&self, bytes: &[u8]) -> io::Result<Sent> {
        let Some(tls) = &self.tls else {
            let taken = match self.stream.try_write(bytes) {
                Err(err) if err.kind() == io::ErrorKind::WouldBlock => 0,
                written => written?,
            };
            return Ok(Sent {
                taken,
                flushed: true,
            });
        };
        let mut tls = lock(tls);
        if !Self::drain_session(&mut tls, &self.stream)? {
            return Ok(Sent {
                taken: 0,
                flushed: false,
            });
        }
        io::Write::write_all(&mut tls.writer(), bytes)?;
        let flushed = Self::drain_session(&mut tls, &self.stream)?;
        Ok(Sent {
            taken: bytes.len(),
            flushed,
        })
    }
}

/// `io::Write` over a socket that never waits: a full socket answers `WouldBlock`.
struct SocketWriter<'a>(&'a OwnedWriteHalf);

impl io::Write for SocketWriter<'_> {
    fn write(&mut self, bytes: &[u8]) -> io::Result<usize> {
        self.0.try_write(bytes)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

#[derive(Debug, Default)]
struct Pending {
    /// Frames not yet written, oldest first; the first one may be partly written.
    frames: VecDeque<Frame>,
    /// Their total size.
    bytes: usize,
    /// Bytes of the first frame already written.
    written: usize,
    /// No new frames: the link was replaced or forgotten (the writer drains what is queued).
    closed: bool,
    /// The connection failed or never came up: nothing more is written.
    failed: bool,
}

/// Why a frame was not taken.
enum Refused {
    /// The queue is full.
    Full(Frame),
    /// The link was replaced or forgotten a moment ago (its writer drains what it holds).
    Closed(Frame),
    /// The connection failed: the sender gives up on the link.
    Failed(Frame),
}

/// What a writer's pass over the queue ended with.
enum Flushed {
    /// Everything is written.
    Empty,
    /// The socket takes no more for now.
    Blocked,
    /// The connection failed.
    Failed,
}

impl Outbox {
    fn new() -> Self {
        Self {
            pending: Mutex::new(Pending::default()),
            stream: OnceLock::new(),
            wake: Notify::new(),
        }
    }

    /// Takes `frame` for the peer: written at once if nothing is queued and the socket takes
    /// it whole, else queued for the writer task.
    fn push(&self, frame: Frame) -> Result<(), Refused> {
        let mut pending = lock(&self.pending);
        if pending.failed {
            return Err(Refused::Failed(frame));
        }
        if pending.closed {
            return Err(Refused::Closed(frame));
        }
        if pending.frames.len() >= PEER_QUEUE
            || (!pending.frames.is_empty() && pending.bytes + frame.bytes.len() > PEER_BYTES)
        {
            return Err(Refused::Full(frame));
        }
        if pending.frames.is_empty()
            && let Some(wire) = self.stream.get()
        {
            match wire.send(&frame.bytes) {
                Ok(sent) if sent.taken == frame.bytes.len() => {
                    if !sent.flushed {
                        // The session holds the rest back: the writer finishes it.
                        drop(pending);
                        self.wake.notify_one();
                    }
                    return Ok(());
                }
                Ok(sent) => pending.written = sent.taken,
                Err(_) => {
                    pending.failed = true;
                    drop(pending);
                    self.wake.notify_one();
                    return Err(Refused::Failed(frame));
                }
            }
        }
        pending.bytes += frame.bytes.len();
        pending.frames.push_back(frame);
        drop(pending);
        self.wake.notify_one();
        Ok(())
    }

    /// Writes queued frames until the queue is empty or the socket is full.
    fn flush(&self, wire: &Wire) -> Flushed {
        let mut pending = lock(&self.pending);
        if pending.failed {
            return Flushed::Failed;
        }
        loop {
            let written = pending.written;
            let Some(frame) = pending.frames.front() else {
                return match wire.drain() {
                    Ok(true) => Flushed::Empty,
                    Ok(false) => Flushed::Blocked,
                    Err(_) => Flushed::Failed,
                };
            };
            let len = frame.bytes.len();
            match wire.send(&frame.bytes[written..]) {
                Ok(Sent { taken: 0, .. }) => return Flushed::Blocked,
                Ok(sent) if written + sent.taken == len => {
                    pending.bytes -= len;
                    pending.frames.pop_front();
                    pending.written = 0;
                }
                Ok(sent) => pending.written += sent.taken,
                Err(_) => return Flushed::Failed,
            }
        }
    }

    /// Takes no new frames; the writer stops once it has written the queued ones.
    fn close(&self) {
        lock(&self.pending).closed = true;
        self.wake.notify_one();
    }

    /// Gives up on the link: returns what was still queued (lost).
    fn fail(&self) -> Vec<Frame> {
        let mut pending = lock(&self.pending);
        pending.failed = true;
        pending.written = 0;
        pending.bytes = 0;
        pending.frames.drain(..).collect()
    }

    fn is_closed(&self) -> bool {
        lock(&self.pending).closed
    }
}

#[derive(Debug)]
struct Shared {
    node: NodeId,
    security: PeerSecurity,
    /// Accepted connections still in their handshake.
    greeting: Arc<Semaphore>,
    peers: Mutex<BTreeMap<NodeId, SocketAddr>>,
    links: Mutex<BTreeMap<NodeId, Link>>,
    inbox: mpsc::Sender<Incoming>,
    /// Where Raft messages go, once a Raft member is attached (else to `inbox`).
    raft: Mutex<Option<RaftRoute>>,
    /// Where causal replication messages go, once causal replication is attached.
    causal: Mutex<Option<mpsc::Sender<Incoming>>>,
    stopped: watch::Receiver<bool>,
    dropped: Family<Dropped, Counter>,
    next_link: AtomicU64,
}

/// The sending side of a node's transport. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Transport {
    shared: Arc<Shared>,
}

impl Shared {
    fn count_drops(&self, frame: &Frame) {
        for message in &frame.messages {
            self.dropped.get_or_create(&Dropped { message }).inc();
        }
    }

    /// A new link dialled by `dialer`, and its outbox (for its writer).
    fn link(&self, dialer: NodeId) -> (Link, Arc<Outbox>) {
        let outbox = Arc::new(Outbox::new());
        let id = self.next_link.fetch_add(1, Ordering::Relaxed);
        let link = Link {
            id,
            dialer,
            outbox: Arc::clone(&outbox),
        };
        (link, outbox)
    }

    /// Gives up on link `id` to `peer`: forgets it and counts what it still held as lost.
    fn fail(&self, peer: &NodeId, id: u64, outbox: &Outbox) {
        for frame in outbox.fail() {
            self.count_drops(&frame);
        }
        self.forget(peer, id);
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
        security: PeerSecurity,
        listener: TcpListener,
        peers: BTreeMap<NodeId, SocketAddr>,
        stopped: watch::Receiver<bool>,
        dropped: Family<Dropped, Counter>,
    ) -> (Self, mpsc::Receiver<Incoming>) {
        let (inbox, incoming) = mpsc::channel(INBOX);
        let shared = Arc::new(Shared {
            node,
            security,
            greeting: Arc::new(Semaphore::new(MAX_GREETING)),
            peers: Mutex::new(peers),
            links: Mutex::new(BTreeMap::new()),
            inbox,
            raft: Mutex::new(None),
            causal: Mutex::new(None),
            stopped,
            dropped,
            next_link: AtomicU64::new(1),
        });
        tokio::spawn(accept(Arc::clone(&shared), listener));
        (Self { shared }, incoming)
    }

    /// Hands Raft messages received from now on to `route` instead of the main inbox.
    pub(crate) fn route_raft(&self, route: RaftRoute) {
        *lock(&self.shared.raft) = Some(route);
    }

    /// Sends causal replication messages received from now on to `inbox` instead of the main
    /// inbox.
    pub fn route_causal(&self, inbox: mpsc::Sender<Incoming>) {
        *lock(&self.shared.causal) = Some(inbox);
    }

    /// Learns (or updates) where `node` listens for peers.
    pub fn add_peer(&self, node: &NodeId, addr: SocketAddr) {
        let mut peers = lock(&self.shared.peers);
        if peers.insert(node.clone(), addr) != Some(addr) {
            // A new address: the next message dials it.
            lock(&self.shared.links).remove(node);
        }
    }

    /// Sends `envelope` to `to` (see the module's doc); drops it (and counts it) if the peer's
    /// queue is full or the peer is unknown or unreachable.
    pub fn send(&self, to: &NodeId, envelope: Envelope) {
        self.send_all(to, std::iter::once(envelope));
    }

    /// Sends `envelopes` to `to` in order, as one write when the socket takes them: a batch
    /// costs the sender one system call and the receiver one wake-up.
    pub fn send_all(&self, to: &NodeId, envelopes: impl IntoIterator<Item = Envelope>) {
        let shared = &self.shared;
        let mut frame = Frame {
            bytes: Vec::new(),
            messages: Vec::new(),
        };
        for envelope in envelopes {
            frame.bytes.extend_from_slice(&encode_frame(&envelope));
            frame.messages.push(message_name(&envelope.message));
        }
        if frame.messages.is_empty() {
            return;
        }
        let (id, outbox) = {
            let mut links = lock(&shared.links);
            if !links.contains_key(to) {
                let Some(addr) = lock(&shared.peers).get(to).copied() else {
                    drop(links);
                    shared.count_drops(&frame);
                    return;
                };
                let (link, outbox) = shared.link(shared.node.clone());
                tokio::spawn(dial(Arc::clone(shared), to.clone(), addr, link.id, outbox));
                links.insert(to.clone(), link);
            }
            let Some(link) = links.get(to) else { return };
            (link.id, Arc::clone(&link.outbox))
        };
        match outbox.push(frame) {
            Ok(()) => {}
            Err(Refused::Full(frame) | Refused::Closed(frame)) => shared.count_drops(&frame),
            Err(Refused::Failed(frame)) => {
                shared.count_drops(&frame);
                shared.fail(to, id, &outbox);
            }
        }
    }
}

/// A hello frame: its length, then its bytes.
fn hello_frame(hello: &[u8]) -> Vec<u8> {
    let mut frame = (hello.len() as u32).to_be_bytes().to_vec();
    frame.extend_from_slice(hello);
    frame
}

async fn read_hello(stream: &mut (impl AsyncReadExt + Unpin)) -> io::Result<Vec<u8>> {
    let mut len = [0u8; 4];
    stream.read_exact(&mut len).await?;
    let len = u32::from_be_bytes(len) as usize;
    if len == 0 || len > MAX_HELLO {
        return Err(io::Error::new(io::ErrorKind::InvalidData, "hello too long"));
    }
    let mut hello = vec![0u8; len];
    stream.read_exact(&mut hello).await?;
    Ok(hello)
}

fn refused(reason: impl std::fmt::Display) -> io::Error {
    io::Error::new(io::ErrorKind::PermissionDenied, reason.to_string())
}

/// A connection whose peer is known: its halves and its TLS session.
struct Opened {
    peer: NodeId,
    reader: OwnedReadHalf,
    writer: OwnedWriteHalf,
    tls: Session,
}

impl Opened {
    fn new(peer: NodeId, stream: TcpStream, tls: Option<rustls::Connection>) -> Self {
        let (reader, writer) = stream.into_split();
        let tls = tls.map(|mut tls| {
            // The writer bounds what is queued (whole frames, per peer); the session holds at
            // most what the socket did not take of one frame.
            tls.set_buffer_limit(None);
            Arc::new(Mutex::new(tls))
        });
        Self {
            peer,
            reader,
            writer,
            tls,
        }
    }
}

/// Opens a dialled connection to `peer`: the TLS handshake and the admissions both ways (the
/// peer must be the node dialled), or the plaintext hello.
async fn open_dialled(shared: &Shared, peer: &NodeId, stream: TcpStream) -> io::Result<Opened> {
    let PeerSecurity::Tls(trust) = &shared.security else {
        let mut stream = stream;
        stream
            .write_all(&hello_frame(shared.node.as_str().as_bytes()))
            .await?;
        return Ok(Opened::new(peer.clone(), stream, None));
    };
    let connector = tokio_rustls::TlsConnector::from(Arc::clone(&trust.tls().client));
    let mut tls = connector.connect(PeerTls::server_name(), stream).await?;
    tls.write_all(&hello_frame(&trust.hello())).await?;
    let hello = read_hello(&mut tls).await?;
    let key = peer_key(tls.get_ref().1).ok_or_else(|| refused("no peer key"))?;
    let name = trust.check_hello(&hello, &key).map_err(refused)?;
    if name != peer.as_str() {
        return Err(refused(format!("{peer}'s address is served by {name}")));
    }
    let (stream, tls) = tls.into_inner();
    Ok(Opened::new(peer.clone(), stream, Some(tls.into())))
}

/// Opens an accepted connection: the TLS handshake and the admissions both ways, or the
/// plaintext hello. Returns the peer the connection is from.
async fn open_accepted(shared: &Shared, stream: TcpStream) -> io::Result<Opened> {
    let peer_id = |name: Vec<u8>| {
        String::from_utf8(name)
            .ok()
            .and_then(|name| NodeId::new(name).ok())
            .ok_or_else(|| refused("not a node id"))
    };
    let PeerSecurity::Tls(trust) = &shared.security else {
        let mut stream = stream;
        let peer = peer_id(read_hello(&mut stream).await?)?;
        return Ok(Opened::new(peer, stream, None));
    };
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::clone(&trust.tls().server));
    let mut tls = acceptor.accept(stream).await?;
    let hello = read_hello(&mut tls).await?;
    let key = peer_key(tls.get_ref().1).ok_or_else(|| refused("no peer key"))?;
    let peer = peer_id(
        trust
            .check_hello(&hello, &key)
            .map_err(refused)?
            .into_bytes(),
    )?;
    tls.write_all(&hello_frame(&trust.hello())).await?;
    let (stream, tls) = tls.into_inner();
    Ok(Opened::new(peer, stream, Some(tls.into())))
}

fn tune(stream: &TcpStream) {
    let _ = stream.set_nodelay(true);
    // Data the peer has not acknowledged within this time aborts the connection (the next
    // write fails and the peer is dialled again): without it, a healed partition waits for
    // TCP's backed-off retransmission, tens of seconds.
    let _ = socket2::SockRef::from(stream).set_tcp_user_timeout(Some(USER_TIMEOUT));
}

/// Dials `peer` for link `id`, then runs the connection. A failed dial (or handshake) loses
/// what was queued for it (counted) and forgets the link; the next message dials again.
async fn dial(shared: Arc<Shared>, peer: NodeId, addr: SocketAddr, id: u64, outbox: Arc<Outbox>) {
    let opened = tokio::time::timeout(HELLO_DEADLINE, async {
        let stream = tokio::time::timeout(DIAL_TIMEOUT, TcpStream::connect(addr))
            .await
            .map_err(|_| io::Error::from(io::ErrorKind::TimedOut))??;
        tune(&stream);
        open_dialled(&shared, &peer, stream).await
    })
    .await;
    match opened {
        Ok(Ok(opened)) => run_link(shared, id, opened, outbox).await,
        Ok(Err(err)) if err.kind() == io::ErrorKind::PermissionDenied => {
            tracing::warn!(%peer, %addr, %err, "peer refused");
            shared.fail(&peer, id, &outbox);
        }
        _ => shared.fail(&peer, id, &outbox),
    }
}

/// Runs link `id` over an opened connection: a reader task, and the writer on this one.
async fn run_link(shared: Arc<Shared>, id: u64, opened: Opened, outbox: Arc<Outbox>) {
    tokio::spawn(read(
        Arc::clone(&shared),
        opened.peer.clone(),
        opened.reader,
        opened.tls.clone(),
        Some((id, Arc::downgrade(&outbox))),
    ));
    let wire = Wire {
        stream: opened.writer,
        tls: opened.tls,
    };
    write(shared, opened.peer, id, wire, outbox).await;
}

/// Writes what the senders could not write themselves (a queue behind a slow socket), until
/// the link closes and is drained, or the connection fails.
async fn write(shared: Arc<Shared>, peer: NodeId, id: u64, wire: Wire, outbox: Arc<Outbox>) {
    let _ = outbox.stream.set(wire);
    let Some(wire) = outbox.stream.get() else {
        return;
    };
    let mut stopped = shared.stopped.clone();
    loop {
        if *stopped.borrow_and_update() {
            // A stopped node closes its connections: a peer must not keep writing into one
            // nobody reads (it would keep it as its link to a restarted node on that address).
            shared.fail(&peer, id, &outbox);
            return;
        }
        match outbox.flush(wire) {
            Flushed::Empty if outbox.is_closed() => return,
            Flushed::Empty => {
                tokio::select! {
                    () = outbox.wake.notified() => {}
                    // A dropped stop signal disables this branch (no busy loop).
                    Ok(()) = stopped.changed() => {}
                }
            }
            // A peer that stops reading (a partition: TCP retransmits in silence) must not
            // hold the queue: give up on the connection, and the next message dials again.
            Flushed::Blocked => {
                let drained = tokio::time::timeout(WRITE_TIMEOUT, wire.stream.writable()).await;
                if !matches!(drained, Ok(Ok(()))) {
                    shared.fail(&peer, id, &outbox);
                    return;
                }
            }
            Flushed::Failed => {
                shared.fail(&peer, id, &outbox);
                return;
            }
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
                Ok((stream, from)) => {
                    let Ok(permit) = Arc::clone(&shared.greeting).try_acquire_owned() else {
                        tracing::warn!(%from, "too many connections in their handshake; closed");
                        continue;
                    };
                    tune(&stream);
                    tokio::spawn(greet(Arc::clone(&shared), stream, permit));
                }
                Err(err) => {
                    tracing::warn!(%err, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
        }
    }
}

/// Opens an accepted connection (within the hello deadline), then decides whether it becomes
/// the link to that peer: yes if there is none, if the peer dialled the one we have (it is
/// stale), or if both dialled each other and the peer's id is the smaller. Either way the
/// connection is read.
async fn greet(shared: Arc<Shared>, stream: TcpStream, permit: tokio::sync::OwnedSemaphorePermit) {
    let from = stream.peer_addr().ok();
    let opened = tokio::time::timeout(HELLO_DEADLINE, open_accepted(&shared, stream)).await;
    drop(permit);
    let opened = match opened {
        Ok(Ok(opened)) => opened,
        Ok(Err(err)) => {
            tracing::warn!(?from, %err, "peer connection refused");
            return;
        }
        Err(_) => {
            tracing::warn!(?from, "peer connection refused: no hello in time");
            return;
        }
    };
    let peer = opened.peer.clone();
    let adopted = {
        let mut links = lock(&shared.links);
        let adopt = match links.get(&peer) {
            None => true,
            Some(link) if link.dialer == peer => true,
            Some(_) => peer < shared.node,
        };
        adopt.then(|| {
            let (link, outbox) = shared.link(peer.clone());
            let id = link.id;
            links.insert(peer.clone(), link);
            (id, outbox)
        })
    };
    match adopted {
        Some((id, outbox)) => run_link(shared, id, opened, outbox).await,
        // Read-only: the peer drains and closes it once it adopts ours. The write half stays
        // open until then (closing it would end the TLS session's sending side).
        None => {
            let _writer = opened.writer;
            read(shared, peer, opened.reader, opened.tls, None).await;
        }
    }
}

/// Reads one connection until it closes or sends something invalid (on a TLS link, a record
/// that fails to decrypt); then forgets its link (`link`: its id and outbox, `None` for a
/// connection only read). The outbox is held weakly: a link that is replaced must drop its
/// write half (closing the connection) without waiting for this reader.
async fn read(
    shared: Arc<Shared>,
    from: NodeId,
    mut reader: OwnedReadHalf,
    tls: Session,
    link: Option<(u64, std::sync::Weak<Outbox>)>,
) {
    let mut stopped = shared.stopped.clone();
    let mut decoder = FrameDecoder::new();
    let mut buffer = vec![0u8; 64 * 1024];
    let mut plain = Vec::new();
    // A TLS session may already hold frames the peer sent right behind its hello.
    let mut received = 0;
    loop {
        let opened = match &tls {
            None => {
                decoder.push(&buffer[..received]);
                Ok(())
            }
            Some(session) => {
                unseal(session, &buffer[..received], &mut decoder, &mut plain).map(|wants_write| {
                    // The session has something to send (a key update's answer): wake the
                    // writer.
                    if wants_write
                        && let Some(outbox) = link.as_ref().and_then(|(_, o)| o.upgrade())
                    {
                        outbox.wake.notify_one();
                    }
                })
            }
        };
        if let Err(err) = opened {
            tracing::warn!(%from, %err, "undecryptable data; closing the connection");
            break;
        }
        loop {
            match decoder.next_envelope() {
                Ok(Some(envelope)) => {
                    if !deliver(&shared, &from, envelope).await {
                        return;
                    }
                }
                Ok(None) => break,
                Err(err) => {
                    // The stream is out of sync: drop the connection; the sender dials again.
                    tracing::warn!(%from, %err, "invalid frame; closing the connection");
                    if let Some((id, _)) = link {
                        shared.forget(&from, id);
                    }
                    return;
                }
            }
        }
        let read = tokio::select! {
            _ = stopped.changed() => break,
            read = reader.read(&mut buffer) => read,
        };
        received = match read {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
    }
    if let Some((id, _)) = link {
        shared.forget(&from, id);
    }
}

/// Decrypts `bytes` read from a TLS link (and whatever the session already held) into
/// `decoder`; says whether the session now has something to send. The session is locked one
/// TLS read (at most 4 KiB) at a time, so senders sealing frames on the same connection wait
/// for one record's worth of work, not for a whole socket read's.
fn unseal(
    session: &Mutex<rustls::Connection>,
    mut bytes: &[u8],
    decoder: &mut FrameDecoder,
    plain: &mut Vec<u8>,
) -> io::Result<bool> {
    loop {
        let wants_write = {
            let mut tls = lock(session);
            if !bytes.is_empty() {
                tls.read_tls(&mut bytes)?;
            }
            let state = tls.process_new_packets().map_err(io::Error::other)?;
            plain.resize(state.plaintext_bytes_to_read(), 0);
            io::Read::read_exact(&mut tls.reader(), plain)?;
            tls.wants_write()
        };
        decoder.push(plain);
        if bytes.is_empty() {
            return Ok(wants_write);
        }
    }
}

/// Hands one message to whoever takes it; `false` once the node is gone.
async fn deliver(shared: &Shared, from: &NodeId, envelope: agentstore_wire::Envelope) -> bool {
    let incoming = Incoming {
        from: from.clone(),
        envelope,
    };
    let raft = match incoming.envelope.message {
        Message::Raft { .. } | Message::RaftReply { .. } => lock(&shared.raft).clone(),
        _ => None,
    };
    if let Some(route) = raft {
        match incoming.envelope.message {
            Message::RaftReply { request, data } => (route.replies)(request, data),
            _ => (route.requests)(incoming).await,
        }
        return true;
    }
    let routed = match incoming.envelope.message {
        Message::CausalWrites { .. }
        | Message::CausalHave { .. }
        | Message::CausalSnapshot { .. } => lock(&shared.causal).clone(),
        _ => None,
    };
    // Raft traffic has its own inbox so a busy replication loop never delays heartbeats into
    // a needless election; causal replication has its own because the replication loop has
    // no use for it.
    let inbox = routed.as_ref().unwrap_or(&shared.inbox);
    inbox.send(incoming).await.is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use agentstore_trust::SecretKey;

    async fn transport(
        name: &str,
        security: PeerSecurity,
        peers: BTreeMap<NodeId, SocketAddr>,
    ) -> (
        Transport,
        mpsc::Receiver<Incoming>,
        SocketAddr,
        Family<Dropped, Counter>,
    ) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let dropped = Family::<Dropped, Counter>::default();
        // The sender of `stopped` is leaked on purpose: the transports live as long as the test.
        let (stop, stopped) = watch::channel(false);
        std::mem::forget(stop);
        let node = NodeId::new(name).unwrap();
        let (transport, inbox) =
            Transport::start(node, security, listener, peers, stopped, dropped.clone());
        (transport, inbox, addr, dropped)
    }

    /// A node admitted as `name` by `authority`.
    fn admitted(authority: &SecretKey, name: &str) -> PeerSecurity {
        PeerSecurity::Tls(Arc::new(PeerTrust::generate(authority, name).unwrap()))
    }

    fn raft(request: u64, size: usize) -> Envelope {
        let data = (0..size).map(|i| (i as u64 ^ request) as u8).collect();
        Envelope::new(Message::Raft { request, data })
    }

    fn lost(dropped: &Family<Dropped, Counter>, message: &'static str) -> u64 {
        dropped.get_or_create(&Dropped { message }).get()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn frames_arrive_whole_in_order_and_none_is_lost_unaccounted_over_tls() {
        let authority = SecretKey::generate();
        frames_arrive_whole_in_order(admitted(&authority, "a"), admitted(&authority, "b")).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn frames_arrive_whole_in_order_and_none_is_lost_unaccounted_in_plaintext() {
        frames_arrive_whole_in_order(PeerSecurity::Plaintext, PeerSecurity::Plaintext).await;
    }

    async fn frames_arrive_whole_in_order(a_security: PeerSecurity, b_security: PeerSecurity) {
        let (_b, mut inbox, b_addr, _) = transport("b", b_security, BTreeMap::new()).await;
        let b = NodeId::new("b").unwrap();
        let (a, _a_inbox, _, dropped) =
            transport("a", a_security, BTreeMap::from([(b.clone(), b_addr)])).await;
        // Small frames that the socket takes whole, and large ones it takes in pieces, so
        // both the senders' own writes and the writer task's are exercised.
        let sizes = |i: u64| {
            if i.is_multiple_of(50) {
                300_000
            } else {
                100 + (i % 7) as usize * 40
            }
        };
        let sent = 2_000u64;
        for i in 0..sent {
            a.send(&b, raft(i, sizes(i)));
            if i.is_multiple_of(100) {
                tokio::task::yield_now().await;
            }
        }
        let mut received = Vec::new();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        while (received.len() as u64) + lost(&dropped, "raft") < sent {
            let next = tokio::time::timeout_at(deadline, inbox.recv()).await;
            let Ok(Some(incoming)) = next else {
                panic!(
                    "{} of {sent} frames arrived and {} were counted lost",
                    received.len(),
                    lost(&dropped, "raft")
                );
            };
            let Message::Raft { request, data } = incoming.envelope.message else {
                panic!("another message arrived");
            };
            assert_eq!(incoming.from.as_str(), "a");
            assert_eq!(
                data,
                (0..sizes(request))
                    .map(|i| (i as u64 ^ request) as u8)
                    .collect::<Vec<_>>(),
                "frame {request} arrived damaged"
            );
            received.push(request);
        }
        assert!(
            received.windows(2).all(|w| w[0] < w[1]),
            "frames overtook each other"
        );
        assert!(
            received.len() as u64 > sent / 2,
            "most frames arrive on an idle loopback link ({} did)",
            received.len()
        );
    }

    #[tokio::test]
    async fn a_message_to_an_unreachable_peer_is_dropped_and_counted() {
        // A port nobody listens on: bind one, then close it.
        let closed = TcpListener::bind("127.0.0.1:0")
            .await
            .unwrap()
            .local_addr()
            .unwrap();
        let nobody = NodeId::new("nobody").unwrap();
        let (a, _inbox, _, dropped) = transport(
            "a",
            PeerSecurity::Plaintext,
            BTreeMap::from([(nobody.clone(), closed)]),
        )
        .await;
        a.send(&nobody, raft(1, 10));
        a.send(&nobody, raft(2, 10));
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while lost(&dropped, "raft") < 2 {
            assert!(
                tokio::time::Instant::now() < deadline,
                "the lost messages were not counted"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        // An unknown peer: dropped at once.
        a.send(&NodeId::new("stranger").unwrap(), raft(3, 10));
        assert_eq!(lost(&dropped, "raft"), 3);
    }

    /// Sends one message from `a` to `b`; returns what `b` received within a second, and
    /// whether `a` counted the message lost.
    async fn one_message(
        a_name: &str,
        a_security: PeerSecurity,
        b_security: PeerSecurity,
    ) -> (Option<Incoming>, bool) {
        let (_b, mut inbox, b_addr, _) = transport("b", b_security, BTreeMap::new()).await;
        let b = NodeId::new("b").unwrap();
        let (a, _a_inbox, _, dropped) =
            transport(a_name, a_security, BTreeMap::from([(b.clone(), b_addr)])).await;
        a.send(&b, raft(7, 10));
        let received = tokio::time::timeout(Duration::from_secs(1), inbox.recv())
            .await
            .ok()
            .flatten();
        (received, lost(&dropped, "raft") == 1)
    }

    #[tokio::test]
    async fn an_admitted_peer_is_heard_under_its_admitted_name() {
        let authority = SecretKey::generate();
        let (received, lost) =
            one_message("a", admitted(&authority, "a"), admitted(&authority, "b")).await;
        assert_eq!(received.expect("delivered").from.as_str(), "a");
        assert!(!lost);
    }

    #[tokio::test]
    async fn a_peer_admitted_by_another_authority_is_refused_both_ways() {
        let authority = SecretKey::generate();
        let stranger = SecretKey::generate();
        let (received, lost) =
            one_message("a", admitted(&stranger, "a"), admitted(&authority, "b")).await;
        assert!(received.is_none(), "a stranger's message was delivered");
        assert!(lost, "the refused link's message is counted lost");
    }

    #[tokio::test]
    async fn a_hello_naming_another_node_is_heard_under_the_name_its_key_was_admitted_as() {
        // `mallory` is admitted, but calls itself `a` in its transport: its hello carries its
        // own admission, so `b` hears it as `mallory`, never as `a`.
        let authority = SecretKey::generate();
        let (received, _) = one_message(
            "a",
            admitted(&authority, "mallory"),
            admitted(&authority, "b"),
        )
        .await;
        assert_eq!(received.expect("delivered").from.as_str(), "mallory");
    }

    #[tokio::test]
    async fn a_plaintext_hello_reaches_nothing_on_a_tls_node() {
        let authority = SecretKey::generate();
        let (received, _) =
            one_message("a", PeerSecurity::Plaintext, admitted(&authority, "b")).await;
        assert!(received.is_none(), "a plaintext message was delivered");
    }

    #[tokio::test]
    async fn a_dialled_address_answered_by_another_node_gets_nothing() {
        // `c` (admitted) listens where `a` believes `b` is: `a` must not send it `b`'s traffic.
        let authority = SecretKey::generate();
        let (_c, mut inbox, c_addr, _) =
            transport("c", admitted(&authority, "c"), BTreeMap::new()).await;
        let b = NodeId::new("b").unwrap();
        let (a, _a_inbox, _, dropped) = transport(
            "a",
            admitted(&authority, "a"),
            BTreeMap::from([(b.clone(), c_addr)]),
        )
        .await;
        a.send(&b, raft(7, 10));
        let received = tokio::time::timeout(Duration::from_secs(1), inbox.recv()).await;
        assert!(!matches!(received, Ok(Some(_))), "c received b's message");
        assert_eq!(lost(&dropped, "raft"), 1);
    }

    #[tokio::test]
    async fn a_peer_holds_at_most_its_share_of_queued_bytes() {
        // A peer that is being dialled takes nothing yet: every frame queues, and the queue
        // stops at PEER_BYTES (counting the rest as dropped at once), not at PEER_QUEUE frames.
        let (_b, _inbox, b_addr, _) =
            transport("b", PeerSecurity::Plaintext, BTreeMap::new()).await;
        let b = NodeId::new("b").unwrap();
        let (a, _a_inbox, _, dropped) = transport(
            "a",
            PeerSecurity::Plaintext,
            BTreeMap::from([(b.clone(), b_addr)]),
        )
        .await;
        let frame = 1 << 20;
        for i in 0..100 {
            a.send(&b, raft(i, frame));
        }
        let queued = 100 - lost(&dropped, "raft") as usize;
        assert!(
            queued <= PEER_BYTES / frame && queued >= PEER_BYTES / frame - 2,
            "{queued} frames of 1 MiB queued"
        );
    }

    /// Whatever bytes a stranger sends in place of a handshake (random, or a valid plaintext
    /// hello followed by random frames), nothing reaches the node, and an admitted peer is
    /// still heard after them.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn random_bytes_on_the_peer_port_deliver_nothing() {
        use proptest::strategy::{Strategy, ValueTree};
        use proptest::test_runner::{Config, TestRunner};
        use tokio::io::AsyncWriteExt;
        let authority = SecretKey::generate();
        let (_b, mut inbox, b_addr, _) =
            transport("b", admitted(&authority, "b"), BTreeMap::new()).await;
        let mut runner = TestRunner::new(Config::with_cases(64));
        let junk = proptest::collection::vec(proptest::arbitrary::any::<u8>(), 0..2048);
        for case in 0..64 {
            let mut bytes = junk.new_tree(&mut runner).unwrap().current();
            if case % 2 == 0 {
                // A well-formed plaintext hello first, as an old node or a forger would send.
                let mut hello = hello_frame(b"a");
                hello.append(&mut bytes);
                bytes = hello;
            }
            let mut stream = TcpStream::connect(b_addr).await.unwrap();
            let _ = stream.write_all(&bytes).await;
            drop(stream);
        }
        let (a, _a_inbox, _, _) = transport(
            "a",
            admitted(&authority, "a"),
            BTreeMap::from([(NodeId::new("b").unwrap(), b_addr)]),
        )
        .await;
        a.send(&NodeId::new("b").unwrap(), raft(9, 10));
        let first = tokio::time::timeout(Duration::from_secs(5), inbox.recv())
            .await
            .expect("the admitted peer is heard")
            .unwrap();
        assert_eq!(
            first.from.as_str(),
            "a",
            "only the admitted peer got through"
        );
        let Message::Raft { request, .. } = first.envelope.message else {
            panic!("another message arrived");
        };
        assert_eq!(request, 9);
        let more = tokio::time::timeout(Duration::from_millis(500), inbox.recv()).await;
        assert!(more.is_err(), "something else was delivered: {more:?}");
    }
}
