//! What a Raft log entry carries, and what applying it answers, in agentstore's own encoding.
//!
//! A log entry is persisted and replicated, so its bytes are versioned and canonical:
//!
//! ```text
//! command  = format:u8(=1) at_ms:uvarint count:uvarint write*
//! write    = key:bytes mutation:bytes expect fence
//! expect   = 0 | 1 (absent) | 2 vector (exactly this version)
//! fence    = 0 | 1 lock:bytes token:uvarint
//! outcome  = 0 count:uvarint record:bytes*            applied, one record per write
//!          | 1 key:bytes expect 0|1 vector            a condition failed (actual version)
//!          | 2 lock:bytes token:uvarint highest:uvarint   fenced off
//!          | 3 key:bytes stored:u8 requested:u8       wrong kind
//!          | 4 detail:bytes                           the state machine could not apply it
//! ```
//!
//! `mutation` is `agentstore_wire`'s mutation grammar, `record` and `vector` are
//! `agentstore_core::codec`'s.

use agentstore_core::Key;
use agentstore_core::codec::{self, DecodeError, Reader, put_bytes, put_uvarint, put_version};
use agentstore_core::key::KeyError;
use agentstore_core::record::{Expect, ExpectationFailed, Kind, Record, WrongKind};
use agentstore_engine::{EngineError, Fence, Write};

/// The command format this build writes and reads.
pub const FORMAT: u8 = 1;

/// Bytes that are not a command or an outcome.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CommandError {
    /// A command of a format this build does not read.
    #[error("command format {0} is not readable by this build (reads {FORMAT})")]
    Format(u8),
    /// Malformed bytes.
    #[error(transparent)]
    Decode(#[from] DecodeError),
    /// A key in the bytes is invalid.
    #[error(transparent)]
    Key(#[from] KeyError),
    /// A mutation in the bytes is invalid.
    #[error("invalid mutation: {0}")]
    Mutation(String),
}

/// Encodes a batch of writes made at `at_ms` (the leader's clock when it proposed them).
pub fn encode_command(at_ms: u64, writes: &[Write]) -> Vec<u8> {
    let mut out = vec![FORMAT];
    put_uvarint(&mut out, at_ms);
    put_uvarint(&mut out, writes.len() as u64);
    for write in writes {
        put_bytes(&mut out, write.key.as_bytes());
        put_bytes(&mut out, &agentstore_wire::encode_mutation(&write.mutation));
        put_expect(&mut out, write.expect.as_ref());
        match &write.fence {
            None => out.push(0),
            Some(fence) => {
                out.push(1);
                put_bytes(&mut out, fence.lock.as_bytes());
                put_uvarint(&mut out, fence.token);
            }
        }
    }
    out
}

/// Decodes [`encode_command`]'s bytes: the proposal time and the writes.
pub fn decode_command(bytes: &[u8]) -> Result<(u64, Vec<Write>), CommandError> {
    let mut r = Reader::new(bytes);
    let format = r.u8()?;
    if format != FORMAT {
        return Err(CommandError::Format(format));
    }
    let at_ms = r.uvarint()?;
    let count = r.uvarint()?;
    // Each write takes at least four bytes: never allocate more than the input describes.
    if count > r.remaining() as u64 / 4 {
        return Err(r.malformed("more writes than bytes").into());
    }
    let mut writes = Vec::with_capacity(count as usize);
    for _ in 0..count {
        let key = Key::new(r.slice()?)?;
        let mutation = agentstore_wire::decode_mutation(r.slice()?)
            .map_err(|e| CommandError::Mutation(e.to_string()))?;
        let expect = expect(&mut r)?;
        let fence = match r.u8()? {
            0 => None,
            1 => Some(Fence {
                lock: utf8(&mut r)?,
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
    if r.remaining() != 0 {
        return Err(r.malformed("trailing bytes after the command").into());
    }
    Ok((at_ms, writes))
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
            out.push(kind_code(source.stored));
            out.push(kind_code(source.requested));
        }
        Err(other) => {
            out.push(4);
            put_bytes(&mut out, other.to_string().as_bytes());
        }
    }
    out
}

/// Decodes [`encode_outcome`]'s bytes back into the result the state machine computed.
pub fn decode_outcome(bytes: &[u8]) -> Result<Result<Vec<Record>, EngineError>, CommandError> {
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
            let stored = kind(r.u8()?).ok_or_else(|| r.malformed("kind"))?;
            let requested = kind(r.u8()?).ok_or_else(|| r.malformed("kind"))?;
            Err(EngineError::WrongKind {
                key,
                source: WrongKind { stored, requested },
            })
        }
        4 => Err(EngineError::Storage {
            detail: utf8(&mut r)?,
        }),
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

fn expect(r: &mut Reader<'_>) -> Result<Option<Expect>, CommandError> {
    Ok(match r.u8()? {
        0 => None,
        1 => Some(Expect::Absent),
        2 => Some(Expect::Version(r.version_vector()?)),
        _ => return Err(r.malformed("expectation tag").into()),
    })
}

fn utf8(r: &mut Reader<'_>) -> Result<String, CommandError> {
    let bytes = r.slice()?;
    String::from_utf8(bytes.to_vec()).map_err(|_| r.malformed("text is not UTF-8").into())
}

const KINDS: [Kind; 6] = [
    Kind::Register,
    Kind::MultiValue,
    Kind::GCounter,
    Kind::PnCounter,
    Kind::GSet,
    Kind::OrSet,
];

fn kind_code(kind: Kind) -> u8 {
    KINDS.iter().position(|k| *k == kind).unwrap_or(0) as u8
}

fn kind(code: u8) -> Option<Kind> {
    KINDS.get(usize::from(code)).copied()
}

#[cfg(test)]
mod tests {
    use agentstore_core::record::Mutation;
    use agentstore_core::version::VersionVector;

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
        let bytes = encode_command(1234, &writes);
        assert_eq!(decode_command(&bytes).unwrap(), (1234, writes));
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        let bytes = encode_command(1, &[Write::new(key("a:b"), Mutation::Delete)]);
        for cut in 0..bytes.len() {
            assert!(
                decode_command(&bytes[..cut]).is_err(),
                "prefix of {cut} bytes"
            );
        }
        let mut newer = bytes.clone();
        newer[0] = 2;
        assert_eq!(decode_command(&newer), Err(CommandError::Format(2)));
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
        ];
        for case in cases {
            let text = case.to_string();
            let decoded = decode_outcome(&encode_outcome(&Err(case))).unwrap();
            assert_eq!(decoded.unwrap_err().to_string(), text);
        }
    }
}
