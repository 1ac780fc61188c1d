//! Latency samples and the side-by-side table.

use std::time::Duration;

/// The latencies of one run and its wall time.
pub(crate) struct Sample {
    sorted: Vec<Duration>,
    wall: Duration,
}

impl Sample {
    pub(crate) fn new(mut latencies: Vec<Duration>, wall: Duration) -> Self {
        latencies.sort_unstable();
        Self {
            sorted: latencies,
            wall,
        }
    }

    pub(crate) fn ops_per_sec(&self) -> f64 {
        self.sorted.len() as f64 / self.wall.as_secs_f64()
    }

    pub(crate) fn percentile(&self, p: f64) -> Duration {
        if self.sorted.is_empty() {
            return Duration::ZERO;
        }
        let rank = ((p / 100.0) * (self.sorted.len() - 1) as f64).round() as usize;
        self.sorted[rank]
    }
}

/// The round with the median throughput.
pub(crate) fn median(mut rounds: Vec<Sample>) -> Sample {
    rounds.sort_by(|a, b| a.ops_per_sec().total_cmp(&b.ops_per_sec()));
    let middle = rounds.len() / 2;
    rounds.swap_remove(middle)
}

/// One workload measured on agentstore and on its anchor.
pub(crate) struct Row {
    name: String,
    ours: Sample,
    anchor: Sample,
}

impl Row {
    pub(crate) fn new(name: String, ours: Sample, anchor: Sample) -> Self {
        Self { name, ours, anchor }
    }
}

fn micros(d: Duration) -> String {
    format!("{:.0} µs", d.as_secs_f64() * 1e6)
}

pub(crate) fn print_table(rows: &[Row]) {
    println!(
        "| workload | agentstore ops/s | p50 | p99 | raw ops/s | p50 | p99 | ratio (ours/raw ops/s) |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|---:|");
    for row in rows {
        println!(
            "| {} | {:.0} | {} | {} | {:.0} | {} | {} | {:.2}x |",
            row.name,
            row.ours.ops_per_sec(),
            micros(row.ours.percentile(50.0)),
            micros(row.ours.percentile(99.0)),
            row.anchor.ops_per_sec(),
            micros(row.anchor.percentile(50.0)),
            micros(row.anchor.percentile(99.0)),
            row.ours.ops_per_sec() / row.anchor.ops_per_sec(),
        );
    }
}
