//! TCP between nodes: wire frames over one outbound connection per peer, bounded queues.
//!
//! A node dials each peer it sends to and keeps that connection; it accepts the connections
//! its peers dial to it. A connection starts with a hello frame naming the dialer, then
//! carries wire frames one way. Sending never blocks: each peer has a bounded queue, and a
//! message that does not fit, or that finds its peer unreachable, is dropped and counted (the protocol already tolerates loss:
//! a missing acknowledgement becomes a hint, anti-entropy repairs the rest). A connection
//! that fails is dropped and re-dialled for the next message. Incoming frames go to one
//! bounded inbox, so a slow node slows its peers' readers instead of growing without bound.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use agentstore_core::NodeId;
use agentstore_wire::{Envelope, FrameDecoder, encode_frame, message_name};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
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

/// The sending side of a node's transport. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Transport {
    node: NodeId,
    peers: Arc<Mutex<BTreeMap<NodeId, SocketAddr>>>,
    queues: Arc<Mutex<BTreeMap<NodeId, mpsc::Sender<Envelope>>>>,
    dropped: Family<Dropped, Counter>,
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
        tokio::spawn(accept(listener, inbox, stopped));
        let transport = Self {
            node,
            peers: Arc::new(Mutex::new(peers)),
            queues: Arc::default(),
            dropped,
        };
        (transport, incoming)
    }

    /// Learns (or updates) where `node` listens for peers.
    pub fn add_peer(&self, node: &NodeId, addr: SocketAddr) {
        let mut peers = self.peers.lock().unwrap_or_else(|p| p.into_inner());
        if peers.insert(node.clone(), addr) != Some(addr) {
            // A new address: the next message dials it (dropping the queue ends the old dialer).
            self.queues
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .remove(node);
        }
    }

    /// Queues `envelope` for `to`; drops it (and counts it) if the peer's queue is full or the
    /// peer is unknown.
    pub fn send(&self, to: &NodeId, envelope: Envelope) {
        let addr = self
            .peers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(to)
            .copied();
        let Some(addr) = addr else {
            count_drop(&self.dropped, &envelope);
            return;
        };
        let mut queues = self.queues.lock().unwrap_or_else(|p| p.into_inner());
        let queue = queues.entry(to.clone()).or_insert_with(|| {
            let (queue, messages) = mpsc::channel(PEER_QUEUE);
            tokio::spawn(dial(
                self.node.clone(),
                addr,
                messages,
                self.dropped.clone(),
            ));
            queue
        });
        if let Err(err) = queue.try_send(envelope) {
            let (mpsc::error::TrySendError::Full(envelope)
            | mpsc::error::TrySendError::Closed(envelope)) = err;
            count_drop(&self.dropped, &envelope);
        }
    }
}

/// The label of the dropped-messages counter: which kind of message was lost.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Dropped {
    message: &'static str,
}

fn count_drop(dropped: &Family<Dropped, Counter>, envelope: &Envelope) {
    let message = message_name(&envelope.message);
    dropped.get_or_create(&Dropped { message }).inc();
}

fn hello(node: &NodeId) -> Vec<u8> {
    let id = node.as_str().as_bytes();
    let mut frame = (id.len() as u32).to_be_bytes().to_vec();
    frame.extend_from_slice(id);
    frame
}

/// Owns the connection to one peer: writes its queued messages, re-dialling after failures.
async fn dial(
    node: NodeId,
    addr: SocketAddr,
    mut messages: mpsc::Receiver<Envelope>,
    dropped: Family<Dropped, Counter>,
) {
    let mut connection: Option<TcpStream> = None;
    while let Some(envelope) = messages.recv().await {
        if connection.is_none() {
            let connected =
                tokio::time::timeout(Duration::from_secs(1), TcpStream::connect(addr)).await;
            if let Ok(Ok(mut stream)) = connected {
                let _ = stream.set_nodelay(true);
                // Data the peer has not acknowledged within this time aborts the connection
                // (the next write fails and the message is re-dialled): without it, a healed
                // partition waits for TCP's backed-off retransmission, tens of seconds.
                let _ = socket2::SockRef::from(&stream).set_tcp_user_timeout(Some(USER_TIMEOUT));
                if stream.write_all(&hello(&node)).await.is_ok() {
                    connection = Some(stream);
                }
            }
        }
        let Some(stream) = connection.as_mut() else {
            // Unreachable: this message is lost (counted); the protocol copes.
            count_drop(&dropped, &envelope);
            continue;
        };
        // A peer that stops reading (a partition: TCP retransmits in silence, with growing
        // backoff) must not hold the queue: give up on the connection and dial again.
        let written =
            tokio::time::timeout(WRITE_TIMEOUT, stream.write_all(&encode_frame(&envelope))).await;
        if !matches!(written, Ok(Ok(()))) {
            count_drop(&dropped, &envelope);
            connection = None;
        }
    }
}

async fn accept(
    listener: TcpListener,
    inbox: mpsc::Sender<Incoming>,
    mut stopped: watch::Receiver<bool>,
) {
    loop {
        tokio::select! {
            // Returning drops the listener: the port is free again.
            _ = stopped.changed() => return,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    let _ = stream.set_nodelay(true);
                    tokio::spawn(read(stream, inbox.clone(), stopped.clone()));
                }
                Err(err) => {
                    tracing::warn!(%err, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
        }
    }
}

/// Reads one peer's connection until it closes or sends something invalid.
async fn read(
    mut stream: TcpStream,
    inbox: mpsc::Sender<Incoming>,
    mut stopped: watch::Receiver<bool>,
) {
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
    let Some(from) = String::from_utf8(id)
        .ok()
        .and_then(|id| NodeId::new(id).ok())
    else {
        return;
    };
    let mut decoder = FrameDecoder::new();
    let mut buffer = vec![0u8; 64 * 1024];
    loop {
        let read = tokio::select! {
            _ = stopped.changed() => return,
            read = stream.read(&mut buffer) => read,
        };
        let n = match read {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        decoder.push(&buffer[..n]);
        loop {
            match decoder.next_envelope() {
                Ok(Some(envelope)) => {
                    if inbox
                        .send(Incoming {
                            from: from.clone(),
                            envelope,
                        })
                        .await
                        .is_err()
                    {
                        return;
                    }
                }
                Ok(None) => break,
                Err(err) => {
                    // The stream is out of sync: drop the connection, the sender re-dials.
                    tracing::warn!(%from, %err, "invalid frame; closing the connection");
                    return;
                }
            }
        }
    }
}
