//! Text documents edited by operational transformation (`conflict: ot_text`): a writer reads
//! the document's revision, makes an edit against it, and the store transforms the edit past
//! whatever other writers applied since (see `agentstore_core::ot`). The collection must be
//! strong, so one writer (the key's Raft group, or one ACID engine) orders every edit.

use agentstore_core::config::ConflictStrategy;
use agentstore_core::ot::{Component, Document, TextOp};
use agentstore_core::record::{Mutation, Record, Value};
use agentstore_engine::Engine as _;
use serde_json::Value as Json;

use super::{Call, Result, Storage, StorageError, WriteReceipt, traced};
use agentstore_engine::EngineError;

/// A document as read: its text and how many edits made it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DocumentState {
    /// Edits applied so far (0: never edited). An edit names the revision it was made on.
    pub revision: u64,
    /// The text.
    pub text: String,
}

/// An edit the store applied.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Edited {
    /// The document's revision after the edit.
    pub revision: u64,
    /// The edit as applied, transformed past the edits made since its base revision: what
    /// turns the document at `revision - 1` into the document at `revision`.
    pub applied: TextOp,
    /// The write's receipt (version, asked and delivered level).
    pub receipt: WriteReceipt,
}

/// The edits that bring a reader from one revision of a document to its current one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DocumentEdits {
    /// The document's current revision.
    pub revision: u64,
    /// The edits applied since the revision asked for, in order, as applied.
    pub edits: Vec<TextOp>,
}

/// The document a record holds (the empty document at revision 0 when there is none).
fn document_of(record: Option<Record>) -> Document {
    match record.map(|r| r.value) {
        Some(Value::Document(document)) => document,
        _ => Document::default(),
    }
}

impl Storage {
    /// The call of `operation` on `key`, refused unless its collection holds documents.
    fn document_call<'s>(&'s self, key: &str, operation: &'static str) -> Result<Call<'s>> {
        let call = self.call(key, None)?;
        if call.plan.conflict != ConflictStrategy::Document {
            let hint = format!(
                "set `storage.collections.{}.conflict: ot_text` (with consistency: strong) to \
                 edit documents",
                call.key.collection()
            );
            return Err(Self::wrong(&call, operation, hint));
        }
        Ok(call)
    }

    /// Applies `op`, an edit of the document as it was at `revision`, after transforming it
    /// past the edits applied since (an `ot_text` collection). Refused, and nothing written,
    /// when `revision` is ahead of the document or older than the edits it keeps
    /// (`agentstore_core::ot::RECENT_EDITS`; read it again and redo the edit), or when `op`
    /// does not span the document at `revision`.
    pub async fn edit(&self, key: &str, revision: u64, op: &TextOp) -> Result<Edited> {
        traced("edit", key, async move {
            let call = self.document_call(key, "edit")?;
            let mutation = Mutation::Edit {
                base: revision,
                op: op.clone(),
            };
            let record = call.engine.apply(call.key.clone(), mutation).await?;
            let receipt = Self::receipt(&call, &record);
            let document = document_of(Some(record));
            Ok(Edited {
                revision: document.revision,
                applied: document.recent.last().cloned().unwrap_or_default(),
                receipt,
            })
        })
        .await
    }

    /// A document's text and revision (revision 0 and no text when it was never edited).
    pub async fn document(&self, key: &str) -> Result<DocumentState> {
        traced("document", key, async move {
            let call = self.document_call(key, "document")?;
            let document = document_of(self.read_record(&call).await?);
            Ok(DocumentState {
                revision: document.revision,
                text: document.text,
            })
        })
        .await
    }

    /// The edits applied to a document since revision `since`, as applied: a reader holding
    /// the text at `since` applies them in order to hold the current text. Refused
    /// (`EditRefused`) when `since` is ahead of the document or older than the edits it keeps;
    /// read the whole document then.
    pub async fn edits_since(&self, key: &str, since: u64) -> Result<DocumentEdits> {
        traced("edits_since", key, async move {
            let call = self.document_call(key, "edits_since")?;
            let document = document_of(self.read_record(&call).await?);
            let edits = document.edits_since(since).map_err(|source| {
                StorageError::Engine(EngineError::EditRefused {
                    key: call.key.clone(),
                    source,
                })
            })?;
            Ok(DocumentEdits {
                revision: document.revision,
                edits: edits.to_vec(),
            })
        })
        .await
    }

    /// Empties a document by an edit at its current revision (its revision goes on).
    pub(super) async fn clear_document(&self, call: &Call<'_>) -> Result<WriteReceipt> {
        let current = document_of(self.read_record(call).await?);
        let op = TextOp::new().delete(current.text.chars().count() as u64);
        let mutation = Mutation::Edit {
            base: current.revision,
            op,
        };
        let record = call.engine.apply(call.key.clone(), mutation).await?;
        Ok(Self::receipt(call, &record))
    }
}

/// An edit in its JSON form, as the HTTP API and the clients write it: an array whose
/// numbers `n > 0` retain `n` characters, `-n` delete `n`, and strings insert themselves.
pub fn op_from_json(json: &Json) -> std::result::Result<TextOp, String> {
    let Json::Array(items) = json else {
        return Err("an edit is an array: [retain n, \"insert\", -delete n, ...]".into());
    };
    let mut op = TextOp::new();
    for item in items {
        op = match item {
            Json::String(text) => op.insert(text),
            Json::Number(n) => match n.as_i64() {
                Some(n) if n > 0 => op.retain(n as u64),
                Some(n) if n < 0 => op.delete(n.unsigned_abs()),
                _ => return Err(format!("{n} is neither a retain (n > 0) nor a delete (-n)")),
            },
            other => return Err(format!("{other} is not a retain, an insert or a delete")),
        };
    }
    Ok(op)
}

/// The JSON form of an edit (see [`op_from_json`]).
pub fn op_to_json(op: &TextOp) -> Json {
    Json::Array(
        op.components()
            .iter()
            .map(|component| match component {
                Component::Retain(n) => Json::from(*n),
                Component::Insert(text) => Json::from(text.as_str()),
                Component::Delete(n) => Json::from(-(*n as i64)),
            })
            .collect(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_json_form_round_trips_and_refuses_what_is_not_an_edit() {
        let op = op_from_json(&serde_json::json!([2, "xy", -1, 3])).unwrap();
        assert_eq!(op, TextOp::new().retain(2).insert("xy").delete(1).retain(3));
        assert_eq!(op_to_json(&op), serde_json::json!([2, "xy", -1, 3]));
        for bad in [
            serde_json::json!({"retain": 1}),
            serde_json::json!([0]),
            serde_json::json!([1.5]),
            serde_json::json!([true]),
        ] {
            assert!(op_from_json(&bad).is_err(), "{bad}");
        }
    }
}
