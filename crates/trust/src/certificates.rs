//! TLS for the client API: the authority doubles as the certificate authority that clients
//! trust, and each node serves a certificate for its own key and the names clients reach it
//! by, signed by the authority (X.509 with ed25519 keys, through rcgen on ring).
//!
//! Unlike peer links (raw keys, admissions), clients are ordinary TLS clients (the CLI, curl,
//! any HTTP library): they need a certificate chain to a root they trust, `authority.crt`.

use std::sync::Arc;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, KeyUsagePurpose};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivatePkcs8KeyDer};
use rustls::{ClientConfig, RootCertStore, ServerConfig};

use crate::{SecretKey, TrustError};

fn tls_error(err: impl std::fmt::Display) -> TrustError {
    TrustError::Tls(err.to_string())
}

fn key_pair(key: &SecretKey) -> Result<KeyPair, TrustError> {
    KeyPair::try_from(&PrivatePkcs8KeyDer::from(key.pkcs8().to_vec())).map_err(tls_error)
}

fn authority_params() -> Result<CertificateParams, TrustError> {
    let mut params = CertificateParams::new(Vec::<String>::new()).map_err(tls_error)?;
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params
        .distinguished_name
        .push(DnType::CommonName, "agentstore cluster authority");
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    Ok(params)
}

/// PEM text of one certificate.
fn pem(der: &[u8]) -> String {
    let body = STANDARD.encode(der);
    let mut out = String::from("-----BEGIN CERTIFICATE-----\n");
    for line in body.as_bytes().chunks(64) {
        out.push_str(std::str::from_utf8(line).expect("base64 is ASCII"));
        out.push('\n');
    }
    out.push_str("-----END CERTIFICATE-----\n");
    out
}

/// The authority's self-signed CA certificate (PEM): what clients trust.
pub fn authority_certificate(authority: &SecretKey) -> Result<String, TrustError> {
    let certificate = authority_params()?
        .self_signed(&key_pair(authority)?)
        .map_err(tls_error)?;
    Ok(pem(certificate.der()))
}

/// A certificate for a node's client API (PEM: the node's, then the authority's): the node's
/// key, valid for `hosts` (DNS names or IP addresses), signed by the authority.
pub fn client_api_certificate(
    authority: &SecretKey,
    node: &SecretKey,
    hosts: &[String],
) -> Result<String, TrustError> {
    if hosts.is_empty() {
        return Err(TrustError::malformed(
            "certificate",
            "name at least one host clients reach the node by",
        ));
    }
    let issuer = Issuer::new(authority_params()?, key_pair(authority)?);
    let mut params = CertificateParams::new(hosts.to_vec()).map_err(tls_error)?;
    params
        .distinguished_name
        .push(DnType::CommonName, "agentstore node");
    let leaf = params
        .signed_by(&key_pair(node)?, &issuer)
        .map_err(tls_error)?;
    Ok(pem(leaf.der()) + &authority_certificate(authority)?)
}

fn certificates(pem: &str) -> Result<Vec<CertificateDer<'static>>, TrustError> {
    let chain = CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TrustError::malformed("certificate", e.to_string()))?;
    if chain.is_empty() {
        return Err(TrustError::malformed(
            "certificate",
            "no certificate in the PEM text",
        ));
    }
    Ok(chain)
}

/// The client API's TLS settings: `chain` (PEM, from [`client_api_certificate`]) for the
/// node's `key`.
pub fn client_api_server(key: &SecretKey, chain: &str) -> Result<Arc<ServerConfig>, TrustError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(tls_error)?
        .with_no_client_auth()
        .with_single_cert(
            certificates(chain)?,
            PrivatePkcs8KeyDer::from(key.pkcs8().to_vec()).into(),
        )
        .map_err(tls_error)?;
    Ok(Arc::new(config))
}

/// TLS settings for a client of nodes whose certificates chain to `roots` (PEM: the
/// authority's certificate).
pub fn client_api_client(roots: &str) -> Result<Arc<ClientConfig>, TrustError> {
    let mut store = RootCertStore::empty();
    for root in certificates(roots)? {
        store.add(root).map_err(tls_error)?;
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(tls_error)?
        .with_root_certificates(store)
        .with_no_client_auth();
    Ok(Arc::new(config))
}
