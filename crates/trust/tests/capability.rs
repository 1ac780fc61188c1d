//! Capability tokens: granted by the authority, narrowed offline, refused when forged.

use agentstore_trust::{Capability, Operation, Right, SecretKey, TrustError};
use proptest::prelude::*;

const NOW: u64 = 1_800_000_000_000;

fn right(ops: &[Operation], prefix: &str) -> Right {
    Right::new(ops, prefix).unwrap()
}

#[test]
fn a_token_allows_what_it_grants_on_the_keys_under_its_prefix() {
    let authority = SecretKey::generate();
    let token = Capability::issue(
        &authority,
        vec![
            right(&[Operation::Read, Operation::Write], "notes:"),
            right(&[Operation::Read], "metrics:"),
        ],
        0,
    )
    .unwrap();
    token.verify(&authority.public()).unwrap();
    assert!(token.allows(Operation::Write, "notes:a", NOW));
    assert!(
        token.allows(Operation::Read, "notes:", NOW),
        "a scan of the whole prefix"
    );
    assert!(token.allows(Operation::Read, "metrics:cpu", NOW));
    assert!(!token.allows(Operation::Write, "metrics:cpu", NOW));
    assert!(!token.allows(Operation::Read, "ledger:a", NOW));
    assert!(
        !token.allows(Operation::Read, "notes", NOW),
        "a wider scan than granted"
    );
    assert!(!token.allows(Operation::Admin, "", NOW));
    let text = token.to_text();
    assert_eq!(Capability::from_text(&text).unwrap(), token);
}

#[test]
fn a_token_of_another_authority_is_refused() {
    let authority = SecretKey::generate();
    let token = Capability::issue(&authority, vec![right(&[Operation::Admin], "")], 0).unwrap();
    let other = SecretKey::generate();
    assert!(matches!(
        token.verify(&other.public()),
        Err(TrustError::BadSignature { .. })
    ));
}

#[test]
fn attenuation_narrows_and_never_widens() {
    let authority = SecretKey::generate();
    let root = Capability::issue(
        &authority,
        vec![right(&[Operation::Read, Operation::Write], "notes:")],
        NOW + 60_000,
    )
    .unwrap();
    // The holder, offline: read-only, one sub-prefix, and a wider right that stays refused.
    let narrow = root
        .attenuate(
            vec![
                right(&[Operation::Read], "notes:team-a:"),
                right(&[Operation::Admin, Operation::Write], ""),
            ],
            NOW + 1_000,
        )
        .unwrap();
    narrow.verify(&authority.public()).unwrap();
    assert!(narrow.allows(Operation::Read, "notes:team-a:x", NOW));
    assert!(
        narrow.allows(Operation::Write, "notes:team-a:x", NOW),
        "both blocks allow it"
    );
    assert!(!narrow.allows(Operation::Read, "notes:team-b:x", NOW));
    assert!(
        !narrow.allows(Operation::Admin, "", NOW),
        "the first block grants no admin"
    );
    assert!(!narrow.allows(Operation::Read, "ledger:x", NOW));
    // The earliest expiry applies.
    assert_eq!(narrow.expires_ms(), Some(NOW + 1_000));
    assert!(!narrow.allows(Operation::Read, "notes:team-a:x", NOW + 1_000));
    assert!(root.allows(Operation::Read, "notes:team-a:x", NOW + 1_000));
    assert!(!root.allows(Operation::Read, "notes:x", NOW + 60_000));
}

#[test]
fn removing_a_block_leaves_a_proof_that_matches_nothing() {
    let authority = SecretKey::generate();
    let root = Capability::issue(&authority, vec![right(&[Operation::Read], "")], 0).unwrap();
    let narrow = root
        .attenuate(vec![right(&[Operation::Read], "notes:")], 0)
        .unwrap();
    // Re-encode the attenuated token with its first block only and its own proof.
    let bytes = narrow.encode();
    let root_bytes = root.encode();
    let first_block = &root_bytes[2..root_bytes.len() - 32];
    let mut stripped = vec![1, 1];
    stripped.extend_from_slice(first_block);
    stripped.extend_from_slice(&bytes[bytes.len() - 32..]);
    let stripped = Capability::decode(&stripped).unwrap();
    assert!(stripped.verify(&authority.public()).is_err());
}

proptest! {
    /// Parsing a token never panics, whatever arrives.
    #[test]
    fn any_bytes_decode_or_fail_cleanly(bytes in proptest::collection::vec(any::<u8>(), 0..400)) {
        let _ = Capability::decode(&bytes);
        let _ = Capability::from_text(&String::from_utf8_lossy(&bytes));
    }

    /// Changing any bit of a token, attenuated or not, makes it refused.
    #[test]
    fn a_tampered_token_is_refused(index in 0usize..1000, bit in 0u8..8, attenuated: bool) {
        let authority = SecretKey::generate();
        let mut token = Capability::issue(
            &authority,
            vec![right(&[Operation::Read, Operation::Write], "notes:")],
            NOW,
        )
        .unwrap();
        if attenuated {
            token = token.attenuate(vec![right(&[Operation::Read], "notes:a")], 0).unwrap();
        }
        let mut bytes = token.encode();
        let index = index % bytes.len();
        bytes[index] ^= 1 << bit;
        let accepted = Capability::decode(&bytes).and_then(|t| t.verify(&authority.public()));
        prop_assert!(accepted.is_err(), "byte {} bit {} still accepted", index, bit);
    }
}
