//! The bodies of forwarded writes: a client's mutation, and the coordinator's outcome.
//!
//! ```text
//! mutation = 1 bytes                       Put
//!          | 2                             Delete
//!          | 3 0 vector | 3 1 bytes vector PutSibling: delete / value, then the context
//!          | 4 n:uvarint                   GCounterAdd
//!          | 5 zigzag:uvarint              PnCounterAdd
//!          | 6 bytes | 7 bytes | 8 bytes   GSetAdd, OrSetAdd, OrSetRemove
//!          | 9 record                      Merge
//!          | 10 0 bytes | 10 1 bytes bytes Signed: delete / value, then the attestation
//!          | 11 bytes expires_ms:uvarint   PutExpiring
//!          | 12 base:uvarint textop        Edit (`textop` as in `agentstore_core::codec`)
//! outcome  = 1 record                      Written
//!          | 2 0 | 2 1 record              Read: nothing / a record
//!          | 3 answered:uvarint needed:uvarint   QuorumFailed
//!          | 4 count:uvarint node*         NotAReplica
//!          | 5 bytes                       LocalFailure: storage (UTF-8)
//!          | 6 bytes                       LocalFailure: disk full (UTF-8)
//!          | 7 refusal                     LocalFailure: a signature refused
//!          | 8 stored:u8 requested:u8      LocalFailure: a value of another kind (`Kind::code`)
//! refusal  = 0                             Unsigned
//!          | 1 bytes                       Invalid (UTF-8)
//!          | 2 signed:uvarint stamped:uvarint   OutsideWindow (ms)
//! ```

use agentstore_core::codec::{self, Reader, put_bytes, put_node, put_uvarint, put_version};
use agentstore_core::record::{Kind, Mutation, WrongKind};
use agentstore_core::replication::{LocalFailure, Outcome};
use agentstore_core::signing::SignatureRefused;

use crate::{WireError, malformed, record};

/// At most this many replicas in a `NotAReplica` outcome (placement never asks for more).
const MAX_REPLICAS: u64 = 64;

pub(crate) fn put_mutation(out: &mut Vec<u8>, mutation: &Mutation) {
    match mutation {
        Mutation::Put(bytes) => {
            out.push(1);
            put_bytes(out, bytes);
        }
        Mutation::Delete => out.push(2),
        Mutation::PutExpiring {
            value,
            expires_at_ms,
        } => {
            out.push(11);
            put_bytes(out, value);
            put_uvarint(out, *expires_at_ms);
        }
        Mutation::PutSibling { value, context } => {
            out.push(3);
            match value {
                None => out.push(0),
                Some(bytes) => {
                    out.push(1);
                    put_bytes(out, bytes);
                }
            }
            put_version(out, context);
        }
        Mutation::GCounterAdd(n) => {
            out.push(4);
            put_uvarint(out, *n);
        }
        Mutation::PnCounterAdd(delta) => {
            out.push(5);
            // Zigzag: small magnitudes of either sign stay short.
            put_uvarint(out, ((delta << 1) ^ (delta >> 63)) as u64);
        }
        Mutation::GSetAdd(bytes) => {
            out.push(6);
            put_bytes(out, bytes);
        }
        Mutation::OrSetAdd(bytes) => {
            out.push(7);
            put_bytes(out, bytes);
        }
        Mutation::OrSetRemove(bytes) => {
            out.push(8);
            put_bytes(out, bytes);
        }
        Mutation::Merge(record) => {
            out.push(9);
            put_bytes(out, &codec::encode(record));
        }
        Mutation::Signed { value, attestation } => {
            out.push(10);
            match value {
                None => out.push(0),
                Some(bytes) => {
                    out.push(1);
                    put_bytes(out, bytes);
                }
            }
            put_bytes(out, attestation);
        }
        Mutation::Edit { base, op } => {
            out.push(12);
            put_uvarint(out, *base);
            codec::put_text_op(out, op);
        }
    }
}

pub(crate) fn mutation(r: &mut Reader<'_>) -> Result<Mutation, WireError> {
    Ok(match r.u8().map_err(malformed)? {
        1 => Mutation::Put(r.bytes().map_err(malformed)?),
        2 => Mutation::Delete,
        3 => {
            let value = match r.u8().map_err(malformed)? {
                0 => None,
                1 => Some(r.bytes().map_err(malformed)?),
                _ => return Err(malformed(r.malformed("unknown sibling form"))),
            };
            let context = r.version_vector().map_err(malformed)?;
            Mutation::PutSibling { value, context }
        }
        4 => Mutation::GCounterAdd(r.uvarint().map_err(malformed)?),
        5 => {
            let z = r.uvarint().map_err(malformed)?;
            Mutation::PnCounterAdd(((z >> 1) as i64) ^ -((z & 1) as i64))
        }
        6 => Mutation::GSetAdd(r.bytes().map_err(malformed)?),
        7 => Mutation::OrSetAdd(r.bytes().map_err(malformed)?),
        8 => Mutation::OrSetRemove(r.bytes().map_err(malformed)?),
        9 => Mutation::Merge(record(r)?),
        10 => {
            let value = match r.u8().map_err(malformed)? {
                0 => None,
                1 => Some(r.bytes().map_err(malformed)?),
                _ => return Err(malformed(r.malformed("unknown signed form"))),
            };
            let attestation = r.bytes().map_err(malformed)?;
            Mutation::Signed { value, attestation }
        }
        11 => Mutation::PutExpiring {
            value: r.bytes().map_err(malformed)?,
            expires_at_ms: r.uvarint().map_err(malformed)?,
        },
        12 => Mutation::Edit {
            base: r.uvarint().map_err(malformed)?,
            op: r.text_op().map_err(malformed)?,
        },
        _ => return Err(malformed(r.malformed("unknown mutation"))),
    })
}

pub(crate) fn put_outcome(out: &mut Vec<u8>, outcome: &Outcome) {
    match outcome {
        Outcome::Written { record } => {
            out.push(1);
            put_bytes(out, &codec::encode(record));
        }
        Outcome::Read { record: None } => out.extend_from_slice(&[2, 0]),
        Outcome::Read {
            record: Some(record),
        } => {
            out.extend_from_slice(&[2, 1]);
            put_bytes(out, &codec::encode(record));
        }
        Outcome::QuorumFailed { answered, needed } => {
            out.push(3);
            put_uvarint(out, *answered as u64);
            put_uvarint(out, *needed as u64);
        }
        Outcome::NotAReplica { replicas } => {
            out.push(4);
            put_uvarint(out, replicas.len() as u64);
            for node in replicas {
                put_node(out, node);
            }
        }
        Outcome::LocalFailure { failure } => match failure {
            LocalFailure::Storage(detail) => {
                out.push(5);
                put_bytes(out, detail.as_bytes());
            }
            LocalFailure::DiskFull(detail) => {
                out.push(6);
                put_bytes(out, detail.as_bytes());
            }
            LocalFailure::WrongKind(wrong) => {
                out.push(8);
                out.push(wrong.stored.code());
                out.push(wrong.requested.code());
            }
            LocalFailure::SignatureRefused(why) => {
                out.push(7);
                match why {
                    SignatureRefused::Unsigned => out.push(0),
                    SignatureRefused::Invalid(detail) => {
                        out.push(1);
                        put_bytes(out, detail.as_bytes());
                    }
                    SignatureRefused::OutsideWindow {
                        signed_ms,
                        stamped_ms,
                    } => {
                        out.push(2);
                        put_uvarint(out, *signed_ms);
                        put_uvarint(out, *stamped_ms);
                    }
                }
            }
        },
    }
}

/// A failure's text.
fn text(r: &mut Reader<'_>) -> Result<String, WireError> {
    String::from_utf8(r.bytes().map_err(malformed)?)
        .map_err(|_| malformed(r.malformed("failure detail is not UTF-8")))
}

fn count(r: &mut Reader<'_>) -> Result<usize, WireError> {
    usize::try_from(r.uvarint().map_err(malformed)?)
        .map_err(|_| malformed(r.malformed("count out of range")))
}

pub(crate) fn outcome(r: &mut Reader<'_>) -> Result<Outcome, WireError> {
    Ok(match r.u8().map_err(malformed)? {
        1 => Outcome::Written { record: record(r)? },
        2 => match r.u8().map_err(malformed)? {
            0 => Outcome::Read { record: None },
            1 => Outcome::Read {
                record: Some(record(r)?),
            },
            _ => return Err(malformed(r.malformed("unknown read outcome form"))),
        },
        3 => Outcome::QuorumFailed {
            answered: count(r)?,
            needed: count(r)?,
        },
        4 => {
            let n = r.uvarint().map_err(malformed)?;
            if n > MAX_REPLICAS {
                return Err(malformed(r.malformed("too many replicas")));
            }
            let mut replicas = Vec::with_capacity(n as usize);
            for _ in 0..n {
                replicas.push(r.node().map_err(malformed)?);
            }
            Outcome::NotAReplica { replicas }
        }
        5 => Outcome::LocalFailure {
            failure: LocalFailure::Storage(text(r)?),
        },
        6 => Outcome::LocalFailure {
            failure: LocalFailure::DiskFull(text(r)?),
        },
        7 => Outcome::LocalFailure {
            failure: LocalFailure::SignatureRefused(match r.u8().map_err(malformed)? {
                0 => SignatureRefused::Unsigned,
                1 => SignatureRefused::Invalid(text(r)?),
                2 => SignatureRefused::OutsideWindow {
                    signed_ms: r.uvarint().map_err(malformed)?,
                    stamped_ms: r.uvarint().map_err(malformed)?,
                },
                _ => return Err(malformed(r.malformed("unknown signature refusal"))),
            }),
        },
        8 => {
            let mut kind = || {
                r.u8().map_err(malformed).and_then(|code| {
                    Kind::from_code(code).ok_or_else(|| malformed(r.malformed("kind")))
                })
            };
            let (stored, requested) = (kind()?, kind()?);
            Outcome::LocalFailure {
                failure: LocalFailure::WrongKind(WrongKind { stored, requested }),
            }
        }
        _ => return Err(malformed(r.malformed("unknown outcome"))),
    })
}
