//! The wire format: round trips, stream splitting at any boundary, and garbage rejected
//! without a panic.

use agentstore_core::ot::TextOp;
use agentstore_core::record::{self, Mutation};
use agentstore_core::replication::{LocalFailure, Message, Outcome};
use agentstore_core::signing::SignatureRefused;
use agentstore_core::{HybridClock, Key, NodeId};
use agentstore_wire::{Envelope, FrameDecoder, MAX_FRAME, WireError, decode, encode, encode_frame};
use proptest::prelude::*;

fn record(value: Vec<u8>, physical: u64) -> agentstore_core::Record {
    let mut clock = HybridClock::new(NodeId::new("n1").unwrap(), 500);
    record::apply(None, &Mutation::Put(value), &mut clock, physical).unwrap()
}

fn envelope() -> impl Strategy<Value = Envelope> {
    let key = "[a-z]{1,8}(:[a-z0-9]{0,12})?".prop_map(|k| k.parse::<Key>().unwrap());
    let message = prop_oneof![
        (
            key.clone(),
            prop::collection::vec(any::<u8>(), 0..64),
            any::<u32>()
        )
            .prop_map(|(key, value, t)| Message::Replicate {
                request: 0,
                key,
                record: record(value, u64::from(t))
            }),
        Just(Message::Replicated { request: 0 }),
        key.clone()
            .prop_map(|key| Message::Read { request: 0, key }),
        prop::option::of((prop::collection::vec(any::<u8>(), 0..64), any::<u32>())).prop_map(|r| {
            Message::ReadReply {
                request: 0,
                record: r.map(|(v, t)| record(v, u64::from(t))),
            }
        }),
        (0u8..5).prop_flat_map(|depth| prop::collection::vec(any::<u64>(), 1usize << depth)
            .prop_map(move |leaves| Message::TreeLeaves { depth, leaves })),
        (0u8..4, 0u8..3).prop_flat_map(|(coarse, extra)| {
            let leaves = prop::collection::vec(any::<u64>(), 1usize << extra);
            prop::collection::btree_map(0u32..(1 << coarse), leaves, 0..3).prop_map(move |b| {
                Message::SubLeaves {
                    depth: coarse + extra,
                    coarse,
                    buckets: b.into_iter().collect(),
                }
            })
        }),
        (0u8..5).prop_flat_map(
            |depth| prop::collection::btree_set(0u32..(1 << depth), 0..4).prop_map(move |b| {
                Message::Buckets {
                    depth,
                    buckets: b.into_iter().collect(),
                }
            })
        ),
    ];
    let bytes = || prop::collection::vec(any::<u8>(), 0..32);
    let node = "[a-z]{1,6}".prop_map(|n| NodeId::new(n).unwrap());
    let context = prop::collection::btree_map(node.clone(), 1u64..1000, 0..3).prop_map(|entries| {
        let mut vv = agentstore_core::VersionVector::new();
        for (node, counter) in entries {
            vv.witness(&node, counter);
        }
        vv
    });
    let mutation = prop_oneof![
        bytes().prop_map(Mutation::Put),
        Just(Mutation::Delete),
        (prop::option::of(bytes()), context.clone())
            .prop_map(|(value, context)| Mutation::PutSibling { value, context }),
        any::<u64>().prop_map(Mutation::GCounterAdd),
        any::<i64>().prop_map(Mutation::PnCounterAdd),
        bytes().prop_map(Mutation::GSetAdd),
        bytes().prop_map(Mutation::OrSetAdd),
        bytes().prop_map(Mutation::OrSetRemove),
        (prop::option::of(bytes()), bytes())
            .prop_map(|(value, attestation)| Mutation::Signed { value, attestation }),
        (bytes(), any::<u32>()).prop_map(|(v, t)| Mutation::Merge(record(v, u64::from(t)))),
        (
            any::<u64>(),
            prop::collection::vec((0u8..3, 1u64..5, "[a✓]{1,3}"), 0..6)
        )
            .prop_map(|(base, steps)| Mutation::Edit {
                base,
                op: steps
                    .iter()
                    .fold(TextOp::new(), |op, (kind, n, text)| match kind {
                        0 => op.retain(*n),
                        1 => op.delete(*n),
                        _ => op.insert(text),
                    }),
            }),
    ];
    let outcome = prop_oneof![
        (bytes(), any::<u32>()).prop_map(|(v, t)| Outcome::Written {
            record: record(v, u64::from(t))
        }),
        prop::option::of((bytes(), any::<u32>())).prop_map(|r| Outcome::Read {
            record: r.map(|(v, t)| record(v, u64::from(t)))
        }),
        (0usize..10, 0usize..10)
            .prop_map(|(answered, needed)| Outcome::QuorumFailed { answered, needed }),
        prop::collection::vec(node.clone(), 0..5)
            .prop_map(|replicas| Outcome::NotAReplica { replicas }),
        prop_oneof![
            ".{0,20}".prop_map(LocalFailure::Storage),
            ".{0,20}".prop_map(LocalFailure::DiskFull),
            Just(LocalFailure::SignatureRefused(SignatureRefused::Unsigned)),
            (0u8..6, 0u8..6).prop_map(|(stored, requested)| {
                LocalFailure::WrongKind(record::WrongKind {
                    stored: record::Kind::from_code(stored).unwrap(),
                    requested: record::Kind::from_code(requested).unwrap(),
                })
            }),
            ".{0,20}"
                .prop_map(|why| LocalFailure::SignatureRefused(SignatureRefused::Invalid(why))),
            (any::<u64>(), any::<u64>()).prop_map(|(signed_ms, stamped_ms)| {
                LocalFailure::SignatureRefused(SignatureRefused::OutsideWindow {
                    signed_ms,
                    stamped_ms,
                })
            }),
        ]
        .prop_map(|failure| Outcome::LocalFailure { failure }),
    ];
    let membership = prop_oneof![
        (key.clone(), mutation).prop_map(|(key, mutation)| Message::Forward {
            request: 0,
            key,
            mutation
        }),
        outcome.prop_map(|outcome| Message::Forwarded {
            request: 0,
            outcome
        }),
        bytes().prop_map(|data| Message::Gossip { data }),
        bytes().prop_map(|data| Message::Raft { request: 0, data }),
        bytes().prop_map(|data| Message::RaftReply { request: 0, data }),
        Just(Message::Leaving),
        prop::collection::vec(node.clone(), 0..4).prop_map(|nodes| Message::Departed { nodes }),
        context
            .clone()
            .prop_map(|applied| Message::CausalHave { applied }),
        prop::collection::vec(
            (
                node.clone(),
                1u64..50,
                context.clone(),
                prop::collection::btree_map(key.clone(), (bytes(), any::<u32>()), 1..3),
            ),
            0..3,
        )
        .prop_map(|writes| Message::CausalWrites {
            writes: writes
                .into_iter()
                .map(|(origin, seq, mut deps, entries)| {
                    // The numbering rule: the origin's own dependency is its previous write.
                    let mut fixed = agentstore_core::VersionVector::new();
                    for (node, counter) in deps.iter().filter(|(n, _)| **n != origin) {
                        fixed.witness(node, counter);
                    }
                    fixed.witness(&origin, seq - 1);
                    deps = fixed;
                    agentstore_core::causal::CausalWrite {
                        origin,
                        seq,
                        deps,
                        entries: entries
                            .into_iter()
                            .map(|(k, (v, t))| (k, record(v, u64::from(t))))
                            .collect(),
                    }
                })
                .collect(),
        }),
        (bytes(), prop::option::of(key.clone()), any::<u32>()).prop_map(
            |(prefix, after, limit)| Message::Scan {
                request: 0,
                prefix,
                after,
                limit
            }
        ),
        prop::collection::btree_map(key.clone(), (bytes(), any::<u32>()), 0..4).prop_map(|m| {
            Message::Scanned {
                request: 0,
                entries: m
                    .into_iter()
                    .map(|(k, (v, t))| (k, record(v, u64::from(t))))
                    .collect(),
            }
        }),
    ];
    let message = prop_oneof![message, membership];
    (any::<u64>(), any::<u64>(), message).prop_map(|(request, deadline_ms, message)| {
        // The request id lives in the envelope; the message carries the same one.
        let message = match message {
            Message::Replicate { key, record, .. } => Message::Replicate {
                request,
                key,
                record,
            },
            Message::Replicated { .. } => Message::Replicated { request },
            Message::Read { key, .. } => Message::Read { request, key },
            Message::ReadReply { record, .. } => Message::ReadReply { request, record },
            Message::Forward { key, mutation, .. } => Message::Forward {
                request,
                key,
                mutation,
            },
            Message::Forwarded { outcome, .. } => Message::Forwarded { request, outcome },
            Message::Scan {
                prefix,
                after,
                limit,
                ..
            } => Message::Scan {
                request,
                prefix,
                after,
                limit,
            },
            Message::Scanned { entries, .. } => Message::Scanned { request, entries },
            Message::Raft { data, .. } => Message::Raft { request, data },
            Message::RaftReply { data, .. } => Message::RaftReply { request, data },
            unnumbered => unnumbered,
        };
        Envelope {
            request,
            deadline_ms,
            message,
        }
    })
}

proptest! {
    #[test]
    fn envelopes_round_trip(envelope in envelope()) {
        prop_assert_eq!(decode(&encode(&envelope)), Ok(envelope));
    }

    /// However the stream is cut into reads, the same envelopes come out, in order.
    #[test]
    fn frames_split_at_any_boundary(envelopes in prop::collection::vec(envelope(), 1..6), cuts in prop::collection::vec(1usize..40, 1..20)) {
        let stream: Vec<u8> = envelopes.iter().flat_map(encode_frame).collect();
        let mut decoder = FrameDecoder::new();
        let mut out = Vec::new();
        let mut offset = 0;
        for cut in cuts.iter().cycle() {
            if offset >= stream.len() {
                break;
            }
            let end = (offset + cut).min(stream.len());
            decoder.push(&stream[offset..end]);
            offset = end;
            while let Some(envelope) = decoder.next_envelope().unwrap() {
                out.push(envelope);
            }
        }
        prop_assert_eq!(out, envelopes);
        prop_assert_eq!(decoder.buffered(), 0);
    }

    /// Garbage is an error or a message, never a panic, and what decodes re-encodes exactly.
    #[test]
    fn garbage_never_panics(bytes in prop::collection::vec(any::<u8>(), 0..300)) {
        if let Ok(envelope) = decode(&bytes) {
            prop_assert_eq!(encode(&envelope), bytes.clone());
        }
        let mut decoder = FrameDecoder::new();
        decoder.push(&bytes);
        while let Ok(Some(_)) = decoder.next_envelope() {}
    }
}

#[test]
fn oversized_frames_and_unknown_versions_are_refused() {
    let mut decoder = FrameDecoder::new();
    decoder.push(&((MAX_FRAME + 1) as u32).to_be_bytes());
    assert_eq!(
        decoder.next_envelope(),
        Err(WireError::FrameTooLarge { len: MAX_FRAME + 1 })
    );
    assert_eq!(decode(&[2, 0, 0, 2]), Err(WireError::Version(2)));
    assert!(matches!(
        decode(&[1, 0, 0, 9]),
        Err(WireError::Malformed { .. })
    ));
    assert!(matches!(
        decode(&[1, 0, 0, 3, 2, b':', b'x']),
        Err(WireError::Key(_))
    ));
}
