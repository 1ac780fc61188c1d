//! Records: the encoding round-trips, garbage never panics, old formats stay readable, and
//! record merge obeys the semilattice laws on states that replicas really reach.

use agentstore_core::codec::{self, DecodeError};
use agentstore_core::ot::TextOp;
use agentstore_core::record::{self, Mutation, Record};
use agentstore_core::{Crdt, HybridClock, NodeId, VersionVector};
use proptest::prelude::*;

fn node(i: usize) -> NodeId {
    NodeId::new(format!("node-{i}")).unwrap()
}

fn bytes() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        3 => prop::collection::vec(0u8..4, 0..3),
        1 => prop::collection::vec(any::<u8>(), 0..300),
        1 => "\\PC{0,12}".prop_map(String::into_bytes),
    ]
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        bytes().prop_map(Mutation::Put),
        (bytes(), 0u64..100).prop_map(|(value, expires_at_ms)| Mutation::PutExpiring {
            value,
            expires_at_ms
        }),
        Just(Mutation::Delete),
        prop::option::of(bytes()).prop_map(|value| Mutation::PutSibling {
            value,
            context: VersionVector::new()
        }),
        any::<u32>().prop_map(|n| Mutation::GCounterAdd(u64::from(n))),
        any::<i32>().prop_map(|n| Mutation::PnCounterAdd(i64::from(n))),
        bytes().prop_map(Mutation::GSetAdd),
        bytes().prop_map(Mutation::OrSetAdd),
        bytes().prop_map(Mutation::OrSetRemove),
        (prop::option::of(bytes()), bytes())
            .prop_map(|(value, attestation)| Mutation::Signed { value, attestation }),
        // Inserts at the start, against revision 0: they apply while the document keeps
        // every edit since (a merge takes the later revision whole).
        "[ab✓]{1,3}".prop_map(|text| Mutation::Edit {
            base: 0,
            op: TextOp::new().insert(&text),
        }),
    ]
}

#[derive(Debug, Clone)]
enum Step {
    Mutate {
        replica: usize,
        mutation: Mutation,
        physical: u64,
        with_context: bool,
    },
    Merge {
        into: usize,
        from: usize,
    },
}

fn steps() -> impl Strategy<Value = Vec<Step>> {
    let step = prop_oneof![
        3 => (0..3usize, mutation(), 0u64..50, any::<bool>()).prop_map(|(replica, mutation, physical, with_context)| {
            Step::Mutate { replica, mutation, physical, with_context }
        }),
        1 => (0..3usize, 0..3usize).prop_map(|(into, from)| Step::Merge { into, from }),
    ];
    prop::collection::vec(step, 1..30)
}

/// Runs the steps on three replicas of one key; returns every state reached.
fn run(steps: &[Step]) -> Vec<Record> {
    let mut clocks: Vec<HybridClock> = (0..3).map(|i| HybridClock::new(node(i), 1_000)).collect();
    let mut replicas: Vec<Option<Record>> = vec![None; 3];
    let mut seen = Vec::new();
    for step in steps {
        match step {
            Step::Mutate {
                replica,
                mutation,
                physical,
                with_context,
            } => {
                let mut mutation = mutation.clone();
                if let (Mutation::PutSibling { context, .. }, Some(current), true) =
                    (&mut mutation, &replicas[*replica], with_context)
                    && let record::Value::MultiValue(register) = &current.value
                {
                    *context = register.context().clone();
                }
                if let Ok(next) = record::apply(
                    replicas[*replica].as_ref(),
                    &mutation,
                    &mut clocks[*replica],
                    *physical,
                ) {
                    replicas[*replica] = Some(next);
                }
            }
            Step::Merge { into, from } => {
                if let Some(from) = replicas[*from].clone() {
                    let next = record::apply(
                        replicas[*into].as_ref(),
                        &Mutation::Merge(from),
                        &mut clocks[*into],
                        0,
                    )
                    .unwrap();
                    replicas[*into] = Some(next);
                }
            }
        }
        seen.extend(replicas.iter().flatten().cloned());
    }
    seen
}

fn joined(a: &Record, b: &Record) -> Record {
    let mut out = a.clone();
    out.merge(b);
    out
}

proptest! {
    #[test]
    fn encoding_round_trips(steps in steps()) {
        for record in run(&steps) {
            let encoded = codec::encode(&record);
            prop_assert_eq!(encoded[0], codec::FORMAT_V1);
            prop_assert_eq!(codec::decode(&encoded), Ok(record));
        }
    }

    /// Decoding arbitrary bytes returns an error or a record, never panics; and what it
    /// accepts is canonical (it encodes back to the same bytes).
    #[test]
    fn decoding_garbage_never_panics(input in prop::collection::vec(any::<u8>(), 0..200)) {
        if let Ok(record) = codec::decode(&input) {
            prop_assert_eq!(codec::encode(&record), input);
        }
    }

    /// Garbage that starts like a real record exercises the deep decoding paths.
    #[test]
    fn decoding_corrupted_records_never_panics(steps in steps(), flips in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..4), cut in any::<prop::sample::Index>()) {
        for record in run(&steps).into_iter().take(3) {
            let original = codec::encode(&record);
            // The encoding is prefix-free: no strict prefix of a record is a record.
            let truncated = &original[..cut.index(original.len())];
            prop_assert!(codec::decode(truncated).is_err());
            let mut encoded = original.clone();
            for (index, byte) in &flips {
                let i = index.index(encoded.len());
                encoded[i] = *byte;
            }
            if let Ok(decoded) = codec::decode(&encoded) {
                prop_assert_eq!(codec::encode(&decoded), encoded.clone());
            }
        }
    }

    #[test]
    fn record_merge_is_commutative_associative_idempotent(steps in steps(), picks in (any::<prop::sample::Index>(), any::<prop::sample::Index>(), any::<prop::sample::Index>())) {
        let states = run(&steps);
        prop_assume!(!states.is_empty());
        let a = picks.0.get(&states);
        let b = picks.1.get(&states);
        let c = picks.2.get(&states);
        prop_assert_eq!(joined(a, b), joined(b, a));
        prop_assert_eq!(joined(&joined(a, b), c), joined(a, &joined(b, c)));
        prop_assert_eq!(joined(a, a), a.clone());
    }
}

#[test]
fn unknown_formats_and_empty_input_are_typed_errors() {
    assert_eq!(codec::decode(&[]), Err(DecodeError::Empty));
    assert_eq!(
        codec::decode(&[9, 0, 0]),
        Err(DecodeError::UnknownFormat(9))
    );
    assert!(matches!(
        codec::decode(&[1]),
        Err(DecodeError::Malformed { offset: 1, .. })
    ));
}

/// Records of every kind, built deterministically; the fixture files hold their format-1
/// encoding as first written. Every later version must still decode them to these records.
fn fixture_records() -> Vec<(&'static str, Record)> {
    let mut a = HybridClock::new(node(1), 500);
    let mut b = HybridClock::new(node(2), 500);
    let apply = |current: Option<&Record>, m: Mutation, clock: &mut HybridClock, t: u64| {
        record::apply(current, &m, clock, t).unwrap()
    };
    let lww = apply(
        None,
        Mutation::Put("héllo ✓".into()),
        &mut a,
        1_700_000_000_000,
    );
    let tombstone = apply(Some(&lww), Mutation::Delete, &mut b, 1_700_000_000_001);
    let left = apply(
        None,
        Mutation::PutSibling {
            value: Some(b"left".to_vec()),
            context: VersionVector::new(),
        },
        &mut a,
        5,
    );
    let right = apply(
        None,
        Mutation::PutSibling {
            value: Some(b"right".to_vec()),
            context: VersionVector::new(),
        },
        &mut b,
        5,
    );
    let siblings = joined(&left, &right);
    let g = apply(None, Mutation::GCounterAdd(41), &mut a, 7);
    let g = joined(&g, &apply(None, Mutation::GCounterAdd(1), &mut b, 7));
    let pn = apply(None, Mutation::PnCounterAdd(-5), &mut a, 8);
    let pn = apply(Some(&pn), Mutation::PnCounterAdd(300), &mut a, 9);
    let gset = apply(None, Mutation::GSetAdd(vec![0, 255]), &mut a, 10);
    let gset = apply(Some(&gset), Mutation::GSetAdd(b"x".to_vec()), &mut a, 10);
    let orset = apply(None, Mutation::OrSetAdd(b"a".to_vec()), &mut a, 11);
    let orset = apply(Some(&orset), Mutation::OrSetAdd(b"b".to_vec()), &mut a, 12);
    let orset = apply(
        Some(&orset),
        Mutation::OrSetRemove(b"a".to_vec()),
        &mut a,
        13,
    );
    let signed = apply(
        None,
        Mutation::Signed {
            value: Some(b"signed".to_vec()),
            attestation: b"an attestation".to_vec(),
        },
        &mut a,
        14,
    );
    let signed_delete = apply(
        Some(&signed),
        Mutation::Signed {
            value: None,
            attestation: b"another".to_vec(),
        },
        &mut b,
        15,
    );
    let expiring = apply(
        None,
        Mutation::PutExpiring {
            value: b"heartbeat".to_vec(),
            expires_at_ms: 1_700_000_030_000,
        },
        &mut b,
        16,
    );
    let document = apply(
        None,
        Mutation::Edit {
            base: 0,
            op: TextOp::new().insert("héllo"),
        },
        &mut a,
        17,
    );
    let document = apply(
        Some(&document),
        Mutation::Edit {
            base: 0,
            op: TextOp::new().insert("✓ "),
        },
        &mut b,
        18,
    );
    vec![
        ("document", document),
        ("expiring", expiring),
        ("signed", signed),
        ("signed-tombstone", signed_delete),
        ("lww", lww),
        ("tombstone", tombstone),
        ("multi-value", siblings),
        ("g-counter", g),
        ("pn-counter", pn),
        ("g-set", gset),
        ("or-set", orset),
    ]
}

fn fixture_path(name: &str) -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join(format!("tests/fixtures/record-v1-{name}.bin"))
}

#[test]
fn format_1_fixtures_still_decode() {
    for (name, expected) in fixture_records() {
        let bytes =
            std::fs::read(fixture_path(name)).unwrap_or_else(|e| panic!("fixture {name}: {e}"));
        assert_eq!(bytes[0], 1, "fixture {name} is format 1");
        assert_eq!(
            codec::decode(&bytes).as_ref(),
            Ok(&expected),
            "fixture {name}"
        );
    }
}

/// Writes the fixtures. Run once when a format is introduced, never to "fix" a failing test:
/// `cargo test -p agentstore-core --test records -- --ignored write_fixtures`
#[test]
#[ignore]
fn write_fixtures() {
    for (name, record) in fixture_records() {
        std::fs::write(fixture_path(name), codec::encode(&record)).unwrap();
    }
}
