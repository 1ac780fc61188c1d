//! Signed writes: an attestation checks against the authority alone, names its author, and
//! any change to the key, the value, the time or the chain breaks it.

use agentstore_trust::{Attestation, Capability, Operation, Right, SecretKey, TrustError};
use proptest::prelude::*;

const NOW: u64 = 1_800_000_000_000;

fn writer(authority: &SecretKey, prefix: &str, expires_ms: u64) -> Capability {
    let rights = vec![Right::new(&[Operation::Read, Operation::Write], prefix).unwrap()];
    Capability::issue(authority, rights, expires_ms).unwrap()
}

#[test]
fn a_signed_write_verifies_with_the_authority_alone_and_names_its_author() {
    let authority = SecretKey::generate();
    let token = writer(&authority, "notes:", 0);
    let signed = token.sign_write("notes:a", Some(b"hello"), NOW).unwrap();
    let text = signed.to_text();
    assert!(
        !text.contains(&token.to_text()["agentstore-token-v1:".len()..]),
        "an attestation never carries the token's proof"
    );
    let read = Attestation::from_text(&text).unwrap();
    assert_eq!(read, signed);
    assert_eq!(
        read.verify(&authority.public(), "notes:a", Some(b"hello"))
            .unwrap(),
        token.author()
    );
    assert_eq!(read.author(), token.author());
    assert_eq!(read.signed_at_ms(), NOW);
    let delete = token.sign_write("notes:a", None, NOW).unwrap();
    delete
        .verify(&authority.public(), "notes:a", None)
        .expect("a signed delete");
}

#[test]
fn the_signature_covers_key_value_and_delete() {
    let issuer = SecretKey::generate();
    let token = writer(&issuer, "notes:", 0);
    let authority = issuer.public();
    let signed = token.sign_write("notes:a", Some(b"hello"), NOW).unwrap();
    for (key, value) in [
        ("notes:b", Some(&b"hello"[..])),
        ("notes:a", Some(&b"hellO"[..])),
        ("notes:a", Some(&b""[..])),
        ("notes:a", None),
    ] {
        assert!(
            matches!(
                signed.verify(&authority, key, value),
                Err(TrustError::BadSignature { .. })
            ),
            "{key} {value:?}"
        );
    }
}

#[test]
fn a_write_outside_the_tokens_rights_or_after_its_expiry_is_refused() {
    let authority = SecretKey::generate();
    let token = writer(&authority, "notes:", NOW + 1_000);
    let elsewhere = token.sign_write("ledger:a", Some(b"x"), NOW).unwrap();
    assert!(matches!(
        elsewhere.verify(&authority.public(), "ledger:a", Some(b"x")),
        Err(TrustError::NotAllowed { .. })
    ));
    let late = token
        .sign_write("notes:a", Some(b"x"), NOW + 1_000)
        .unwrap();
    assert!(matches!(
        late.verify(&authority.public(), "notes:a", Some(b"x")),
        Err(TrustError::NotAllowed { .. })
    ));
    let reader = Capability::issue(
        &authority,
        vec![Right::new(&[Operation::Read], "notes:").unwrap()],
        0,
    )
    .unwrap();
    let unwritable = reader.sign_write("notes:a", Some(b"x"), NOW).unwrap();
    assert!(matches!(
        unwritable.verify(&authority.public(), "notes:a", Some(b"x")),
        Err(TrustError::NotAllowed { .. })
    ));
}

#[test]
fn an_attenuated_token_signs_as_a_new_author_within_the_narrower_rights() {
    let authority = SecretKey::generate();
    let token = writer(&authority, "notes:", 0);
    let narrow = token
        .attenuate(vec![Right::new(&[Operation::Write], "notes:a").unwrap()], 0)
        .unwrap();
    assert_ne!(narrow.author(), token.author());
    let signed = narrow.sign_write("notes:ab", Some(b"x"), NOW).unwrap();
    assert_eq!(
        signed
            .verify(&authority.public(), "notes:ab", Some(b"x"))
            .unwrap(),
        narrow.author()
    );
    let wider = narrow.sign_write("notes:b", Some(b"x"), NOW).unwrap();
    assert!(
        wider
            .verify(&authority.public(), "notes:b", Some(b"x"))
            .is_err()
    );
}

#[test]
fn a_write_signed_under_another_authority_is_refused() {
    let authority = SecretKey::generate();
    let stranger = SecretKey::generate();
    let signed = writer(&stranger, "", 0)
        .sign_write("notes:a", Some(b"x"), NOW)
        .unwrap();
    assert!(matches!(
        signed.verify(&authority.public(), "notes:a", Some(b"x")),
        Err(TrustError::BadSignature { .. })
    ));
}

proptest! {
    /// Any byte of an attestation changed: it either fails to parse or fails to verify
    /// (never verifies for the original write, never panics).
    #[test]
    fn a_tampered_attestation_never_verifies(index in any::<prop::sample::Index>(), flip in 1u8..=255) {
        let authority = SecretKey::generate();
        let token = writer(&authority, "notes:", NOW + 60_000);
        let mut bytes = token.sign_write("notes:a", Some(b"value"), NOW).unwrap().encode();
        let i = index.index(bytes.len());
        bytes[i] ^= flip;
        if let Ok(altered) = Attestation::decode(&bytes) {
            prop_assert!(altered.verify(&authority.public(), "notes:a", Some(b"value")).is_err());
        }
    }

    /// Arbitrary bytes never panic the decoder; what decodes re-encodes to the same bytes.
    #[test]
    fn decoding_is_total_and_canonical(bytes in prop::collection::vec(any::<u8>(), 0..400)) {
        if let Ok(attestation) = Attestation::decode(&bytes) {
            prop_assert_eq!(attestation.encode(), bytes);
        }
    }
}
