//! What a Raft log entry carries, in agentstore's own encoding.
//!
//! A log entry is persisted and replicated, so its bytes are versioned and canonical:
//!
//! ```text
//! command = 1 at_ms:uvarint writes                       a batch, applied atomically
//!         | 2 at_ms:uvarint step:u8 txn:bytes [writes]   a two-phase commit step:
//!                                                        0 prepare (with writes), 1 commit, 2 abort
//! ```
//!
//! `at_ms` is the proposer's clock; `writes` and the outcome of applying an entry are
//! `agentstore_engine::batch_codec`'s grammar.

use agentstore_core::codec::{DecodeError, Reader, put_bytes, put_uvarint};
use agentstore_engine::Write;
use agentstore_engine::batch_codec::{self, BatchCodecError};

pub use agentstore_engine::batch_codec::{decode_outcome, encode_outcome};

/// A batch, applied atomically.
const BATCH: u8 = 1;
/// A two-phase commit step.
const STEP: u8 = 2;

/// What an entry asks the state machine to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    /// Apply these writes atomically.
    Batch(Vec<Write>),
    /// Check these writes' conditions, lock their keys and keep them for `txn`.
    Prepare {
        /// The transaction.
        txn: String,
        /// Its writes to this group.
        writes: Vec<Write>,
    },
    /// Apply what `txn` prepared and unlock.
    Commit {
        /// The transaction.
        txn: String,
    },
    /// Drop what `txn` prepared and unlock.
    Abort {
        /// The transaction.
        txn: String,
    },
}

/// Bytes that are not a command.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CommandError {
    /// A command of a format this build does not read.
    #[error("command format {0} is not readable by this build (reads {BATCH} and {STEP})")]
    Format(u8),
    /// Malformed bytes.
    #[error(transparent)]
    Decode(#[from] DecodeError),
    /// Malformed writes.
    #[error(transparent)]
    Batch(#[from] BatchCodecError),
}

/// Encodes `op`, proposed at `at_ms` (the proposer's clock).
pub fn encode_command(at_ms: u64, op: &Op) -> Vec<u8> {
    let mut out = Vec::new();
    let (step, txn, writes) = match op {
        Op::Batch(writes) => {
            out.push(BATCH);
            put_uvarint(&mut out, at_ms);
            batch_codec::put_writes(&mut out, writes);
            return out;
        }
        Op::Prepare { txn, writes } => (0, txn, Some(writes)),
        Op::Commit { txn } => (1, txn, None),
        Op::Abort { txn } => (2, txn, None),
    };
    out.push(STEP);
    put_uvarint(&mut out, at_ms);
    out.push(step);
    put_bytes(&mut out, txn.as_bytes());
    if let Some(writes) = writes {
        batch_codec::put_writes(&mut out, writes);
    }
    out
}

/// Decodes [`encode_command`]'s bytes: the proposal time and the operation.
pub fn decode_command(bytes: &[u8]) -> Result<(u64, Op), CommandError> {
    let mut r = Reader::new(bytes);
    let format = r.u8()?;
    let at_ms = match format {
        BATCH | STEP => r.uvarint()?,
        other => return Err(CommandError::Format(other)),
    };
    let op = if format == BATCH {
        Op::Batch(batch_codec::writes(&mut r)?)
    } else {
        let step = r.u8()?;
        let txn = String::from_utf8(r.slice()?.to_vec())
            .map_err(|_| r.malformed("transaction id is not UTF-8"))?;
        match step {
            0 => Op::Prepare {
                txn,
                writes: batch_codec::writes(&mut r)?,
            },
            1 => Op::Commit { txn },
            2 => Op::Abort { txn },
            _ => return Err(r.malformed("two-phase step").into()),
        }
    };
    if r.remaining() != 0 {
        return Err(r.malformed("trailing bytes after the command").into());
    }
    Ok((at_ms, op))
}

#[cfg(test)]
mod tests {
    use agentstore_core::Key;
    use agentstore_core::record::{Expect, ExpectationFailed, Kind, Mutation, WrongKind};
    use agentstore_core::version::VersionVector;
    use agentstore_engine::{EngineError, Fence};

    use super::*;

    fn key(s: &str) -> Key {
        Key::new(s.as_bytes()).unwrap()
    }

    #[test]
    fn commands_round_trip() {
        let writes = vec![
            Write::new(key("bank:a"), Mutation::PnCounterAdd(-5)),
            Write::expecting(key("bank:b"), Mutation::Put(b"x".to_vec()), Expect::Absent).fenced(
                Fence {
                    lock: "bank".into(),
                    token: 7,
                },
            ),
            Write::expecting(
                key("bank:c"),
                Mutation::Delete,
                Expect::Version(VersionVector::default()),
            ),
        ];
        for op in [
            Op::Batch(writes.clone()),
            Op::Prepare {
                txn: "t1".into(),
                writes,
            },
            Op::Commit { txn: "t1".into() },
            Op::Abort { txn: "t2".into() },
        ] {
            let bytes = encode_command(1234, &op);
            assert_eq!(decode_command(&bytes).unwrap(), (1234, op));
        }
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        let bytes = encode_command(
            1,
            &Op::Batch(vec![Write::new(key("a:b"), Mutation::Delete)]),
        );
        for cut in 0..bytes.len() {
            assert!(
                decode_command(&bytes[..cut]).is_err(),
                "prefix of {cut} bytes"
            );
        }
        let mut newer = bytes.clone();
        newer[0] = 3;
        assert_eq!(decode_command(&newer), Err(CommandError::Format(3)));
        assert!(decode_command(&[1, 0, 255, 255, 255, 255, 15]).is_err());
    }

    #[test]
    fn refusals_round_trip_with_their_details() {
        let cases = vec![
            EngineError::Fenced {
                lock: "l".into(),
                token: 3,
                highest: 9,
            },
            EngineError::ExpectationFailed {
                key: key("a:b"),
                source: ExpectationFailed {
                    expected: Expect::Absent,
                    actual: Some(VersionVector::default()),
                },
            },
            EngineError::WrongKind {
                key: key("a:b"),
                source: WrongKind {
                    stored: Kind::GSet,
                    requested: Kind::PnCounter,
                },
            },
            EngineError::InTransaction {
                key: key("a:b"),
                txn: "node-a-1".into(),
            },
        ];
        for case in cases {
            let text = case.to_string();
            let decoded = decode_outcome(&encode_outcome(&Err(case))).unwrap();
            assert_eq!(decoded.unwrap_err().to_string(), text);
        }
    }
}
