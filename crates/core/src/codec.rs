//! The versioned binary encoding of records.
//!
//! Every encoded record starts with a format byte. Format 1:
//!
//! ```text
//! record    = format:u8(=1) stamp version value
//! stamp     = wall_ms:uvarint logical:uvarint node
//! version   = vector
//! vector    = count:uvarint (node counter:uvarint>0)*        nodes strictly increasing
//! value     = 0                                             LWW tombstone
//!           | 1 bytes                                       LWW value
//!           | 2 count:uvarint (dot bytes)* vector           multi-value: dots increasing
//!           | 3 gcounter                                    grow-only counter
//!           | 4 gcounter gcounter                           PN-counter: up, down
//!           | 5 count:uvarint bytes*                        G-Set: elements increasing
//!           | 6 count:uvarint (bytes count:uvarint dot*)* vector
//!                                                           OR-Set: elements, dots increasing
//!           | 7 bytes                                       signed LWW tombstone: attestation
//!           | 8 bytes bytes                                 signed LWW value, attestation
//!           | 9 bytes expires_ms:uvarint                    LWW value that expires
//!           | 10 revision:uvarint text:bytes count:uvarint textop*
//!                                                           text document, recent edits
//! textop    = count:uvarint component*                      components in normal form
//! component = 0 n:uvarint>0 | 1 text:bytes(UTF-8, non-empty) | 2 n:uvarint>0
//!                                                           retain, insert, delete
//! gcounter  = vector
//! dot       = node counter:uvarint>0
//! node      = len:uvarint(1..=64) node-id bytes
//! bytes     = len:uvarint raw bytes
//! uvarint   = unsigned LEB128, shortest form
//! ```
//!
//! The encoding is canonical: decoding accepts exactly the bytes that encoding produces, so
//! `encode(decode(b)) == b` whenever decoding succeeds. Decoding never panics and never
//! allocates more than the input could describe, whatever bytes it is given. A future format
//! gets a new format byte, and `decode` keeps reading every older one (the fixtures under
//! `tests/fixtures/` hold that promise).

use std::collections::{BTreeMap, BTreeSet};

use crate::crdt::{GCounter, GSet, MvRegister, OrSet, PnCounter};
use crate::hlc::Timestamp;
use crate::node::{MAX_NODE_ID_LEN, NodeId};
use crate::ot::{Component, Document, RECENT_EDITS, TextOp};
use crate::record::{Bytes, Record, Value};
use crate::version::{Dot, VersionVector};

/// The format this version writes.
pub const FORMAT_V1: u8 = 1;

/// Bytes that are not a record this version can read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// The input is empty.
    #[error("empty record")]
    Empty,
    /// The format byte names a format this version does not know.
    #[error("unknown record format {0}; this version reads format 1")]
    UnknownFormat(u8),
    /// The bytes break format 1 at `offset`.
    #[error("malformed record at byte {offset}: {reason}")]
    Malformed {
        /// Where decoding stopped.
        offset: usize,
        /// What was wrong there.
        reason: &'static str,
    },
}

/// Encodes a record in the current format.
pub fn encode(record: &Record) -> Vec<u8> {
    let mut out = Vec::with_capacity(64);
    out.push(FORMAT_V1);
    put_uvarint(&mut out, record.stamp.wall_ms);
    put_uvarint(&mut out, u64::from(record.stamp.logical));
    put_node(&mut out, &record.stamp.node);
    put_vector(&mut out, record.version.iter());
    debug_assert!(
        record.attestation.is_none() || matches!(record.value, Value::Register(_)),
        "only LWW registers carry an attestation"
    );
    debug_assert!(
        record.expires_at_ms.is_none()
            || (matches!(record.value, Value::Register(Some(_))) && record.attestation.is_none()),
        "only unsigned LWW values expire"
    );
    match (&record.value, &record.attestation) {
        (Value::Register(Some(bytes)), None) if record.expires_at_ms.is_some() => {
            out.push(9);
            put_bytes(&mut out, bytes);
            put_uvarint(&mut out, record.expires_at_ms.unwrap_or_default());
        }
        (Value::Register(None), None) => out.push(0),
        (Value::Register(Some(bytes)), None) => {
            out.push(1);
            put_bytes(&mut out, bytes);
        }
        (Value::Register(None), Some(attestation)) => {
            out.push(7);
            put_bytes(&mut out, attestation);
        }
        (Value::Register(Some(bytes)), Some(attestation)) => {
            out.push(8);
            put_bytes(&mut out, bytes);
            put_bytes(&mut out, attestation);
        }
        (Value::MultiValue(register), _) => {
            out.push(2);
            put_uvarint(&mut out, register.len() as u64);
            for (dot, bytes) in register.entries() {
                put_dot(&mut out, dot);
                put_bytes(&mut out, bytes);
            }
            put_vector(&mut out, register.context().iter());
        }
        (Value::GCounter(counter), _) => {
            out.push(3);
            put_vector(&mut out, counter.entries());
        }
        (Value::PnCounter(counter), _) => {
            out.push(4);
            put_vector(&mut out, counter.up.entries());
            put_vector(&mut out, counter.down.entries());
        }
        (Value::GSet(set), _) => {
            out.push(5);
            put_uvarint(&mut out, set.len() as u64);
            for element in set.iter() {
                put_bytes(&mut out, element);
            }
        }
        (Value::OrSet(set), _) => {
            out.push(6);
            put_uvarint(&mut out, set.len() as u64);
            for (element, dots) in set.entries() {
                put_bytes(&mut out, element);
                put_uvarint(&mut out, dots.len() as u64);
                for dot in dots {
                    put_dot(&mut out, dot);
                }
            }
            put_vector(&mut out, set.context().iter());
        }
        (Value::Document(document), _) => {
            out.push(10);
            put_uvarint(&mut out, document.revision);
            put_bytes(&mut out, document.text.as_bytes());
            put_uvarint(&mut out, document.recent.len() as u64);
            for op in &document.recent {
                put_text_op(&mut out, op);
            }
        }
    }
    out
}

/// Appends a text edit in the `textop` form above (also what a `Mutation::Edit` carries on
/// the wire).
pub fn put_text_op(out: &mut Vec<u8>, op: &TextOp) {
    put_uvarint(out, op.components().len() as u64);
    for component in op.components() {
        match component {
            Component::Retain(n) => {
                out.push(0);
                put_uvarint(out, *n);
            }
            Component::Insert(text) => {
                out.push(1);
                put_bytes(out, text.as_bytes());
            }
            Component::Delete(n) => {
                out.push(2);
                put_uvarint(out, *n);
            }
        }
    }
}

/// Decodes a record written in any format this version knows.
pub fn decode(bytes: &[u8]) -> Result<Record, DecodeError> {
    match bytes.first() {
        None => Err(DecodeError::Empty),
        Some(&FORMAT_V1) => {
            let mut reader = Reader { bytes, offset: 1 };
            let record = reader.record_v1()?;
            if reader.offset != bytes.len() {
                return Err(reader.malformed("trailing bytes after the record"));
            }
            Ok(record)
        }
        Some(&other) => Err(DecodeError::UnknownFormat(other)),
    }
}

/// Appends `n` as an unsigned LEB128 varint, shortest form (the encoding's integers; the wire
/// format uses it too).
pub fn put_uvarint(out: &mut Vec<u8>, mut n: u64) {
    while n >= 0x80 {
        out.push((n as u8) | 0x80);
        n >>= 7;
    }
    out.push(n as u8);
}

/// Appends a length-prefixed byte string.
pub fn put_bytes(out: &mut Vec<u8>, bytes: &[u8]) {
    put_uvarint(out, bytes.len() as u64);
    out.extend_from_slice(bytes);
}

/// Appends a version vector (`vector` in the grammar).
pub fn put_version(out: &mut Vec<u8>, version: &VersionVector) {
    put_vector(out, version.iter());
}

/// Appends a node id (`node` in the grammar).
pub fn put_node(out: &mut Vec<u8>, node: &NodeId) {
    put_bytes(out, node.as_str().as_bytes());
}

fn put_dot(out: &mut Vec<u8>, dot: &Dot) {
    put_node(out, &dot.node);
    put_uvarint(out, dot.counter);
}

fn put_vector<'a>(out: &mut Vec<u8>, entries: impl ExactSizeIterator<Item = (&'a NodeId, u64)>) {
    put_uvarint(out, entries.len() as u64);
    for (node, counter) in entries {
        put_node(out, node);
        put_uvarint(out, counter);
    }
}

/// Reads the primitives of the encoding from a byte slice, refusing anything malformed: the
/// record decoder and the wire format both read through it.
#[derive(Debug)]
pub struct Reader<'a> {
    bytes: &'a [u8],
    offset: usize,
}

impl<'a> Reader<'a> {
    /// Bytes not read yet.
    pub fn remaining(&self) -> usize {
        self.bytes.len() - self.offset
    }

    /// A reader at the start of `bytes`.
    pub fn new(bytes: &'a [u8]) -> Self {
        Self { bytes, offset: 0 }
    }

    /// How many bytes have been read.
    pub fn offset(&self) -> usize {
        self.offset
    }

    /// The error for malformed input at the current offset.
    pub fn malformed(&self, reason: &'static str) -> DecodeError {
        DecodeError::Malformed {
            offset: self.offset,
            reason,
        }
    }

    /// One byte.
    pub fn u8(&mut self) -> Result<u8, DecodeError> {
        let byte = *self
            .bytes
            .get(self.offset)
            .ok_or_else(|| self.malformed("truncated"))?;
        self.offset += 1;
        Ok(byte)
    }

    /// An unsigned LEB128 varint in shortest form.
    pub fn uvarint(&mut self) -> Result<u64, DecodeError> {
        let mut value = 0u64;
        for shift in (0..64).step_by(7) {
            let byte = self.u8()?;
            let bits = u64::from(byte & 0x7f);
            if shift == 63 && bits > 1 {
                return Err(self.malformed("varint overflows 64 bits"));
            }
            value |= bits << shift;
            if byte & 0x80 == 0 {
                if byte == 0 && shift > 0 {
                    return Err(self.malformed("varint is not in shortest form"));
                }
                return Ok(value);
            }
        }
        Err(self.malformed("varint longer than 10 bytes"))
    }

    /// A count of items that each take at least one byte: never more than the bytes left, so
    /// a corrupt count cannot make decoding allocate without bound.
    fn count(&mut self) -> Result<usize, DecodeError> {
        let n = self.uvarint()?;
        if n > self.remaining() as u64 {
            return Err(self.malformed("count exceeds the bytes left"));
        }
        Ok(n as usize)
    }

    /// A length-prefixed byte string, borrowed from the input.
    pub fn slice(&mut self) -> Result<&'a [u8], DecodeError> {
        let len = self.count()?;
        let out = &self.bytes[self.offset..self.offset + len];
        self.offset += len;
        Ok(out)
    }

    /// Reads a length-prefixed byte string.
    pub fn bytes(&mut self) -> Result<Bytes, DecodeError> {
        Ok(self.slice()?.to_vec())
    }

    /// Reads a node id (`node` in the grammar).
    pub fn node(&mut self) -> Result<NodeId, DecodeError> {
        let raw = self.bytes()?;
        if raw.is_empty() || raw.len() > MAX_NODE_ID_LEN {
            return Err(self.malformed("node id length out of range"));
        }
        let text = String::from_utf8(raw).map_err(|_| self.malformed("node id is not UTF-8"))?;
        NodeId::new(text).map_err(|_| self.malformed("invalid node id"))
    }

    fn positive(&mut self) -> Result<u64, DecodeError> {
        match self.uvarint()? {
            0 => Err(self.malformed("zero counter")),
            n => Ok(n),
        }
    }

    /// Reads a text edit (`textop`), which must be in normal form: the bytes of a canonical
    /// encoding, and nothing else, decode.
    pub fn text_op(&mut self) -> Result<TextOp, DecodeError> {
        let n = self.count()?;
        let mut components = Vec::with_capacity(n);
        for _ in 0..n {
            components.push(match self.u8()? {
                0 => Component::Retain(self.positive()?),
                1 => {
                    let text = String::from_utf8(self.bytes()?)
                        .map_err(|_| self.malformed("inserted text is not UTF-8"))?;
                    if text.is_empty() {
                        return Err(self.malformed("empty insert"));
                    }
                    Component::Insert(text)
                }
                2 => Component::Delete(self.positive()?),
                _ => return Err(self.malformed("unknown edit component")),
            });
        }
        let op = TextOp::from_components(&components);
        if op.components() != components.as_slice() {
            return Err(self.malformed("edit components are not in normal form"));
        }
        Ok(op)
    }

    fn dot(&mut self) -> Result<Dot, DecodeError> {
        Ok(Dot {
            node: self.node()?,
            counter: self.positive()?,
        })
    }

    fn vector(&mut self) -> Result<BTreeMap<NodeId, u64>, DecodeError> {
        let n = self.count()?;
        let mut entries = BTreeMap::new();
        for _ in 0..n {
            let node = self.node()?;
            if entries
                .last_key_value()
                .is_some_and(|(prev, _)| *prev >= node)
            {
                return Err(self.malformed("vector nodes are not strictly increasing"));
            }
            let counter = self.positive()?;
            entries.insert(node, counter);
        }
        Ok(entries)
    }

    /// Reads a version vector (`vector` in the grammar).
    pub fn version_vector(&mut self) -> Result<VersionVector, DecodeError> {
        Ok(VersionVector::from_entries(self.vector()?))
    }

    fn gcounter(&mut self) -> Result<GCounter, DecodeError> {
        Ok(GCounter::from_entries(self.vector()?))
    }

    fn record_v1(&mut self) -> Result<Record, DecodeError> {
        let wall_ms = self.uvarint()?;
        let logical = u32::try_from(self.uvarint()?)
            .map_err(|_| self.malformed("logical time exceeds 32 bits"))?;
        let stamp = Timestamp {
            wall_ms,
            logical,
            node: self.node()?,
        };
        let version = self.version_vector()?;
        let mut attestation = None;
        let mut expires_at_ms = None;
        let value = match self.u8()? {
            0 => Value::Register(None),
            1 => Value::Register(Some(self.bytes()?)),
            9 => {
                let value = self.bytes()?;
                expires_at_ms = Some(self.uvarint()?);
                Value::Register(Some(value))
            }
            7 => {
                attestation = Some(self.bytes()?);
                Value::Register(None)
            }
            8 => {
                let value = self.bytes()?;
                attestation = Some(self.bytes()?);
                Value::Register(Some(value))
            }
            2 => {
                let n = self.count()?;
                let mut values = BTreeMap::new();
                let mut last: Option<Dot> = None;
                for _ in 0..n {
                    let dot = self.dot()?;
                    if last.as_ref().is_some_and(|prev| *prev >= dot) {
                        return Err(self.malformed("dots are not strictly increasing"));
                    }
                    last = Some(dot.clone());
                    values.insert(dot, self.bytes()?);
                }
                let context = self.version_vector()?;
                Value::MultiValue(
                    MvRegister::from_parts(values, context).map_err(|r| self.malformed(r))?,
                )
            }
            3 => Value::GCounter(self.gcounter()?),
            4 => Value::PnCounter(PnCounter {
                up: self.gcounter()?,
                down: self.gcounter()?,
            }),
            5 => {
                let n = self.count()?;
                let mut elements = Vec::with_capacity(n);
                for _ in 0..n {
                    let element = self.bytes()?;
                    if elements.last().is_some_and(|prev| *prev >= element) {
                        return Err(self.malformed("set elements are not strictly increasing"));
                    }
                    elements.push(element);
                }
                Value::GSet(elements.into_iter().collect::<GSet<Bytes>>())
            }
            6 => {
                let n = self.count()?;
                let mut entries = BTreeMap::new();
                let mut last: Option<Bytes> = None;
                for _ in 0..n {
                    let element = self.bytes()?;
                    if last.as_ref().is_some_and(|prev| *prev >= element) {
                        return Err(self.malformed("set elements are not strictly increasing"));
                    }
                    last = Some(element.clone());
                    let ndots = self.count()?;
                    let mut dots = BTreeSet::new();
                    let mut last_dot: Option<Dot> = None;
                    for _ in 0..ndots {
                        let dot = self.dot()?;
                        if last_dot.as_ref().is_some_and(|prev| *prev >= dot) {
                            return Err(self.malformed("dots are not strictly increasing"));
                        }
                        last_dot = Some(dot.clone());
                        dots.insert(dot);
                    }
                    entries.insert(element, dots);
                }
                let context = self.version_vector()?;
                Value::OrSet(OrSet::from_parts(entries, context).map_err(|r| self.malformed(r))?)
            }
            10 => {
                let revision = self.uvarint()?;
                let text = String::from_utf8(self.bytes()?)
                    .map_err(|_| self.malformed("document text is not UTF-8"))?;
                let n = self.count()?;
                if n > RECENT_EDITS || n as u64 > revision {
                    return Err(self.malformed("more recent edits than a document keeps"));
                }
                let mut recent = Vec::with_capacity(n);
                for _ in 0..n {
                    recent.push(self.text_op()?);
                }
                Value::Document(Document {
                    revision,
                    text,
                    recent,
                })
            }
            _ => return Err(self.malformed("unknown value tag")),
        };
        Ok(Record {
            stamp,
            version,
            value,
            attestation,
            expires_at_ms,
        })
    }
}
