//! Operational transformation of plain text: the value of `ot_text` collections.
//!
//! An edit is a [`TextOp`]: a walk over the whole document that retains, inserts and deletes
//! characters (Unicode scalar values, not bytes or UTF-16 units). A writer edits against the
//! revision it read; the store, which orders every edit of a key (the key's Raft group, or
//! one ACID engine), transforms the edit past the edits applied since that revision and
//! applies the result ([`Document::edit`]). Concurrent editors therefore never overwrite each
//! other: each edit keeps its intent (an insert lands between the same characters, a delete
//! removes the same characters, once).
//!
//! The algebra is the classic one for this representation (as in ot.js): [`TextOp::apply`],
//! [`TextOp::compose`] and [`transform`], which satisfies TP1 —
//! `apply(apply(d, a), b') == apply(apply(d, b), a')` for `(a', b') = transform(a, b)` — the
//! property that makes every order of applying concurrent edits converge. The property tests
//! in `tests/ot.rs` check it and compose's law on random documents and edits.

use std::fmt;

/// One step of a [`TextOp`]'s walk over a document.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Component {
    /// Keep the next `n` characters.
    Retain(u64),
    /// Insert this text here.
    Insert(String),
    /// Remove the next `n` characters.
    Delete(u64),
}

/// An edit of a whole document: components in normal form (none empty, no two neighbours of
/// one sort, an insert before a delete at the same place), so equal edits are equal values
/// and encode to equal bytes.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct TextOp {
    components: Vec<Component>,
    base_len: u64,
    target_len: u64,
}

/// An edit that does not fit the document (or the edit) it was given.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("the edit spans {spans} characters; the document has {has}")]
pub struct Misfit {
    /// Characters the edit walks over.
    pub spans: u64,
    /// Characters there are.
    pub has: u64,
}

fn chars(text: &str) -> u64 {
    text.chars().count() as u64
}

impl TextOp {
    /// The empty edit of the empty document; grow it with [`retain`](Self::retain),
    /// [`insert`](Self::insert) and [`delete`](Self::delete).
    pub fn new() -> Self {
        Self::default()
    }

    /// Keeps the next `n` characters.
    pub fn retain(mut self, n: u64) -> Self {
        if n == 0 {
            return self;
        }
        self.base_len += n;
        self.target_len += n;
        match self.components.last_mut() {
            Some(Component::Retain(last)) => *last += n,
            _ => self.components.push(Component::Retain(n)),
        }
        self
    }

    /// Inserts `text` here.
    pub fn insert(mut self, text: &str) -> Self {
        if text.is_empty() {
            return self;
        }
        self.target_len += chars(text);
        let len = self.components.len();
        match self.components.as_mut_slice() {
            [.., Component::Insert(last)] => last.push_str(text),
            // An insert and a delete at one place are the same edit in either order: the
            // insert goes first, so there is one normal form.
            [.., Component::Insert(before), Component::Delete(_)] => before.push_str(text),
            [.., Component::Delete(_)] => self
                .components
                .insert(len - 1, Component::Insert(text.to_owned())),
            _ => self.components.push(Component::Insert(text.to_owned())),
        }
        self
    }

    /// Removes the next `n` characters.
    pub fn delete(mut self, n: u64) -> Self {
        if n == 0 {
            return self;
        }
        self.base_len += n;
        match self.components.last_mut() {
            Some(Component::Delete(last)) => *last += n,
            _ => self.components.push(Component::Delete(n)),
        }
        self
    }

    /// Appends `component` (normalizing as the builders do).
    pub fn then(self, component: &Component) -> Self {
        match component {
            Component::Retain(n) => self.retain(*n),
            Component::Insert(text) => self.insert(text),
            Component::Delete(n) => self.delete(*n),
        }
    }

    /// The edit made of `components`, normalized.
    pub fn from_components<'a>(components: impl IntoIterator<Item = &'a Component>) -> Self {
        components.into_iter().fold(Self::new(), Self::then)
    }

    /// The components, in normal form.
    pub fn components(&self) -> &[Component] {
        &self.components
    }

    /// Characters of the document this edit applies to.
    pub fn base_len(&self) -> u64 {
        self.base_len
    }

    /// Characters of the document it produces.
    pub fn target_len(&self) -> u64 {
        self.target_len
    }

    /// Whether the edit changes nothing.
    pub fn is_noop(&self) -> bool {
        self.components
            .iter()
            .all(|c| matches!(c, Component::Retain(_)))
    }

    /// The document this edit makes of `text`.
    pub fn apply(&self, text: &str) -> Result<String, Misfit> {
        let has = chars(text);
        if has != self.base_len {
            return Err(Misfit {
                spans: self.base_len,
                has,
            });
        }
        let mut out = String::with_capacity(text.len());
        let mut rest = text.chars();
        for component in &self.components {
            match component {
                Component::Retain(n) => out.extend(rest.by_ref().take(*n as usize)),
                Component::Insert(inserted) => out.push_str(inserted),
                Component::Delete(n) => {
                    rest.by_ref().take(*n as usize).for_each(drop);
                }
            }
        }
        Ok(out)
    }

    /// One edit with the effect of this one followed by `next`.
    pub fn compose(&self, next: &TextOp) -> Result<TextOp, Misfit> {
        if self.target_len != next.base_len {
            return Err(Misfit {
                spans: next.base_len,
                has: self.target_len,
            });
        }
        let mut out = TextOp::new();
        let mut a = Walk::new(&self.components);
        let mut b = Walk::new(&next.components);
        loop {
            match (a.peek(), b.peek()) {
                (None, None) => return Ok(out),
                // What the first deletes, the second never sees.
                (Some(Component::Delete(n)), _) => {
                    out = out.delete(n);
                    a.take(n);
                }
                // What the second inserts, the first never had.
                (_, Some(Component::Insert(text))) => {
                    out = out.insert(&text);
                    b.take(chars(&text));
                }
                (Some(first), Some(second)) => {
                    let n = first.len().min(second.len());
                    match (&first, &second) {
                        (Component::Retain(_), Component::Retain(_)) => out = out.retain(n),
                        (Component::Retain(_), Component::Delete(_)) => out = out.delete(n),
                        (Component::Insert(text), Component::Retain(_)) => {
                            out = out.insert(&prefix(text, n))
                        }
                        // Inserted, then deleted: nothing.
                        (Component::Insert(_), Component::Delete(_)) => {}
                        _ => unreachable!(
                            "deletes of the first and inserts of the second came first"
                        ),
                    }
                    a.take(n);
                    b.take(n);
                }
                // The lengths matched, so both walks end together.
                _ => unreachable!("one edit ended before the other"),
            }
        }
    }
}

impl Component {
    /// Characters this component walks over (an insert: the characters it adds).
    fn len(&self) -> u64 {
        match self {
            Component::Retain(n) | Component::Delete(n) => *n,
            Component::Insert(text) => chars(text),
        }
    }
}

/// The first `n` characters of `text`.
fn prefix(text: &str, n: u64) -> String {
    text.chars().take(n as usize).collect()
}

/// A cursor over components that can take part of one.
struct Walk<'a> {
    components: &'a [Component],
    at: usize,
    /// Characters of the current component already taken.
    taken: u64,
}

impl<'a> Walk<'a> {
    fn new(components: &'a [Component]) -> Self {
        Self {
            components,
            at: 0,
            taken: 0,
        }
    }

    /// What is left of the current component.
    fn peek(&self) -> Option<Component> {
        let component = self.components.get(self.at)?;
        Some(match component {
            Component::Retain(n) => Component::Retain(n - self.taken),
            Component::Delete(n) => Component::Delete(n - self.taken),
            Component::Insert(text) => {
                Component::Insert(text.chars().skip(self.taken as usize).collect())
            }
        })
    }

    fn take(&mut self, n: u64) {
        self.taken += n;
        if self
            .components
            .get(self.at)
            .is_some_and(|c| self.taken >= c.len())
        {
            self.at += 1;
            self.taken = 0;
        }
    }
}

/// Transforms two edits of the same document against each other: `(a', b')` such that `a`
/// then `b'` and `b` then `a'` make the same document (TP1). Where both insert at the same
/// place, `a`'s text comes first.
pub fn transform(a: &TextOp, b: &TextOp) -> Result<(TextOp, TextOp), Misfit> {
    if a.base_len != b.base_len {
        return Err(Misfit {
            spans: b.base_len,
            has: a.base_len,
        });
    }
    let (mut a2, mut b2) = (TextOp::new(), TextOp::new());
    let mut x = Walk::new(&a.components);
    let mut y = Walk::new(&b.components);
    loop {
        match (x.peek(), y.peek()) {
            (None, None) => return Ok((a2, b2)),
            (Some(Component::Insert(text)), _) => {
                let n = chars(&text);
                a2 = a2.insert(&text);
                b2 = b2.retain(n);
                x.take(n);
            }
            (_, Some(Component::Insert(text))) => {
                let n = chars(&text);
                a2 = a2.retain(n);
                b2 = b2.insert(&text);
                y.take(n);
            }
            (Some(first), Some(second)) => {
                let n = first.len().min(second.len());
                match (&first, &second) {
                    (Component::Retain(_), Component::Retain(_)) => {
                        a2 = a2.retain(n);
                        b2 = b2.retain(n);
                    }
                    // Both delete these characters: neither needs to again.
                    (Component::Delete(_), Component::Delete(_)) => {}
                    (Component::Delete(_), Component::Retain(_)) => a2 = a2.delete(n),
                    (Component::Retain(_), Component::Delete(_)) => b2 = b2.delete(n),
                    _ => unreachable!("inserts were taken above"),
                }
                x.take(n);
                y.take(n);
            }
            _ => unreachable!("the base lengths matched, so both walks end together"),
        }
    }
}

/// How many edits a document keeps to transform late ones: an edit against an older
/// revision is refused ([`EditRefused::TooOld`]), and its writer reads the document again.
pub const RECENT_EDITS: usize = 100;

/// A text document: its text, its revision (one per applied edit) and the last
/// [`RECENT_EDITS`] edits, as applied, to transform edits made against recent revisions.
/// Ordered by revision first (how far its edits got), which is how replicas' states merge.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct Document {
    /// Edits applied so far.
    pub revision: u64,
    /// The text.
    pub text: String,
    /// The edits that made the last `recent.len()` revisions, oldest first.
    pub recent: Vec<TextOp>,
}

/// Why an edit was not applied. The document is unchanged.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EditRefused {
    /// The edit names a revision the document has not reached.
    #[error("the edit is against revision {base}; the document is at revision {revision}")]
    Ahead {
        /// The revision the edit was made against.
        base: u64,
        /// The document's revision.
        revision: u64,
    },
    /// The edit is against a revision older than the edits the document keeps.
    #[error(
        "the edit is against revision {base}; edits before revision {oldest} are no longer kept: read the document again and redo the edit"
    )]
    TooOld {
        /// The revision the edit was made against.
        base: u64,
        /// The oldest revision an edit may be made against.
        oldest: u64,
    },
    /// The edit does not span the document as it was at its revision.
    #[error("the edit does not fit the document at its revision: {0}")]
    Misfit(#[from] Misfit),
}

impl Document {
    /// The oldest revision an edit may still be made against.
    pub fn oldest_base(&self) -> u64 {
        self.revision - self.recent.len() as u64
    }

    /// The edits, as applied, that turn the document at revision `since` into this one: what
    /// a reader holding that revision applies to catch up. Refused when `since` is ahead of
    /// the document or older than the edits it keeps (read the whole document then).
    pub fn edits_since(&self, since: u64) -> Result<&[TextOp], EditRefused> {
        if since > self.revision {
            return Err(EditRefused::Ahead {
                base: since,
                revision: self.revision,
            });
        }
        let oldest = self.oldest_base();
        if since < oldest {
            return Err(EditRefused::TooOld {
                base: since,
                oldest,
            });
        }
        Ok(&self.recent[(since - oldest) as usize..])
    }

    /// Applies `op`, made against revision `base`, after transforming it past every edit
    /// applied since; returns the edit as applied (what a reader at the previous revision
    /// applies to catch up).
    pub fn edit(&mut self, base: u64, op: &TextOp) -> Result<TextOp, EditRefused> {
        if base > self.revision {
            return Err(EditRefused::Ahead {
                base,
                revision: self.revision,
            });
        }
        let oldest = self.oldest_base();
        if base < oldest {
            return Err(EditRefused::TooOld { base, oldest });
        }
        let mut op = op.clone();
        for applied in &self.recent[(base - oldest) as usize..] {
            op = transform(&op, applied)?.0;
        }
        self.text = op.apply(&self.text)?;
        self.revision += 1;
        self.recent.push(op.clone());
        if self.recent.len() > RECENT_EDITS {
            self.recent.remove(0);
        }
        Ok(op)
    }
}

impl fmt::Display for TextOp {
    /// The compact form: retain `n`, insert `"text"`, delete `-n`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[")?;
        for (i, component) in self.components.iter().enumerate() {
            if i > 0 {
                f.write_str(", ")?;
            }
            match component {
                Component::Retain(n) => write!(f, "{n}")?,
                Component::Insert(text) => write!(f, "{text:?}")?,
                Component::Delete(n) => write!(f, "-{n}")?,
            }
        }
        f.write_str("]")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builders_keep_one_normal_form() {
        let a = TextOp::new()
            .retain(2)
            .delete(1)
            .insert("x")
            .retain(0)
            .retain(3);
        let b = TextOp::new()
            .retain(1)
            .retain(1)
            .insert("x")
            .delete(1)
            .retain(3);
        assert_eq!(a, b);
        assert_eq!(a.to_string(), "[2, \"x\", -1, 3]");
        assert_eq!((a.base_len(), a.target_len()), (6, 6));
    }

    #[test]
    fn apply_counts_characters_not_bytes() {
        let op = TextOp::new().retain(1).delete(1).insert("é").retain(1);
        assert_eq!(op.apply("añb").unwrap(), "aéb");
        assert_eq!(op.apply("ab"), Err(Misfit { spans: 3, has: 2 }));
    }

    #[test]
    fn two_inserts_at_one_place_order_by_priority() {
        let a = TextOp::new().retain(1).insert("A").retain(1);
        let b = TextOp::new().retain(1).insert("B").retain(1);
        let (a2, b2) = transform(&a, &b).unwrap();
        let left = b2.apply(&a.apply("xy").unwrap()).unwrap();
        let right = a2.apply(&b.apply("xy").unwrap()).unwrap();
        assert_eq!((left.as_str(), right.as_str()), ("xABy", "xABy"));
    }

    #[test]
    fn a_late_edit_is_transformed_past_what_was_applied_since() {
        let mut doc = Document::default();
        doc.edit(0, &TextOp::new().insert("hello world")).unwrap();
        // Two writers read revision 1; one capitalizes, the other appends.
        let capital = TextOp::new().delete(1).insert("H").retain(10);
        let append = TextOp::new().retain(11).insert("!");
        doc.edit(1, &capital).unwrap();
        let applied = doc.edit(1, &append).unwrap();
        assert_eq!(doc.text, "Hello world!");
        assert_eq!(doc.revision, 3);
        assert_eq!(applied, append);
        assert_eq!(
            doc.edit(4, &TextOp::new().retain(12)),
            Err(EditRefused::Ahead {
                base: 4,
                revision: 3
            })
        );
        assert!(matches!(
            doc.edit(1, &TextOp::new().retain(3)),
            Err(EditRefused::Misfit(_))
        ));
        assert_eq!(doc.revision, 3, "a refused edit changes nothing");
    }

    #[test]
    fn a_reader_catches_up_by_the_edits_since_its_revision() {
        let mut doc = Document::default();
        doc.edit(0, &TextOp::new().insert("ab")).unwrap();
        let held = doc.text.clone();
        doc.edit(1, &TextOp::new().retain(2).insert("c")).unwrap();
        doc.edit(1, &TextOp::new().insert("z").retain(2)).unwrap();
        let caught_up = doc
            .edits_since(1)
            .unwrap()
            .iter()
            .try_fold(held, |text, op| op.apply(&text))
            .unwrap();
        assert_eq!(caught_up, doc.text);
        assert!(doc.edits_since(3).unwrap().is_empty());
        assert!(matches!(doc.edits_since(4), Err(EditRefused::Ahead { .. })));
    }

    #[test]
    fn only_recent_revisions_can_be_edited_against() {
        let mut doc = Document::default();
        for i in 0..(RECENT_EDITS as u64 + 5) {
            doc.edit(i, &TextOp::new().retain(i).insert("x")).unwrap();
        }
        assert_eq!(doc.recent.len(), RECENT_EDITS);
        assert_eq!(doc.oldest_base(), 5);
        assert_eq!(
            doc.edit(4, &TextOp::new().retain(4)),
            Err(EditRefused::TooOld { base: 4, oldest: 5 })
        );
        assert_eq!(
            doc.edits_since(4),
            Err(EditRefused::TooOld { base: 4, oldest: 5 })
        );
        doc.edit(5, &TextOp::new().insert("y").retain(5)).unwrap();
        assert!(doc.text.starts_with('y'));
    }
}
