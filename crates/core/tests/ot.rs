//! The algebra of text edits on random documents: TP1 for transform, compose's law, and
//! convergence of a document edited by concurrent writers, whatever order the store picks.

use agentstore_core::ot::{Component, Document, TextOp, transform};
use proptest::prelude::*;

/// Short texts over a small alphabet with a multi-byte character, so edits collide often and
/// character counts differ from byte counts.
fn text() -> impl Strategy<Value = String> {
    "[ab é]{0,12}"
}

/// A random edit of a document of `len` characters: a walk that retains, deletes and
/// inserts until it has spanned all of them.
fn edit_of(len: u64) -> impl Strategy<Value = TextOp> {
    prop::collection::vec((0u8..3, 1u64..4, text()), 0..8).prop_map(move |steps| {
        let mut op = TextOp::new();
        let mut left = len;
        for (kind, n, inserted) in steps {
            let n = n.min(left);
            op = match kind {
                0 => op.retain(n),
                1 => op.delete(n),
                _ => op.insert(&inserted),
            };
            if kind != 2 {
                left -= n;
            }
        }
        op.retain(left)
    })
}

fn doc_and_two_edits() -> impl Strategy<Value = (String, TextOp, TextOp)> {
    text().prop_flat_map(|doc| {
        let len = doc.chars().count() as u64;
        (Just(doc), edit_of(len), edit_of(len))
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn an_edit_spans_its_document_and_makes_its_target((doc, a, _) in doc_and_two_edits()) {
        let after = a.apply(&doc).unwrap();
        prop_assert_eq!(after.chars().count() as u64, a.target_len());
        // Rebuilt from its components, an edit is the same value (one normal form).
        prop_assert_eq!(&TextOp::from_components(a.components()), &a);
    }

    #[test]
    fn tp1_both_orders_of_two_concurrent_edits_converge((doc, a, b) in doc_and_two_edits()) {
        let (a2, b2) = transform(&a, &b).unwrap();
        let left = b2.apply(&a.apply(&doc).unwrap()).unwrap();
        let right = a2.apply(&b.apply(&doc).unwrap()).unwrap();
        prop_assert_eq!(left, right);
    }

    #[test]
    fn compose_is_applying_one_after_the_other((doc, a, b) in doc_and_two_edits()) {
        let middle = a.apply(&doc).unwrap();
        let b = TextOp::from_components(b.components());
        // b was drawn for `doc`; rebase it onto `middle` so it fits.
        let b = transform(&b, &a).unwrap().0;
        let composed = a.compose(&b).unwrap();
        prop_assert_eq!(composed.apply(&doc).unwrap(), b.apply(&middle).unwrap());
    }

    /// Three writers each make an edit against the revision they read (the same one); the
    /// store applies them in any order. Every order keeps every writer's inserted text, and
    /// the document the store ends with is what each applied edit, replayed in order, makes.
    #[test]
    fn a_document_keeps_every_concurrent_writers_insert(
        (doc, edits, order) in text().prop_flat_map(|doc| {
            let len = doc.chars().count() as u64;
            (Just(doc), prop::collection::vec(edit_of(len), 3), Just([0usize, 1, 2]).prop_shuffle())
        })
    ) {
        let mut document = Document::default();
        document.edit(0, &TextOp::new().insert(&doc)).unwrap();
        let mut replayed = doc.clone();
        for &writer in &order {
            let applied = document.edit(1, &edits[writer]).unwrap();
            replayed = applied.apply(&replayed).unwrap();
        }
        prop_assert_eq!(&document.text, &replayed);
        prop_assert_eq!(document.revision, 4);
        for edit in &edits {
            for component in edit.components() {
                if let Component::Insert(inserted) = component {
                    prop_assert!(document.text.contains(inserted.as_str()),
                        "{inserted:?} lost from {:?}", document.text);
                }
            }
        }
    }
}
