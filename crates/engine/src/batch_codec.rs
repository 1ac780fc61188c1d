//! Batches of writes and the outcome of applying one, in agentstore's own encoding: what a
//! Raft log entry carries, what a two-phase participant stages, what a remote client sends.
//!
//! The bytes are persisted and replicated, so they are canonical and versioned by whoever
//! embeds them (a Raft command has a format byte):
//!
//! ```text
//! writes   = count:uvarint write*
//! write    = key:bytes mutation:bytes expect fence
//! expect   = 0 | 1 (absent) | 2 vector (exactly this version)
//! fence    = 0 | 1 lock:bytes token:uvarint
//! outcome  = 0 count:uvarint record:bytes*            applied, one record per write
//!          | 1 key:bytes expect 0|1 vector            a condition failed (actual version)
//!          | 2 lock:bytes token:uvarint highest:uvarint   fenced off
//!          | 3 key:bytes stored:u8 requested:u8       wrong kind
//!          | 4 detail:bytes                           the state machine could not apply it
//!          | 5 key:bytes txn:bytes                    the key is locked by a prepared transaction
//!          | 6 key:bytes 0|1|2 a:uvarint b:uvarint    a document edit refused: against a
//!                                                     revision ahead (base, revision), too old
//!                                                     (base, oldest), or not fitting (spans, has)
//! ```
//!
//! `mutation` is `agentstore_wire`'s mutation grammar, `record` and `vector` are
//! `agentstore_core::codec`'s.

use agentstore_core::Key;
use agentstore_core::codec::{self, DecodeError, Reader, put_bytes, put_uvarint, put_version};
use agentstore_core::key::KeyError;
use agentstore_core::ot::{EditRefused, Misfit};
use agentstore_core::record::{Expect, ExpectationFailed, Kind, Record, WrongKind};

use crate::{EngineError, Fence, Write};

/// Bytes that are not a batch or an outcome.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BatchCodecError {
    /// Truncated or malformed bytes.
    #[error(transparent)]
    Decode(#[from] DecodeError),
    /// A key in the bytes breaks the key rules.
    #[error(transparent)]
    Key(#[from] KeyError),
    /// A mutation in the bytes is invalid.
    #[error("invalid mutation: {0}")]
    Mutation(String),
}

/// Appends a batch of writes to `out`.
pub fn put_writes(out: &mut Vec<u8>, writes: &[Write]) {
    put_uvarint(out, writes.len() as u64);
    for write in writes {
        put_bytes(out, write.key.as_bytes());
        put_bytes(out, &agentstore_wire::encode_mutation(&write.mutation));
        put_expect(out, write.expect.as_ref());
        match &write.fence {
            None => out.push(0),
            Some(fence) => {
                out.push(1);
                put_bytes(out, fence.lock.as_bytes());
                put_uvarint(out, fence.token);
            }
        }
    }
}

/// A batch of writes on its own (what a participant stages, what a remote client sends).
pub fn encode_writes(writes: &[Write]) -> Vec<u8> {
    let mut out = Vec::new();
    put_writes(&mut out, writes);
    out
}

/// Reads a batch written by [`put_writes`].
pub fn writes(r: &mut Reader<'_>) -> Result<Vec<Write>, BatchCodecError> {
    let count = r.uvarint()?;
    // Each write takes at least four bytes: never allocate more than the input describes.
    if count > r.remaining() as u64 / 4 {
        return Err(r.malformed("more writes than bytes").into());
    }
    let mut writes = Vec::with_capacity(count as usize);
    for _ in 0..count {
        let key = Key::new(r.slice()?)?;
        let mutation = agentstore_wire::decode_mutation(r.slice()?)
            .map_err(|e| BatchCodecError::Mutation(e.to_string()))?;
        let expect = expect(r)?;
        let fence = match r.u8()? {
            0 => None,
            1 => Some(Fence {
                lock: utf8(r)?,
                token: r.uvarint()?,
            }),
            _ => return Err(r.malformed("fence tag").into()),
        };
        writes.push(Write {
            key,
            mutation,
            expect,
            fence,
        });
    }
    Ok(writes)
}

/// Decodes [`encode_writes`]'s bytes.
pub fn decode_writes(bytes: &[u8]) -> Result<Vec<Write>, BatchCodecError> {
    let mut r = Reader::new(bytes);
    let batch = writes(&mut r)?;
    if r.remaining() != 0 {
        return Err(r.malformed("trailing bytes after the writes").into());
    }
    Ok(batch)
}

/// Encodes the result of applying a command: the record of each write, or why none was
/// written.
pub fn encode_outcome(outcome: &Result<Vec<Record>, EngineError>) -> Vec<u8> {
    let mut out = Vec::new();
    match outcome {
        Ok(records) => {
            out.push(0);
            put_uvarint(&mut out, records.len() as u64);
            for record in records {
                put_bytes(&mut out, &codec::encode(record));
            }
        }
        Err(EngineError::ExpectationFailed { key, source }) => {
            out.push(1);
            put_bytes(&mut out, key.as_bytes());
            put_expect(&mut out, Some(&source.expected));
            match &source.actual {
                None => out.push(0),
                Some(version) => {
                    out.push(1);
                    put_version(&mut out, version);
                }
            }
        }
        Err(EngineError::Fenced {
            lock,
            token,
            highest,
        }) => {
            out.push(2);
            put_bytes(&mut out, lock.as_bytes());
            put_uvarint(&mut out, *token);
            put_uvarint(&mut out, *highest);
        }
        Err(EngineError::WrongKind { key, source }) => {
            out.push(3);
            put_bytes(&mut out, key.as_bytes());
            out.push(source.stored.code());
            out.push(source.requested.code());
        }
        Err(EngineError::InTransaction { key, txn }) => {
            out.push(5);
            put_bytes(&mut out, key.as_bytes());
            put_bytes(&mut out, txn.as_bytes());
        }
        Err(EngineError::EditRefused { key, source }) => {
            out.push(6);
            put_bytes(&mut out, key.as_bytes());
            let (reason, a, b) = match source {
                EditRefused::Ahead { base, revision } => (0, base, revision),
                EditRefused::TooOld { base, oldest } => (1, base, oldest),
                EditRefused::Misfit(Misfit { spans, has }) => (2, spans, has),
            };
            out.push(reason);
            put_uvarint(&mut out, *a);
            put_uvarint(&mut out, *b);
        }
        Err(other) => {
            out.push(4);
            put_bytes(&mut out, other.to_string().as_bytes());
        }
    }
    out
}

/// Decodes [`encode_outcome`]'s bytes back into the result the state machine computed.
pub fn decode_outcome(bytes: &[u8]) -> Result<Result<Vec<Record>, EngineError>, BatchCodecError> {
    let mut r = Reader::new(bytes);
    let outcome = match r.u8()? {
        0 => {
            let count = r.uvarint()?;
            if count > r.remaining() as u64 {
                return Err(r.malformed("more records than bytes").into());
            }
            let mut records = Vec::with_capacity(count as usize);
            for _ in 0..count {
                records.push(codec::decode(r.slice()?)?);
            }
            Ok(records)
        }
        1 => {
            let key = Key::new(r.slice()?)?;
            let expected = expect(&mut r)?.ok_or_else(|| r.malformed("no expectation"))?;
            let actual = match r.u8()? {
                0 => None,
                1 => Some(r.version_vector()?),
                _ => return Err(r.malformed("version tag").into()),
            };
            Err(EngineError::ExpectationFailed {
                key,
                source: ExpectationFailed { expected, actual },
            })
        }
        2 => Err(EngineError::Fenced {
            lock: utf8(&mut r)?,
            token: r.uvarint()?,
            highest: r.uvarint()?,
        }),
        3 => {
            let key = Key::new(r.slice()?)?;
            let stored = Kind::from_code(r.u8()?).ok_or_else(|| r.malformed("kind"))?;
            let requested = Kind::from_code(r.u8()?).ok_or_else(|| r.malformed("kind"))?;
            Err(EngineError::WrongKind {
                key,
                source: WrongKind { stored, requested },
            })
        }
        4 => Err(EngineError::Storage {
            detail: utf8(&mut r)?,
        }),
        5 => Err(EngineError::InTransaction {
            key: Key::new(r.slice()?)?,
            txn: utf8(&mut r)?,
        }),
        6 => {
            let key = Key::new(r.slice()?)?;
            let reason = r.u8()?;
            let (a, b) = (r.uvarint()?, r.uvarint()?);
            let source = match reason {
                0 => EditRefused::Ahead {
                    base: a,
                    revision: b,
                },
                1 => EditRefused::TooOld { base: a, oldest: b },
                2 => EditRefused::Misfit(Misfit { spans: a, has: b }),
                _ => return Err(r.malformed("edit refusal").into()),
            };
            Err(EngineError::EditRefused { key, source })
        }
        _ => return Err(r.malformed("outcome tag").into()),
    };
    if r.remaining() != 0 {
        return Err(r.malformed("trailing bytes after the outcome").into());
    }
    Ok(outcome)
}

fn put_expect(out: &mut Vec<u8>, expect: Option<&Expect>) {
    match expect {
        None => out.push(0),
        Some(Expect::Absent) => out.push(1),
        Some(Expect::Version(version)) => {
            out.push(2);
            put_version(out, version);
        }
    }
}

fn expect(r: &mut Reader<'_>) -> Result<Option<Expect>, BatchCodecError> {
    Ok(match r.u8()? {
        0 => None,
        1 => Some(Expect::Absent),
        2 => Some(Expect::Version(r.version_vector()?)),
        _ => return Err(r.malformed("expectation tag").into()),
    })
}

fn utf8(r: &mut Reader<'_>) -> Result<String, BatchCodecError> {
    let bytes = r.slice()?;
    String::from_utf8(bytes.to_vec()).map_err(|_| r.malformed("text is not UTF-8").into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_refused_edit_keeps_its_reason_across_the_encoding() {
        let key = Key::new(b"docs:a".to_vec()).unwrap();
        for source in [
            EditRefused::Ahead {
                base: 9,
                revision: 3,
            },
            EditRefused::TooOld { base: 1, oldest: 7 },
            EditRefused::Misfit(Misfit { spans: 4, has: 2 }),
        ] {
            let refused = Err(EngineError::EditRefused {
                key: key.clone(),
                source: source.clone(),
            });
            match decode_outcome(&encode_outcome(&refused)).unwrap() {
                Err(EngineError::EditRefused { key: k, source: s }) => {
                    assert_eq!((k, s), (key.clone(), source));
                }
                other => panic!("{other:?}"),
            }
        }
    }
}
