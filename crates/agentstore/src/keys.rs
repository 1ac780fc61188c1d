//! `agentstore authority new` and `agentstore admit`: the keys that decide who is a node.

use std::path::{Path, PathBuf};

use agentstore_trust::{PublicKey, SecretKey, TrustError};
use serde_json::json;

use crate::exit;

/// Where the public half of the authority key in `key_file` is written.
pub(crate) fn public_path(key_file: &Path) -> PathBuf {
    let mut name = key_file.as_os_str().to_owned();
    name.push(".pub");
    PathBuf::from(name)
}

/// Creates a cluster authority: its secret key in `key_file` (mode 0600, never overwritten)
/// and its public key beside it in `<key_file>.pub`.
pub(crate) fn new_authority(key_file: &Path, json: bool) -> Result<u8, TrustError> {
    let key = SecretKey::generate();
    key.save(key_file)?;
    let public = public_path(key_file);
    agentstore_trust::write_private_file(&public, format!("{}\n", key.public()).as_bytes())?;
    if json {
        println!(
            "{}",
            json!({
                "key_file": key_file.display().to_string(),
                "public_key_file": public.display().to_string(),
                "public_key": key.public().to_string(),
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
    }
    Ok(exit::OK)
}

/// Admits the node `name` whose data directory is `data_dir`.
pub(crate) fn admit(
    authority_file: &Path,
    name: &str,
    data_dir: &Path,
    json: bool,
) -> Result<u8, TrustError> {
    let authority = SecretKey::load(authority_file)?;
    let key: PublicKey = agentstore_trust::admit(&authority, name, data_dir)?;
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
    }
    Ok(exit::OK)
}
