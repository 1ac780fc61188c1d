//! TLS to PostgreSQL, with libpq's meaning of `sslmode` in the connection URL:
//!
//! - `disable`: no TLS.
//! - `prefer` (the default, as in libpq): TLS if the server offers it, else plain.
//! - `require`: TLS or no connection. As in libpq, the server's certificate is not checked:
//!   this encrypts but does not authenticate the server.
//! - `verify-full`: TLS, and the server's certificate must chain to the roots in
//!   `sslrootcert` (a PEM file) and name the host. For Supabase: download the project's CA
//!   certificate and use `?sslmode=verify-full&sslrootcert=/path/to/prod-ca-2021.crt`.
//!
//! `verify-ca` (chain without host name) is refused with a pointer to `verify-full`.

use std::path::PathBuf;
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, verify_tls12_signature, verify_tls13_signature};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme};
use tokio_postgres::config::SslMode;
use tokio_postgres_rustls::MakeRustlsConnect;

use crate::error::EngineError;

/// What the URL asked for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Tls {
    Disable,
    Prefer,
    Require,
    VerifyFull { root: PathBuf },
}

fn invalid(detail: String) -> EngineError {
    EngineError::InvalidSettings { detail }
}

fn percent_decode(text: &str) -> String {
    String::from_utf8_lossy(&agentstore_core::key::percent_decode(text)).into_owned()
}

/// Takes `sslmode` and `sslrootcert` out of the URL (the driver does not know `verify-full`
/// or `sslrootcert`); returns the rest of the URL and the TLS settings.
pub(crate) fn split(url: &str) -> Result<(String, Tls), EngineError> {
    let (base, query) = url.split_once('?').unwrap_or((url, ""));
    let mut kept = Vec::new();
    let (mut mode, mut root) = (None, None);
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        match pair.split_once('=') {
            Some(("sslmode", value)) => mode = Some(percent_decode(value)),
            Some(("sslrootcert", value)) => root = Some(PathBuf::from(percent_decode(value))),
            _ => kept.push(pair),
        }
    }
    let tls = match (mode.as_deref(), root) {
        (None | Some("prefer"), _) => Tls::Prefer,
        (Some("disable"), _) => Tls::Disable,
        (Some("require"), _) => Tls::Require,
        (Some("verify-full"), Some(root)) => Tls::VerifyFull { root },
        (Some("verify-full"), None) => {
            return Err(invalid(
                "sslmode=verify-full needs sslrootcert=<PEM file of the server's CA>".into(),
            ));
        }
        (Some("verify-ca"), _) => {
            return Err(invalid(
                "sslmode=verify-ca is not supported; use sslmode=verify-full with sslrootcert"
                    .into(),
            ));
        }
        (Some(other), _) => {
            return Err(invalid(format!(
                "unknown sslmode `{other}` (expected disable, prefer, require or verify-full)"
            )));
        }
    };
    let rest = if kept.is_empty() {
        base.to_owned()
    } else {
        format!("{base}?{}", kept.join("&"))
    };
    Ok((rest, tls))
}

impl Tls {
    /// The driver's mode for these settings.
    pub(crate) fn ssl_mode(&self) -> SslMode {
        match self {
            Tls::Disable => SslMode::Disable,
            Tls::Prefer => SslMode::Prefer,
            Tls::Require | Tls::VerifyFull { .. } => SslMode::Require,
        }
    }

    /// The TLS connector for these settings (unused when TLS is disabled).
    pub(crate) fn connector(&self) -> Result<MakeRustlsConnect, EngineError> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = ClientConfig::builder_with_provider(Arc::clone(&provider))
            .with_safe_default_protocol_versions()
            .map_err(|e| invalid(format!("TLS: {e}")))?;
        let config = match self {
            Tls::VerifyFull { root } => {
                let mut roots = RootCertStore::empty();
                let certs = CertificateDer::pem_file_iter(root).map_err(|e| {
                    invalid(format!("cannot read sslrootcert {}: {e}", root.display()))
                })?;
                for cert in certs {
                    let cert = cert.map_err(|e| {
                        invalid(format!("bad certificate in {}: {e}", root.display()))
                    })?;
                    roots.add(cert).map_err(|e| {
                        invalid(format!("unusable certificate in {}: {e}", root.display()))
                    })?;
                }
                builder.with_root_certificates(roots).with_no_client_auth()
            }
            _ => builder
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(EncryptOnly(provider)))
                .with_no_client_auth(),
        };
        Ok(MakeRustlsConnect::new(config))
    }
}

/// libpq's `require`: any certificate is accepted (no authentication of the server), but the
/// handshake's signatures are still checked, so the session is encrypted with the key the
/// server presented.
#[derive(Debug)]
struct EncryptOnly(Arc<CryptoProvider>);

impl ServerCertVerifier for EncryptOnly {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ssl_settings_are_taken_out_of_the_url() {
        let (rest, tls) =
            split("postgresql://u@h:5432/db?sslmode=require&application_name=x").unwrap();
        assert_eq!(
            (rest.as_str(), tls),
            ("postgresql://u@h:5432/db?application_name=x", Tls::Require)
        );
        let (rest, tls) =
            split("postgresql://u@h/db?sslmode=verify-full&sslrootcert=%2Ftmp%2Fca.pem").unwrap();
        assert_eq!(
            (rest.as_str(), tls),
            (
                "postgresql://u@h/db",
                Tls::VerifyFull {
                    root: "/tmp/ca.pem".into()
                }
            )
        );
        assert_eq!(split("postgresql://u@h/db").unwrap().1, Tls::Prefer);
        assert!(split("postgresql://u@h/db?sslmode=verify-ca").is_err());
        assert!(split("postgresql://u@h/db?sslmode=verify-full").is_err());
        assert!(split("postgresql://u@h/db?sslmode=sometimes").is_err());
    }
}
