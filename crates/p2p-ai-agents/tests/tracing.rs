//! Every storage operation runs in a span carrying its key, level and outcome.

use std::io::Write;
use std::sync::{Arc, Mutex};

use p2p_ai_agents::storage::{Config, Storage};
use tracing_subscriber::fmt::format::FmtSpan;

#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[tokio::test(flavor = "current_thread")]
async fn operations_are_traced_with_key_level_and_outcome() {
    let captured = Captured::default();
    let writer = captured.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_writer(move || writer.clone())
        .with_span_events(FmtSpan::CLOSE)
        .with_ansi(false)
        .finish();
    let _guard = tracing::subscriber::set_default(subscriber);

    let dir = tempfile::tempdir().unwrap();
    let yaml = format!(
        "storage:\n  data_dir: {}\n  collections:\n    hits:\n      conflict: pn_counter\n",
        dir.path().display()
    );
    let storage = Storage::new(Config::from_yaml(&yaml, "t.yaml").unwrap())
        .await
        .unwrap();
    storage.set("notes:1", "x").await.unwrap();
    storage.counter_add("notes:1", 1).await.unwrap_err();
    let _ = storage.get::<String>("notes:1").await.unwrap();

    let text = String::from_utf8(captured.0.lock().unwrap().clone()).unwrap();
    for expected in [
        r#"storage{op="set" key="notes:1" level="eventual" outcome="ok"}"#,
        r#"storage{op="counter_add" key="notes:1" level="eventual" outcome="wrong_operation"}"#,
        r#"storage{op="get" key="notes:1" level="eventual" outcome="ok"}"#,
    ] {
        assert!(text.contains(expected), "missing {expected} in:\n{text}");
    }
}
