//! What crosses the network between nodes, and nothing else.
//!
//! A connection carries **frames**: a 4-byte big-endian length, then that many bytes, at most
//! [`MAX_FRAME`]. A frame holds one **envelope**:
//!
//! ```text
//! envelope = version:u8(=1) request:uvarint deadline_ms:uvarint body
//! body     = 1 key record                 Replicate
//!          | 2                            Replicated
//!          | 3 key                        Read
//!          | 4 0                          ReadReply, no record
//!          | 4 1 record                   ReadReply
//!          | 5 depth:u8 count:uvarint leaf:u64le*     TreeLeaves (count = 2^depth)
//!          | 6 depth:u8 count:uvarint bucket:uvarint* Buckets (each < 2^depth)
//!          | 7 key mutation               Forward (see [`forward`](crate::forward) for the
//!          | 8 outcome                    Forwarded  mutation and outcome grammar)
//!          | 9 len:uvarint bytes          Gossip (a SWIM packet, opaque here)
//!          | 10                           Leaving
//!          | 11 prefix:bytes 0|1 key limit:uvarint   Scan (1: resume after the key)
//!          | 12 entries                   Scanned
//!          | 13 len:uvarint bytes         Raft (opaque here)
//!          | 14 len:uvarint bytes         RaftReply (opaque here)
//!          | 15 count:uvarint write*      CausalWrites (`agentstore_core::causal::CausalWrite`)
//!          | 16 vector                    CausalHave
//!          | 17 id:uvarint index:uvarint total:uvarint vector entries   CausalSnapshot
//!          | 18 count:uvarint node*       Departed
//!          | 19 depth:u8 coarse:u8 count:uvarint (bucket:uvarint leaf:u64le*)*   SubLeaves
//!                                         (2^(depth-coarse) leaves per bucket < 2^coarse)
//! entries  = count:uvarint (key record)*  (keys strictly increasing)
//! key      = len:uvarint bytes            (a valid agentstore key)
//! record   = len:uvarint bytes            (agentstore_core::codec, format byte first)
//! node     = len:uvarint bytes            (a valid node id)
//! ```
//!
//! The request id and deadline travel in the envelope, so a receiver can drop work whose
//! caller has given up. Decoding is canonical and total: any bytes give a message or a typed
//! error, never a panic, and never an allocation larger than the input.
//!
//! Architecture invariant: this crate depends on `agentstore-core` only, and does no I/O:
//! [`FrameDecoder`] splits bytes that the transport hands it.

mod forward;

use agentstore_core::causal::CausalWrite;
use agentstore_core::codec::{self, DecodeError, Reader, put_bytes, put_uvarint};
use agentstore_core::key::{Key, KeyError};
use agentstore_core::replication::{Message, RequestId};

/// The envelope version this build speaks.
pub const VERSION: u8 = 1;
/// The largest frame accepted (16 MiB): a record of the largest value plus metadata fits.
pub const MAX_FRAME: usize = 16 << 20;

/// One message with its request id and deadline.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Envelope {
    /// The request the message belongs to (0 for messages nobody answers).
    pub request: RequestId,
    /// When the sender stops waiting, in milliseconds since the Unix epoch (0: no deadline).
    pub deadline_ms: u64,
    /// The message.
    pub message: Message,
}

impl Envelope {
    /// An envelope for `message`, carrying its request id and no deadline.
    pub fn new(message: Message) -> Self {
        Self {
            request: message.request(),
            deadline_ms: 0,
            message,
        }
    }
}

/// Bytes that are not a valid envelope or frame.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    /// A frame announces more bytes than [`MAX_FRAME`].
    #[error("frame of {len} bytes exceeds the limit of {MAX_FRAME}")]
    FrameTooLarge {
        /// The announced length.
        len: usize,
    },
    /// The envelope version is not one this build speaks.
    #[error("unsupported envelope version {0} (this node speaks {VERSION})")]
    Version(u8),
    /// The envelope is malformed.
    #[error("malformed envelope at byte {offset}: {reason}")]
    Malformed {
        /// Where.
        offset: usize,
        /// What.
        reason: &'static str,
    },
    /// A key in the envelope is invalid.
    #[error("invalid key in envelope: {0}")]
    Key(#[from] KeyError),
    /// A record in the envelope does not decode.
    #[error("invalid record in envelope: {0}")]
    Record(#[from] DecodeError),
}

/// A short name of the message's type, for metrics and logs.
pub fn message_name(message: &Message) -> &'static str {
    match message {
        Message::Replicate { .. } => "replicate",
        Message::Replicated { .. } => "replicated",
        Message::Read { .. } => "read",
        Message::ReadReply { .. } => "read_reply",
        Message::TreeLeaves { .. } => "tree_leaves",
        Message::SubLeaves { .. } => "sub_leaves",
        Message::Buckets { .. } => "buckets",
        Message::Forward { .. } => "forward",
        Message::Forwarded { .. } => "forwarded",
        Message::Gossip { .. } => "gossip",
        Message::Leaving => "leaving",
        Message::Departed { .. } => "departed",
        Message::Scan { .. } => "scan",
        Message::Scanned { .. } => "scanned",
        Message::Raft { .. } => "raft",
        Message::RaftReply { .. } => "raft_reply",
        Message::CausalWrites { .. } => "causal_writes",
        Message::CausalHave { .. } => "causal_have",
        Message::CausalSnapshot { .. } => "causal_snapshot",
    }
}

/// Encodes an envelope (without the frame length).
pub fn encode(envelope: &Envelope) -> Vec<u8> {
    let mut out = vec![VERSION];
    put_uvarint(&mut out, envelope.request);
    put_uvarint(&mut out, envelope.deadline_ms);
    match &envelope.message {
        Message::Replicate { key, record, .. } => {
            out.push(1);
            put_bytes(&mut out, key.as_bytes());
            put_bytes(&mut out, &codec::encode(record));
        }
        Message::Replicated { .. } => out.push(2),
        Message::Read { key, .. } => {
            out.push(3);
            put_bytes(&mut out, key.as_bytes());
        }
        Message::ReadReply { record: None, .. } => out.extend_from_slice(&[4, 0]),
        Message::ReadReply {
            record: Some(record),
            ..
        } => {
            out.extend_from_slice(&[4, 1]);
            put_bytes(&mut out, &codec::encode(record));
        }
        Message::TreeLeaves { depth, leaves } => {
            out.extend_from_slice(&[5, *depth]);
            put_uvarint(&mut out, leaves.len() as u64);
            for leaf in leaves {
                out.extend_from_slice(&leaf.to_le_bytes());
            }
        }
        Message::SubLeaves {
            depth,
            coarse,
            buckets,
        } => {
            out.extend_from_slice(&[19, *depth, *coarse]);
            put_uvarint(&mut out, buckets.len() as u64);
            for (bucket, leaves) in buckets {
                put_uvarint(&mut out, u64::from(*bucket));
                for leaf in leaves {
                    out.extend_from_slice(&leaf.to_le_bytes());
                }
            }
        }
        Message::Buckets { depth, buckets } => {
            out.extend_from_slice(&[6, *depth]);
            put_uvarint(&mut out, buckets.len() as u64);
            for bucket in buckets {
                put_uvarint(&mut out, u64::from(*bucket));
            }
        }
        Message::Forward { key, mutation, .. } => {
            out.push(7);
            put_bytes(&mut out, key.as_bytes());
            forward::put_mutation(&mut out, mutation);
        }
        Message::Forwarded { outcome, .. } => {
            out.push(8);
            forward::put_outcome(&mut out, outcome);
        }
        Message::Gossip { data } => {
            out.push(9);
            put_bytes(&mut out, data);
        }
        Message::Leaving => out.push(10),
        Message::Departed { nodes } => {
            out.push(18);
            put_uvarint(&mut out, nodes.len() as u64);
            for node in nodes {
                codec::put_node(&mut out, node);
            }
        }
        Message::Scan {
            prefix,
            after,
            limit,
            ..
        } => {
            out.push(11);
            put_bytes(&mut out, prefix);
            match after {
                None => out.push(0),
                Some(key) => {
                    out.push(1);
                    put_bytes(&mut out, key.as_bytes());
                }
            }
            put_uvarint(&mut out, u64::from(*limit));
        }
        Message::Scanned { entries, .. } => {
            out.push(12);
            put_entries(&mut out, entries);
        }
        Message::Raft { data, .. } => {
            out.push(13);
            put_bytes(&mut out, data);
        }
        Message::RaftReply { data, .. } => {
            out.push(14);
            put_bytes(&mut out, data);
        }
        Message::CausalWrites { writes } => {
            out.push(15);
            put_uvarint(&mut out, writes.len() as u64);
            for write in writes {
                write.encode(&mut out);
            }
        }
        Message::CausalHave { applied } => {
            out.push(16);
            codec::put_version(&mut out, applied);
        }
        Message::CausalSnapshot {
            id,
            index,
            total,
            applied,
            entries,
        } => {
            out.push(17);
            put_uvarint(&mut out, *id);
            put_uvarint(&mut out, u64::from(*index));
            put_uvarint(&mut out, u64::from(*total));
            codec::put_version(&mut out, applied);
            put_entries(&mut out, entries);
        }
    }
    out
}

/// Encodes an envelope as a whole frame (length prefix included).
pub fn encode_frame(envelope: &Envelope) -> Vec<u8> {
    let body = encode(envelope);
    let mut frame = Vec::with_capacity(4 + body.len());
    frame.extend_from_slice(&(body.len() as u32).to_be_bytes());
    frame.extend_from_slice(&body);
    frame
}

/// The envelope's structure errors keep their offset; a bad record stays a record error.
fn malformed(err: DecodeError) -> WireError {
    match err {
        DecodeError::Malformed { offset, reason } => WireError::Malformed { offset, reason },
        other => WireError::Record(other),
    }
}

/// `count` tree leaves, each a little-endian u64.
fn leaves(r: &mut Reader<'_>, count: usize) -> Result<Vec<u64>, WireError> {
    let mut leaves = Vec::with_capacity(count.min(r.remaining() / 8));
    for _ in 0..count {
        let mut word = [0u8; 8];
        for byte in &mut word {
            *byte = r.u8().map_err(malformed)?;
        }
        leaves.push(u64::from_le_bytes(word));
    }
    Ok(leaves)
}

fn key(r: &mut Reader<'_>) -> Result<Key, WireError> {
    Ok(Key::new(r.slice().map_err(malformed)?)?)
}

fn record(r: &mut Reader<'_>) -> Result<agentstore_core::Record, WireError> {
    Ok(codec::decode(r.slice().map_err(malformed)?)?)
}

fn put_entries(out: &mut Vec<u8>, entries: &[(Key, agentstore_core::Record)]) {
    put_uvarint(out, entries.len() as u64);
    for (key, record) in entries {
        put_bytes(out, key.as_bytes());
        put_bytes(out, &codec::encode(record));
    }
}

fn entries(r: &mut Reader<'_>) -> Result<Vec<(Key, agentstore_core::Record)>, WireError> {
    let count = r.uvarint().map_err(malformed)?;
    // Each entry takes at least two bytes: never allocate more than the input could hold.
    let mut out: Vec<(Key, agentstore_core::Record)> =
        Vec::with_capacity(usize::try_from(count).unwrap_or(0).min(r.remaining() / 2));
    for _ in 0..count {
        let key = key(r)?;
        if out.last().is_some_and(|(last, _)| *last >= key) {
            return Err(malformed(
                r.malformed("scan keys are not strictly increasing"),
            ));
        }
        out.push((key, record(r)?));
    }
    Ok(out)
}

/// Encodes a client's mutation (the node API's record endpoint carries it).
pub fn encode_mutation(mutation: &agentstore_core::record::Mutation) -> Vec<u8> {
    let mut out = Vec::new();
    forward::put_mutation(&mut out, mutation);
    out
}

/// Decodes what [`encode_mutation`] wrote.
pub fn decode_mutation(bytes: &[u8]) -> Result<agentstore_core::record::Mutation, WireError> {
    let mut r = Reader::new(bytes);
    let mutation = forward::mutation(&mut r)?;
    if r.offset() != bytes.len() {
        return Err(malformed(r.malformed("trailing bytes after the mutation")));
    }
    Ok(mutation)
}

/// Encodes scan entries (keys strictly increasing), as the node API's scan endpoint sends them.
pub fn encode_entries(entries: &[(Key, agentstore_core::Record)]) -> Vec<u8> {
    let mut out = Vec::new();
    put_entries(&mut out, entries);
    out
}

/// Decodes what [`encode_entries`] wrote.
pub fn decode_entries(bytes: &[u8]) -> Result<Vec<(Key, agentstore_core::Record)>, WireError> {
    let mut r = Reader::new(bytes);
    let entries = entries(&mut r)?;
    if r.offset() != bytes.len() {
        return Err(malformed(r.malformed("trailing bytes after the entries")));
    }
    Ok(entries)
}

/// Decodes an envelope (without the frame length).
pub fn decode(bytes: &[u8]) -> Result<Envelope, WireError> {
    let mut r = Reader::new(bytes);
    let version = r.u8().map_err(malformed)?;
    if version != VERSION {
        return Err(WireError::Version(version));
    }
    let request = r.uvarint().map_err(malformed)?;
    let deadline_ms = r.uvarint().map_err(malformed)?;
    let message = match r.u8().map_err(malformed)? {
        1 => Message::Replicate {
            request,
            key: key(&mut r)?,
            record: record(&mut r)?,
        },
        2 => Message::Replicated { request },
        3 => Message::Read {
            request,
            key: key(&mut r)?,
        },
        4 => match r.u8().map_err(malformed)? {
            0 => Message::ReadReply {
                request,
                record: None,
            },
            1 => Message::ReadReply {
                request,
                record: Some(record(&mut r)?),
            },
            _ => return Err(malformed(r.malformed("unknown read reply form"))),
        },
        5 => {
            let depth = r.u8().map_err(malformed)?;
            let count = r.uvarint().map_err(malformed)?;
            if depth > agentstore_core::merkle::MAX_DEPTH || count != 1 << depth {
                return Err(malformed(
                    r.malformed("leaf count does not match the depth"),
                ));
            }
            let leaves = leaves(&mut r, count as usize)?;
            Message::TreeLeaves { depth, leaves }
        }
        6 => {
            let depth = r.u8().map_err(malformed)?;
            let count = r.uvarint().map_err(malformed)?;
            if depth > agentstore_core::merkle::MAX_DEPTH || count > 1 << depth {
                return Err(malformed(r.malformed("more buckets than the tree has")));
            }
            let mut buckets = Vec::with_capacity(count as usize);
            for _ in 0..count {
                let bucket = r.uvarint().map_err(malformed)?;
                if bucket >= 1 << depth {
                    return Err(malformed(r.malformed("bucket outside the tree")));
                }
                buckets.push(bucket as u32);
            }
            Message::Buckets { depth, buckets }
        }
        7 => Message::Forward {
            request,
            key: key(&mut r)?,
            mutation: forward::mutation(&mut r)?,
        },
        8 => Message::Forwarded {
            request,
            outcome: forward::outcome(&mut r)?,
        },
        9 => Message::Gossip {
            data: r.bytes().map_err(malformed)?,
        },
        10 => Message::Leaving,
        11 => Message::Scan {
            request,
            prefix: r.bytes().map_err(malformed)?,
            after: match r.u8().map_err(malformed)? {
                0 => None,
                1 => Some(key(&mut r)?),
                _ => return Err(malformed(r.malformed("unknown scan form"))),
            },
            limit: u32::try_from(r.uvarint().map_err(malformed)?)
                .map_err(|_| malformed(r.malformed("scan limit exceeds 32 bits")))?,
        },
        12 => Message::Scanned {
            request,
            entries: entries(&mut r)?,
        },
        13 => Message::Raft {
            request,
            data: r.bytes().map_err(malformed)?,
        },
        14 => Message::RaftReply {
            request,
            data: r.bytes().map_err(malformed)?,
        },
        15 => {
            let count = r.uvarint().map_err(malformed)?;
            // A write takes at least eight bytes: never allocate more than the input holds.
            let mut writes =
                Vec::with_capacity(usize::try_from(count).unwrap_or(0).min(r.remaining() / 8));
            for _ in 0..count {
                writes.push(CausalWrite::decode(&mut r).map_err(malformed)?);
            }
            Message::CausalWrites { writes }
        }
        16 => Message::CausalHave {
            applied: r.version_vector().map_err(malformed)?,
        },
        17 => {
            let id = r.uvarint().map_err(malformed)?;
            let mut small = || {
                u32::try_from(r.uvarint().map_err(malformed)?).map_err(|_| WireError::Malformed {
                    offset: 0,
                    reason: "snapshot chunk number exceeds 32 bits",
                })
            };
            let (index, total) = (small()?, small()?);
            if index >= total {
                return Err(malformed(r.malformed("snapshot chunk beyond its total")));
            }
            Message::CausalSnapshot {
                id,
                index,
                total,
                applied: r.version_vector().map_err(malformed)?,
                entries: entries(&mut r)?,
            }
        }
        19 => {
            let (depth, coarse) = (r.u8().map_err(malformed)?, r.u8().map_err(malformed)?);
            if depth > agentstore_core::merkle::MAX_DEPTH || coarse > depth {
                return Err(malformed(r.malformed("sub-leaves of an impossible tree")));
            }
            let width = 1usize << (depth - coarse);
            let count = r.uvarint().map_err(malformed)?;
            if count > 1 << coarse || count as usize > r.remaining() / (8 * width + 1) {
                return Err(malformed(r.malformed("more sub-leaf buckets than sent")));
            }
            let mut buckets = Vec::with_capacity(count as usize);
            for _ in 0..count {
                let bucket = r.uvarint().map_err(malformed)?;
                if bucket >= 1 << coarse {
                    return Err(malformed(r.malformed("bucket outside the tree")));
                }
                buckets.push((bucket as u32, leaves(&mut r, width)?));
            }
            Message::SubLeaves {
                depth,
                coarse,
                buckets,
            }
        }
        18 => {
            let count = r.uvarint().map_err(malformed)?;
            // A node id takes at least two bytes: never allocate more than the input holds.
            let mut nodes =
                Vec::with_capacity(usize::try_from(count).unwrap_or(0).min(r.remaining() / 2));
            for _ in 0..count {
                nodes.push(r.node().map_err(malformed)?);
            }
            Message::Departed { nodes }
        }
        _ => return Err(malformed(r.malformed("unknown message type"))),
    };
    if r.offset() != bytes.len() {
        return Err(malformed(r.malformed("trailing bytes after the message")));
    }
    Ok(Envelope {
        request,
        deadline_ms,
        message,
    })
}

/// Splits a byte stream into frames, sans-io: the transport pushes what it reads, and takes
/// out whole envelopes. It holds at most one frame's bytes (bounded by [`MAX_FRAME`]).
#[derive(Debug, Default)]
pub struct FrameDecoder {
    buffer: Vec<u8>,
}

impl FrameDecoder {
    /// A decoder with nothing buffered.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds bytes read from the connection.
    pub fn push(&mut self, bytes: &[u8]) {
        self.buffer.extend_from_slice(bytes);
    }

    /// The next whole envelope, `Ok(None)` if more bytes are needed. After an error the
    /// connection must be closed: the stream is no longer in sync.
    pub fn next_envelope(&mut self) -> Result<Option<Envelope>, WireError> {
        if self.buffer.len() < 4 {
            return Ok(None);
        }
        let len = u32::from_be_bytes([
            self.buffer[0],
            self.buffer[1],
            self.buffer[2],
            self.buffer[3],
        ]) as usize;
        if len > MAX_FRAME {
            return Err(WireError::FrameTooLarge { len });
        }
        if self.buffer.len() < 4 + len {
            return Ok(None);
        }
        let envelope = decode(&self.buffer[4..4 + len]);
        self.buffer.drain(..4 + len);
        envelope.map(Some)
    }

    /// Bytes buffered but not yet a whole frame.
    pub fn buffered(&self) -> usize {
        self.buffer.len()
    }
}
