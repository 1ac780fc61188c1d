//! Encrypted collections: values are sealed before they reach any engine.

use agentstore_core::config::{CollectionConfig, ConflictStrategy};
use p2p_ai_agents::storage::{Config, Storage, StorageError};

fn config(dir: &std::path::Path) -> Config {
    let mut config = Config {
        data_dir: Some(dir.display().to_string()),
        ..Config::default()
    };
    config.collections.insert(
        "keys".into(),
        CollectionConfig {
            encrypted: true,
            ..Default::default()
        },
    );
    config.collections.insert(
        "drafts".into(),
        CollectionConfig {
            encrypted: true,
            conflict: Some(ConflictStrategy::MultiValue),
            ..Default::default()
        },
    );
    config
}

/// Every byte of the store's files.
fn files(dir: &std::path::Path) -> Vec<u8> {
    let mut all = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_file() {
            all.extend(std::fs::read(path).unwrap());
        }
    }
    all
}

fn contains(haystack: &[u8], needle: &str) -> bool {
    haystack
        .windows(needle.len())
        .any(|w| w == needle.as_bytes())
}

#[tokio::test]
async fn an_encrypted_collection_reads_back_and_its_files_hold_no_plaintext() {
    let dir = tempfile::tempdir().unwrap();
    let key = [42u8; 32];
    {
        let storage = Storage::with_encryption_key(config(dir.path()), &key)
            .await
            .unwrap();
        storage
            .set("keys:agent-1", "PRIVATE-KEY-MATERIAL")
            .await
            .unwrap();
        storage
            .set("notes:agent-1", "PUBLIC-NOTE-TEXT")
            .await
            .unwrap();
        storage.set("drafts:d", "DRAFT-SIBLING-TEXT").await.unwrap();
        assert_eq!(
            storage
                .get::<String>("keys:agent-1")
                .await
                .unwrap()
                .as_deref(),
            Some("PRIVATE-KEY-MATERIAL")
        );
        let siblings = storage.get_siblings::<String>("drafts:d").await.unwrap();
        assert_eq!(siblings.values, ["DRAFT-SIBLING-TEXT"]);
        let scanned = storage.scan("keys", None, 10).await.unwrap();
        assert_eq!(scanned[0].value, "PRIVATE-KEY-MATERIAL");
        // Compare-and-set and transactions seal too.
        let current = storage
            .get_versioned::<String>("keys:agent-1")
            .await
            .unwrap()
            .unwrap();
        storage
            .compare_and_set(
                "keys:agent-1",
                "ROTATED-KEY-MATERIAL",
                Some(&current.version),
            )
            .await
            .unwrap();
        let mut transaction = storage.transaction();
        transaction.set("keys:agent-2", "SECOND-KEY-MATERIAL");
        transaction.commit().await.unwrap();
    }
    let bytes = files(dir.path());
    assert!(
        contains(&bytes, "PUBLIC-NOTE-TEXT"),
        "the control value is stored as written"
    );
    for secret in [
        "PRIVATE-KEY-MATERIAL",
        "ROTATED-KEY-MATERIAL",
        "SECOND-KEY-MATERIAL",
        "DRAFT-SIBLING-TEXT",
    ] {
        assert!(
            !contains(&bytes, secret),
            "{secret} is on disk in the clear"
        );
    }
    // Reopened with the same key: readable. With another: a typed error, never garbage.
    let storage = Storage::with_encryption_key(config(dir.path()), &key)
        .await
        .unwrap();
    assert_eq!(
        storage
            .get::<String>("keys:agent-2")
            .await
            .unwrap()
            .as_deref(),
        Some("SECOND-KEY-MATERIAL")
    );
    drop(storage);
    let wrong = Storage::with_encryption_key(config(dir.path()), &[7u8; 32])
        .await
        .unwrap();
    assert!(matches!(
        wrong.get::<String>("keys:agent-1").await,
        Err(StorageError::Unsealable { .. })
    ));
}

#[tokio::test]
async fn an_encrypted_collection_without_a_key_does_not_open() {
    let dir = tempfile::tempdir().unwrap();
    // The test process has neither AGENTSTORE_ENCRYPTION_KEY nor _FILE.
    if std::env::var_os(p2p_ai_agents::storage::ENCRYPTION_KEY_ENV).is_some()
        || std::env::var_os(p2p_ai_agents::storage::ENCRYPTION_KEY_FILE_ENV).is_some()
    {
        return;
    }
    let err = Storage::new(config(dir.path())).await.unwrap_err();
    let message = err.to_string();
    assert!(message.contains("drafts, keys"), "{message}");
    assert!(message.contains("AGENTSTORE_ENCRYPTION_KEY"), "{message}");
}

#[test]
fn only_values_that_merge_without_being_read_can_be_encrypted() {
    let err = Config::from_yaml(
        "storage:\n  collections:\n    reputation:\n      conflict: pn_counter\n      encrypted: true\n",
        "bad.yaml",
    )
    .unwrap_err();
    assert_eq!(err.field, "storage.collections.reputation.encrypted");
    assert_eq!(err.line, 5, "the line of `encrypted: true`");
}
