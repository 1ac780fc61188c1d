//! Keys, admissions and the peer-link handshake.

use std::os::unix::fs::PermissionsExt;
use std::sync::Arc;

use agentstore_trust::{
    Admission, PeerTls, PeerTrust, PublicKey, SecretKey, TrustError, admission_path, peer_key,
};
use proptest::prelude::*;
use rustls::{ClientConnection, Connection, ServerConnection};

fn admitted(authority: &SecretKey, name: &str) -> (SecretKey, Admission) {
    let key = SecretKey::generate();
    let admission = Admission::issue(authority, name, key.public()).unwrap();
    (key, admission)
}

#[test]
fn a_public_key_reads_back_from_its_text_form() {
    let key = SecretKey::generate().public();
    let text = key.to_string();
    assert!(text.starts_with("ed25519:"), "{text}");
    assert_eq!(text.parse::<PublicKey>().unwrap(), key);
    assert!("ed25519:abc".parse::<PublicKey>().is_err());
    assert!("rsa:AAAA".parse::<PublicKey>().is_err());
}

#[test]
fn an_admission_verifies_under_its_authority_only() {
    let authority = SecretKey::generate();
    let (_, admission) = admitted(&authority, "node-a");
    admission.verify(&authority.public()).unwrap();
    let stranger = SecretKey::generate();
    assert!(matches!(
        admission.verify(&stranger.public()),
        Err(TrustError::BadSignature { .. })
    ));
    let text = admission.to_text();
    assert_eq!(Admission::from_text(&text).unwrap(), admission);
}

#[test]
fn a_hello_is_accepted_only_from_the_key_it_admits() {
    let authority = SecretKey::generate();
    let (a_key, a) = admitted(&authority, "node-a");
    let (b_key, b) = admitted(&authority, "node-b");
    let node_a = PeerTrust::new(&a_key, a, authority.public()).unwrap();
    let node_b = PeerTrust::new(&b_key, b.clone(), authority.public()).unwrap();
    assert_eq!(
        node_a
            .check_hello(&node_b.hello(), &b_key.public())
            .unwrap(),
        "node-b"
    );
    // An impostor replays node-b's admission over a link its own key signed.
    let impostor = SecretKey::generate();
    assert!(matches!(
        node_a.check_hello(&b.encode(), &impostor.public()),
        Err(TrustError::AdmissionForAnotherKey { .. })
    ));
    // A process admitted by another authority.
    let other = SecretKey::generate();
    let (c_key, c) = admitted(&other, "node-b");
    assert!(matches!(
        node_a.check_hello(&c.encode(), &c_key.public()),
        Err(TrustError::BadSignature { .. })
    ));
    // A node given an admission that is not its own fails at start.
    assert!(PeerTrust::new(&a_key, b, authority.public()).is_err());
}

#[test]
fn keys_are_created_once_and_readable_by_their_owner_alone() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let path = data.join("node.key");
    let (first, created) = SecretKey::load_or_create(&path).unwrap();
    assert!(created);
    let (again, created) = SecretKey::load_or_create(&path).unwrap();
    assert!(!created);
    assert_eq!(first.public(), again.public());
    let mode = |p: &std::path::Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&path), 0o600);
    assert_eq!(mode(&data), 0o700);
    assert!(
        first.save(&path).is_err(),
        "a key file is never overwritten"
    );
}

#[test]
fn a_node_without_an_admission_is_told_its_key() {
    let dir = tempfile::tempdir().unwrap();
    let authority = SecretKey::generate();
    let err = PeerTrust::load(dir.path(), authority.public()).unwrap_err();
    let key = SecretKey::load(&dir.path().join("node.key"))
        .unwrap()
        .public();
    match &err {
        TrustError::NotAdmitted { key: shown, .. } => assert_eq!(shown, &key.to_string()),
        other => panic!("{other}"),
    }
    assert!(err.to_string().contains("agentstore admit"), "{err}");
    let admission = Admission::issue(&authority, "node-a", key).unwrap();
    std::fs::write(admission_path(dir.path()), admission.to_text()).unwrap();
    let trust = PeerTrust::load(dir.path(), authority.public()).unwrap();
    assert_eq!(trust.name(), "node-a");
}

#[test]
fn admitting_a_node_twice_keeps_its_key_and_replaces_its_admission() {
    let dir = tempfile::tempdir().unwrap();
    let authority = SecretKey::generate();
    let first = agentstore_trust::admit(&authority, "node-a", dir.path(), &[]).unwrap();
    let again = agentstore_trust::admit(&authority, "node-b", dir.path(), &[]).unwrap();
    assert_eq!(first, again);
    let trust = PeerTrust::load(dir.path(), authority.public()).unwrap();
    assert_eq!(trust.name(), "node-b");
    // The authority is named inline or by the file that holds its public key.
    let public = dir.path().join("authority.pub");
    std::fs::write(&public, format!("{}\n", authority.public())).unwrap();
    let by_file = agentstore_trust::authority_from(public.to_str().unwrap()).unwrap();
    let inline = agentstore_trust::authority_from(&authority.public().to_string()).unwrap();
    assert_eq!(by_file, authority.public());
    assert_eq!(inline, authority.public());
    assert!(agentstore_trust::authority_from("/nonexistent/authority.pub").is_err());
}

/// Runs a TLS handshake between two connections in memory.
fn handshake(client: &mut Connection, server: &mut Connection) -> Result<(), rustls::Error> {
    for _ in 0..10 {
        let mut bytes = Vec::new();
        while client.wants_write() {
            client.write_tls(&mut bytes).unwrap();
        }
        if !bytes.is_empty() {
            server.read_tls(&mut bytes.as_slice()).unwrap();
            server.process_new_packets()?;
        }
        let mut bytes = Vec::new();
        while server.wants_write() {
            server.write_tls(&mut bytes).unwrap();
        }
        if !bytes.is_empty() {
            client.read_tls(&mut bytes.as_slice()).unwrap();
            client.process_new_packets()?;
        }
        if !client.is_handshaking() && !server.is_handshaking() {
            return Ok(());
        }
    }
    panic!("the handshake did not finish");
}

#[test]
fn each_side_of_a_peer_link_learns_the_key_the_other_proved() {
    let a = SecretKey::generate();
    let b = SecretKey::generate();
    let a_tls = PeerTls::new(&a).unwrap();
    let b_tls = PeerTls::new(&b).unwrap();
    let mut client: Connection =
        ClientConnection::new(Arc::clone(&a_tls.client), PeerTls::server_name())
            .unwrap()
            .into();
    let mut server: Connection = ServerConnection::new(Arc::clone(&b_tls.server))
        .unwrap()
        .into();
    handshake(&mut client, &mut server).unwrap();
    assert_eq!(peer_key(&client), Some(b.public()));
    assert_eq!(peer_key(&server), Some(a.public()));
}

#[test]
fn a_tls_client_without_a_node_key_is_refused() {
    let b = SecretKey::generate();
    let b_tls = PeerTls::new(&b).unwrap();
    // An ordinary TLS client: web PKI roots, no client key.
    let roots = rustls::RootCertStore::empty();
    let plain = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    let mut client: Connection = ClientConnection::new(Arc::new(plain), PeerTls::server_name())
        .unwrap()
        .into();
    let mut server: Connection = ServerConnection::new(Arc::clone(&b_tls.server))
        .unwrap()
        .into();
    assert!(handshake(&mut client, &mut server).is_err());
}

proptest! {
    /// Parsing a hello never panics, whatever arrives.
    #[test]
    fn any_bytes_decode_or_fail_cleanly(bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
        let _ = Admission::decode(&bytes);
        let _ = Admission::from_text(&String::from_utf8_lossy(&bytes));
    }

    /// Changing any bit of an admission makes it unusable: it fails to decode, or fails to
    /// verify, or no longer names the key that holds it.
    #[test]
    fn a_tampered_admission_is_refused(index in 0usize..200, bit in 0u8..8) {
        let authority = SecretKey::generate();
        let (key, admission) = admitted(&authority, "node-a");
        let trust = PeerTrust::new(&key, admission.clone(), authority.public()).unwrap();
        let mut bytes = admission.encode();
        let index = index % bytes.len();
        bytes[index] ^= 1 << bit;
        let accepted = trust.check_hello(&bytes, &key.public());
        prop_assert!(accepted.is_err(), "byte {} bit {} still accepted", index, bit);
    }
}
