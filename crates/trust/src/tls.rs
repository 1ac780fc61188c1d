//! Mutual TLS 1.3 between nodes with raw ed25519 public keys (RFC 7250).
//!
//! Each side's "certificate" is its node key's SubjectPublicKeyInfo, and the handshake's
//! signature proves the peer holds that key. The verifiers here accept any ed25519 key: who
//! the key belongs to, and whether it may join, is decided right after the handshake by the
//! admission the peer sends over the link ([`crate::PeerTrust::check_hello`]).

use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::{AlwaysResolvesClientRawPublicKeys, ClientConfig};
use rustls::crypto::{WebPkiSupportedAlgorithms, verify_tls13_signature_with_raw_key};
use rustls::pki_types::{
    CertificateDer, PrivatePkcs8KeyDer, ServerName, SubjectPublicKeyInfoDer, UnixTime,
};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::{AlwaysResolvesServerRawPublicKeys, ServerConfig};
use rustls::sign::CertifiedKey;
use rustls::{CommonState, DigitallySignedStruct, DistinguishedName, SignatureScheme};

use crate::{PublicKey, SecretKey, TrustError};

/// The DER prefix of an ed25519 SubjectPublicKeyInfo (RFC 8410); the 32 key bytes follow.
const ED25519_SPKI_PREFIX: [u8; 12] = [
    0x30, 0x2a, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x03, 0x21, 0x00,
];

/// The TLS settings of one node's peer links: as the dialling side and as the accepting side.
#[derive(Debug)]
pub struct PeerTls {
    /// For links this node dials.
    pub client: Arc<ClientConfig>,
    /// For links this node accepts.
    pub server: Arc<ServerConfig>,
}

impl PeerTls {
    /// TLS 1.3 settings presenting `key` and requiring the peer's.
    pub fn new(key: &SecretKey) -> Result<Self, TrustError> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let signer = provider
            .key_provider
            .load_private_key(PrivatePkcs8KeyDer::from(key.pkcs8().to_vec()).into())
            .map_err(|e| TrustError::Tls(e.to_string()))?;
        let spki = CertificateDer::from(spki(&key.public()));
        let certified = Arc::new(CertifiedKey::new(vec![spki], signer));
        let verifier = Arc::new(AnyNodeKey {
            algorithms: provider.signature_verification_algorithms,
        });
        let client = ClientConfig::builder_with_provider(Arc::clone(&provider))
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| TrustError::Tls(e.to_string()))?
            .dangerous()
            .with_custom_certificate_verifier(verifier.clone())
            .with_client_cert_resolver(Arc::new(AlwaysResolvesClientRawPublicKeys::new(
                Arc::clone(&certified),
            )));
        let mut server = ServerConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| TrustError::Tls(e.to_string()))?
            .with_client_cert_verifier(verifier)
            .with_cert_resolver(Arc::new(AlwaysResolvesServerRawPublicKeys::new(certified)));
        // Peer links are long-lived and never resumed: no tickets to send after the handshake.
        server.send_tls13_tickets = 0;
        Ok(Self {
            client: Arc::new(client),
            server: Arc::new(server),
        })
    }

    /// The name a dialling side gives TLS (raw public keys name no host; the peer is known by
    /// its key and admission).
    pub fn server_name() -> ServerName<'static> {
        ServerName::try_from("agentstore-node").expect("a valid DNS name")
    }
}

/// The key the peer proved it holds in a finished handshake.
pub fn peer_key(tls: &CommonState) -> Option<PublicKey> {
    let presented = tls.peer_certificates()?.first()?;
    ed25519_key(presented.as_ref())
}

fn spki(key: &PublicKey) -> Vec<u8> {
    let mut der = ED25519_SPKI_PREFIX.to_vec();
    der.extend_from_slice(key.as_bytes());
    der
}

fn ed25519_key(spki: &[u8]) -> Option<PublicKey> {
    let key = spki.strip_prefix(&ED25519_SPKI_PREFIX)?;
    Some(PublicKey::from_bytes(key.try_into().ok()?))
}

/// Accepts any raw ed25519 key whose holder signs the handshake.
#[derive(Debug)]
struct AnyNodeKey {
    algorithms: WebPkiSupportedAlgorithms,
}

impl AnyNodeKey {
    fn check(
        presented: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
    ) -> Result<(), rustls::Error> {
        if !intermediates.is_empty() || ed25519_key(presented.as_ref()).is_none() {
            return Err(rustls::Error::InvalidCertificate(
                rustls::CertificateError::BadEncoding,
            ));
        }
        Ok(())
    }

    fn signature(
        &self,
        message: &[u8],
        presented: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        if dss.scheme != SignatureScheme::ED25519 {
            return Err(rustls::Error::PeerIncompatible(
                rustls::PeerIncompatible::NoSignatureSchemesInCommon,
            ));
        }
        let spki = SubjectPublicKeyInfoDer::from(presented.as_ref());
        verify_tls13_signature_with_raw_key(message, &spki, dss, &self.algorithms)
    }
}

impl ServerCertVerifier for AnyNodeKey {
    fn verify_server_cert(
        &self,
        presented: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Self::check(presented, intermediates).map(|()| ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _presented: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Err(rustls::Error::General(
            "peer links speak TLS 1.3 only".into(),
        ))
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        presented: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.signature(message, presented, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        vec![SignatureScheme::ED25519]
    }

    fn requires_raw_public_keys(&self) -> bool {
        true
    }
}

impl ClientCertVerifier for AnyNodeKey {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        presented: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        Self::check(presented, intermediates).map(|()| ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _presented: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Err(rustls::Error::General(
            "peer links speak TLS 1.3 only".into(),
        ))
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        presented: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.signature(message, presented, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        vec![SignatureScheme::ED25519]
    }

    fn requires_raw_public_keys(&self) -> bool {
        true
    }
}
