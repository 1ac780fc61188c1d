//! Signed writes: which records a node may store for collections that require them.
//!
//! A collection with `signed: true` holds only records its writers signed: each carries an
//! attestation (made by `agentstore_trust`) over its key, its value (or delete) and the time
//! it was signed, by a writer whose capability allowed the write. Every node checks that
//! before it stores a record of such a collection, whichever way the record came: a client's
//! write it coordinates, a replica write, a hint, anti-entropy, a handoff, read repair, a
//! causal write, a Raft entry. A record forged or altered by a node fails the check
//! everywhere.
//!
//! The node stamps a write after the writer signed it, so the stamp is not under the
//! signature; instead the stamp must lie within [`WINDOW_MS`] of the signing time. A node
//! that replays an old signed value with a new stamp (to make it win again) is refused once
//! the window has passed; within it, it can only re-send what the writer signed moments
//! before.
//!
//! This module is the rule; the cryptography is behind [`Signatures`], which the node
//! assembles from its configuration and the cluster's authority.

use std::fmt;

use crate::key::Key;
use crate::record::{Mutation, Record, Value};

/// How far a record's stamp may be from its signing time, either way (milliseconds).
pub const WINDOW_MS: u64 = 5 * 60 * 1000;

/// Which keys need signed writes, and the check of one signature.
pub trait Signatures: Send + Sync + fmt::Debug {
    /// Whether `key`'s collection requires signed writes.
    fn required(&self, key: &Key) -> bool;

    /// Checks that `attestation` signs `value` (`None`: a delete) under `key` by a writer
    /// allowed to write it; returns when it was signed (milliseconds since the Unix epoch).
    fn verify(
        &self,
        key: &Key,
        value: Option<&[u8]>,
        attestation: &[u8],
    ) -> Result<u64, SignatureRefused>;

    /// Told of every refusal (to count it); the checks below call it.
    fn refused(&self, _key: &Key, _why: &SignatureRefused) {}
}

/// Why a write to a signed collection was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SignatureRefused {
    /// The write carries no signature.
    #[error("the collection requires signed writes; this write is not signed")]
    Unsigned,
    /// The signature does not hold (forged, altered, another authority, a token that did
    /// not allow the write).
    #[error("invalid signature: {0}")]
    Invalid(String),
    /// The record was stamped too long before or after it was signed (a replay).
    #[error(
        "stamped at {stamped_ms} ms but signed at {signed_ms} ms: outside the {WINDOW_MS} ms window"
    )]
    OutsideWindow {
        /// When the writer signed.
        signed_ms: u64,
        /// The record's stamp (or the node's time, for a write not stamped yet).
        stamped_ms: u64,
    },
}

impl SignatureRefused {
    /// A short stable name for metrics and error codes.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::Unsigned => "unsigned",
            Self::Invalid(_) => "invalid",
            Self::OutsideWindow { .. } => "outside_window",
        }
    }
}

fn within_window(signed_ms: u64, stamped_ms: u64) -> Result<(), SignatureRefused> {
    if signed_ms.abs_diff(stamped_ms) <= WINDOW_MS {
        Ok(())
    } else {
        Err(SignatureRefused::OutsideWindow {
            signed_ms,
            stamped_ms,
        })
    }
}

/// Checks a whole record before it is stored under `key` (a replica's merge of any kind).
/// Records of collections that do not require signatures pass.
pub fn check_record(
    signatures: &dyn Signatures,
    key: &Key,
    record: &Record,
) -> Result<(), SignatureRefused> {
    if !signatures.required(key) {
        return Ok(());
    }
    record_rule(signatures, key, record).inspect_err(|why| signatures.refused(key, why))
}

fn record_rule(
    signatures: &dyn Signatures,
    key: &Key,
    record: &Record,
) -> Result<(), SignatureRefused> {
    let (Value::Register(value), Some(attestation)) = (&record.value, &record.attestation) else {
        return Err(SignatureRefused::Unsigned);
    };
    let signed_ms = signatures.verify(key, value.as_deref(), attestation)?;
    within_window(signed_ms, record.stamp.wall_ms)
}

/// Checks a mutation before it is applied to `key` at `now_ms` (the time its stamp will be
/// drawn from): a signed write must verify and be signed within the window of `now_ms`; a
/// merge must carry a record that passes [`check_record`]; any other change to a key of a
/// signed collection is refused as unsigned.
pub fn check_mutation(
    signatures: &dyn Signatures,
    key: &Key,
    mutation: &Mutation,
    now_ms: u64,
) -> Result<(), SignatureRefused> {
    mutation_rule(signatures, key, mutation, now_ms).inspect_err(|why| signatures.refused(key, why))
}

/// [`check_mutation`] without reporting a refusal: for telling, after the fact, why a write
/// the node already refused (and counted) failed.
pub fn mutation_rule(
    signatures: &dyn Signatures,
    key: &Key,
    mutation: &Mutation,
    now_ms: u64,
) -> Result<(), SignatureRefused> {
    if !signatures.required(key) {
        return Ok(());
    }
    match mutation {
        Mutation::Signed { value, attestation } => signatures
            .verify(key, value.as_deref(), attestation)
            .and_then(|signed_ms| within_window(signed_ms, now_ms)),
        Mutation::Merge(record) => record_rule(signatures, key, record),
        _ => Err(SignatureRefused::Unsigned),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hlc::Timestamp;
    use crate::node::NodeId;
    use crate::version::VersionVector;

    /// A stand-in for the cryptography: an attestation is `signed_ms` (8 bytes) followed by
    /// the value it signs; keys under `s:` require signatures.
    #[derive(Debug)]
    struct Toy;

    impl Signatures for Toy {
        fn required(&self, key: &Key) -> bool {
            key.collection() == "s"
        }

        fn verify(
            &self,
            _key: &Key,
            value: Option<&[u8]>,
            attestation: &[u8],
        ) -> Result<u64, SignatureRefused> {
            let (at, signed) = attestation.split_at(8);
            if signed != value.unwrap_or_default() {
                return Err(SignatureRefused::Invalid("another value".into()));
            }
            Ok(u64::from_be_bytes(at.try_into().unwrap()))
        }
    }

    fn attest(at: u64, value: &[u8]) -> Vec<u8> {
        [&at.to_be_bytes()[..], value].concat()
    }

    fn record(value: &[u8], attestation: Option<Vec<u8>>, stamped: u64) -> Record {
        Record {
            stamp: Timestamp {
                wall_ms: stamped,
                logical: 0,
                node: NodeId::new("a").unwrap(),
            },
            version: VersionVector::new(),
            value: Value::Register(Some(value.to_vec())),
            attestation,
            expires_at_ms: None,
        }
    }

    #[test]
    fn only_signed_collections_are_checked() {
        let key = Key::new("plain:a").unwrap();
        assert_eq!(
            check_mutation(&Toy, &key, &Mutation::Put(vec![1]), 0),
            Ok(())
        );
        assert_eq!(check_record(&Toy, &key, &record(b"v", None, 0)), Ok(()));
    }

    #[test]
    fn a_signed_collection_takes_only_records_whose_signature_holds_within_the_window() {
        let key = Key::new("s:a").unwrap();
        let at = 1_000_000_000;
        assert_eq!(
            check_record(&Toy, &key, &record(b"v", Some(attest(at, b"v")), at + 5)),
            Ok(())
        );
        assert_eq!(
            check_record(&Toy, &key, &record(b"v", None, at)),
            Err(SignatureRefused::Unsigned)
        );
        assert!(matches!(
            check_record(&Toy, &key, &record(b"altered", Some(attest(at, b"v")), at)),
            Err(SignatureRefused::Invalid(_))
        ));
        assert!(matches!(
            check_record(
                &Toy,
                &key,
                &record(b"v", Some(attest(at, b"v")), at + WINDOW_MS + 1)
            ),
            Err(SignatureRefused::OutsideWindow { .. })
        ));
        assert_eq!(
            check_record(
                &Toy,
                &key,
                &record(b"v", Some(attest(at, b"v")), at - WINDOW_MS)
            ),
            Ok(()),
            "a writer's clock may run ahead of the node's, within the window"
        );
    }

    #[test]
    fn a_signed_collection_refuses_every_unsigned_change() {
        let key = Key::new("s:a").unwrap();
        for mutation in [
            Mutation::Put(vec![1]),
            Mutation::Delete,
            Mutation::PnCounterAdd(1),
        ] {
            assert_eq!(
                check_mutation(&Toy, &key, &mutation, 0),
                Err(SignatureRefused::Unsigned)
            );
        }
        let signed = Mutation::Signed {
            value: None,
            attestation: attest(10, b""),
        };
        assert_eq!(check_mutation(&Toy, &key, &signed, 20), Ok(()));
        assert!(matches!(
            check_mutation(&Toy, &key, &signed, 20 + WINDOW_MS),
            Err(SignatureRefused::OutsideWindow { .. })
        ));
    }
}
