//! How stored records read back as JSON values.

use agentstore_core::record::{Record, Value};
use serde_json::Value as Json;

/// A record as the caller sees it.
pub(crate) enum Reading {
    /// Missing or deleted.
    Absent,
    /// One value: a register, a counter's total, a set's members as an array.
    One(Json),
    /// Several concurrent values of a multi-value register.
    Siblings(Vec<Json>),
}

fn json(bytes: &[u8]) -> Result<Json, serde_json::Error> {
    serde_json::from_slice(bytes)
}

pub(crate) fn read(record: Option<&Record>) -> Result<Reading, serde_json::Error> {
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
    })
}
