//! How stored records read back as JSON values.

use std::borrow::Cow;

use agentstore_core::Key;
use agentstore_core::record::{Record, Value};
use serde_json::Value as Json;

use super::StorageError;
use super::sealing::Sealer;

/// A record as the caller sees it.
pub(crate) enum Reading {
    /// Missing or deleted.
    Absent,
    /// One value: a register, a counter's total, a set's members as an array.
    One(Json),
    /// Several concurrent values of a multi-value register.
    Siblings(Vec<Json>),
}

/// A stored value's JSON bytes: opened if the collection is encrypted.
pub(crate) fn plain<'a>(
    sealer: Option<&Sealer>,
    key: &Key,
    stored: &'a [u8],
) -> Result<Cow<'a, [u8]>, StorageError> {
    match sealer {
        None => Ok(Cow::Borrowed(stored)),
        Some(sealer) => sealer
            .open(key.as_bytes(), stored)
            .map(Cow::Owned)
            .ok_or_else(|| StorageError::Unsealable {
                key: key.to_string(),
            }),
    }
}

/// `record` as the caller sees it (`sealer`: the collection's, if it is encrypted).
pub(crate) fn read(
    record: Option<&Record>,
    sealer: Option<&Sealer>,
    key: &Key,
) -> Result<Reading, StorageError> {
    // An expired value reads as absent at once, on every node, whatever engine holds it.
    let now_ms = agentstore_engine::PhysicalClock::now_ms(&agentstore_engine::SystemClock);
    let record = record.filter(|r| !r.expired(now_ms));
    let json = |bytes: &[u8]| -> Result<Json, StorageError> {
        serde_json::from_slice(&plain(sealer, key, bytes)?).map_err(|source| {
            StorageError::Deserialize {
                key: key.to_string(),
                source,
            }
        })
    };
    let Some(record) = record else {
        return Ok(Reading::Absent);
    };
    Ok(match &record.value {
        Value::Register(None) => Reading::Absent,
        Value::Register(Some(bytes)) => Reading::One(json(bytes)?),
        Value::MultiValue(register) => {
            let mut values = register
                .values()
                .map(|v| json(v))
                .collect::<Result<Vec<_>, _>>()?;
            match values.len() {
                0 => Reading::Absent,
                1 => Reading::One(values.remove(0)),
                _ => Reading::Siblings(values),
            }
        }
        Value::GCounter(counter) => Reading::One(Json::from(counter.value())),
        Value::PnCounter(counter) => Reading::One(Json::from(counter.value())),
        Value::GSet(set) => Reading::One(Json::Array(
            set.iter().map(|m| json(m)).collect::<Result<_, _>>()?,
        )),
        Value::OrSet(set) => Reading::One(Json::Array(
            set.iter().map(|m| json(m)).collect::<Result<_, _>>()?,
        )),
        Value::Document(document) => Reading::One(Json::String(document.text.clone())),
    })
}
