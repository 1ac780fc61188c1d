//! `agentstore authority new`, `admit` and `token`: the keys that decide who is a node and
//! what a client may do.

use std::path::{Path, PathBuf};

use std::time::Duration;

use agentstore_engine::{PhysicalClock, SystemClock};
use agentstore_trust::{Capability, Operation, PublicKey, Right, SecretKey, TrustError};
use serde_json::json;

use crate::{Rights, TokenCommand, exit};

/// `key_file` with `suffix` appended: where the authority's public key (`.pub`) and
/// certificate (`.crt`) are written beside it.
fn beside(key_file: &Path, suffix: &str) -> PathBuf {
    let mut name = key_file.as_os_str().to_owned();
    name.push(suffix);
    PathBuf::from(name)
}

/// Creates a cluster authority: its secret key in `key_file` (mode 0600, never overwritten),
/// its public key in `<key_file>.pub` and its CA certificate in `<key_file>.crt`.
pub(crate) fn new_authority(key_file: &Path, json: bool) -> Result<u8, TrustError> {
    let key = SecretKey::generate();
    key.save(key_file)?;
    let public = beside(key_file, ".pub");
    agentstore_trust::write_private_file(&public, format!("{}\n", key.public()).as_bytes())?;
    let certificate = beside(key_file, ".crt");
    agentstore_trust::write_private_file(
        &certificate,
        agentstore_trust::authority_certificate(&key)?.as_bytes(),
    )?;
    if json {
        println!(
            "{}",
            json!({
                "key_file": key_file.display().to_string(),
                "public_key_file": public.display().to_string(),
                "public_key": key.public().to_string(),
                "certificate_file": certificate.display().to_string(),
            })
        );
    } else {
        println!(
            "authority key written to {} (keep it secret: it admits nodes)",
            key_file.display()
        );
        println!(
            "public key written to {}: {}",
            public.display(),
            key.public()
        );
        println!(
            "name it in every node's configuration: storage.cluster.authority: {}",
            public.display()
        );
        println!(
            "certificate written to {} (clients of an HTTPS client API trust it)",
            certificate.display()
        );
    }
    Ok(exit::OK)
}

/// Admits the node `name` whose data directory is `data_dir`.
pub(crate) fn admit(
    authority_file: &Path,
    name: &str,
    data_dir: &Path,
    hosts: &[String],
    json: bool,
) -> Result<u8, TrustError> {
    let authority = SecretKey::load(authority_file)?;
    let key: PublicKey = agentstore_trust::admit(&authority, name, data_dir, hosts)?;
    let admission = agentstore_trust::admission_path(data_dir);
    if json {
        println!(
            "{}",
            json!({
                "node": name,
                "key": key.to_string(),
                "admission": admission.display().to_string(),
                "authority": authority.public().to_string(),
            })
        );
    } else {
        println!("node {name} admitted: key {key}");
        println!("admission written to {}", admission.display());
        if !hosts.is_empty() {
            println!(
                "client API certificate for {} written to {}",
                hosts.join(", "),
                agentstore_trust::client_cert_path(data_dir).display()
            );
        }
    }
    Ok(exit::OK)
}

/// `30s`, `15m`, `12h`, `30d`.
pub(crate) fn parse_duration(text: &str) -> Result<Duration, String> {
    let (number, unit) = text.split_at(
        text.find(|c: char| !c.is_ascii_digit())
            .unwrap_or(text.len()),
    );
    let number: u64 = number
        .parse()
        .map_err(|_| format!("`{text}`: expected a number and a unit (30s, 15m, 12h, 30d)"))?;
    let seconds = match unit {
        "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        _ => return Err(format!("`{text}`: the unit is s, m, h or d")),
    };
    Ok(Duration::from_secs(number.saturating_mul(seconds)))
}

/// When a token with these rights stops working (ms since the Unix epoch; 0: never).
fn expiry(rights: &Rights) -> u64 {
    rights.ttl.map_or(0, |ttl| {
        SystemClock.now_ms().saturating_add(ttl.as_millis() as u64)
    })
}

fn grants(rights: &Rights) -> Result<Vec<Right>, TrustError> {
    let mut grants = Vec::new();
    for prefix in &rights.read {
        grants.push(Right::new(&[Operation::Read], prefix)?);
    }
    for prefix in &rights.write {
        grants.push(Right::new(&[Operation::Write], prefix)?);
    }
    if rights.admin {
        grants.push(Right::new(&[Operation::Admin], "")?);
    }
    if grants.is_empty() {
        return Err(TrustError::Malformed {
            what: "token",
            reason: "grant something: --read PREFIX, --write PREFIX or --admin".into(),
        });
    }
    Ok(grants)
}

/// `agentstore token issue|attenuate|show`.
pub(crate) fn token(command: &TokenCommand, json: bool) -> Result<u8, TrustError> {
    let token = match command {
        TokenCommand::Issue { authority, rights } => {
            let authority = SecretKey::load(authority)?;
            Capability::issue(&authority, grants(rights)?, expiry(rights))?
        }
        TokenCommand::Attenuate { token, rights } => {
            Capability::from_text(token)?.attenuate(grants(rights)?, expiry(rights))?
        }
        TokenCommand::Sign {
            token,
            key,
            value,
            string,
            ..
        } => {
            // The bytes a node stores for this JSON value: its compact serialization.
            let bytes = value
                .as_deref()
                .map(|v| serde_json::to_vec(&crate::json_arg(v, *string)).expect("JSON"));
            let attestation = Capability::from_text(token)?.sign_write(
                key,
                bytes.as_deref(),
                SystemClock.now_ms(),
            )?;
            if json {
                println!("{}", json!({ "attestation": attestation.to_text() }));
            } else {
                println!("{}", attestation.to_text());
            }
            return Ok(exit::OK);
        }
        TokenCommand::Show {
            token,
            authority_key,
        } => {
            let token = Capability::from_text(token)?;
            let verified = authority_key
                .as_deref()
                .map(|key| agentstore_trust::authority_from(key).and_then(|k| token.verify(&k)));
            if json {
                println!(
                    "{}",
                    json!({
                        "blocks": token.rights(),
                        "author": token.author().to_string(),
                        "expires_ms": token.expires_ms(),
                        "verified": verified.as_ref().map(Result::is_ok),
                    })
                );
            } else {
                for (i, rights) in token.rights().iter().enumerate() {
                    println!("block {i}: {}", rights.join(", "));
                }
                match token.expires_ms() {
                    Some(at) => println!("expires at {at} ms since the Unix epoch"),
                    None => println!("never expires"),
                }
                println!("signs writes as {}", token.author());
                match verified {
                    Some(Ok(())) => println!("signed by the authority: yes"),
                    Some(Err(err)) => println!("signed by the authority: NO ({err})"),
                    None => {}
                }
            }
            return Ok(exit::OK);
        }
    };
    if json {
        println!("{}", json!({ "token": token.to_text() }));
    } else {
        println!("{}", token.to_text());
    }
    Ok(exit::OK)
}
