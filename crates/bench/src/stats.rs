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

    /// One sample of several runs: all their latencies over their summed wall time.
    pub(crate) fn merge(samples: Vec<Sample>) -> Self {
        let wall = samples.iter().map(|s| s.wall).sum();
        Self::new(samples.into_iter().flat_map(|s| s.sorted).collect(), wall)
    }

    /// The operations measured.
    pub(crate) fn operations(&self) -> usize {
        self.sorted.len()
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

    fn figures(&self) -> Figures {
        Figures {
            ops_per_sec: self.ops_per_sec(),
            p50: self.percentile(50.0),
            p99: self.percentile(99.0),
        }
    }
}

/// The round with the median throughput.
pub(crate) fn median(mut rounds: Vec<Sample>) -> Sample {
    rounds.sort_by(|a, b| a.ops_per_sec().total_cmp(&b.ops_per_sec()));
    let middle = rounds.len() / 2;
    rounds.swap_remove(middle)
}

/// Throughput and latency of one side of a comparison.
pub(crate) struct Figures {
    ops_per_sec: f64,
    p50: Duration,
    p99: Duration,
}

/// One workload measured on agentstore and on its anchor.
pub(crate) struct Row {
    name: String,
    ours: Figures,
    anchor: Figures,
}

impl Row {
    pub(crate) fn new(name: String, ours: Sample, anchor: Sample) -> Self {
        Self {
            name,
            ours: ours.figures(),
            anchor: anchor.figures(),
        }
    }

    /// A row whose anchor was measured by an external tool that reports its own figures.
    pub(crate) fn with_anchor_figures(
        name: &str,
        ours: Sample,
        ops_per_sec: f64,
        p50_ms: f64,
        p99_ms: f64,
    ) -> Self {
        let ms = |v: f64| Duration::from_secs_f64(v / 1000.0);
        Self {
            name: name.to_owned(),
            ours: ours.figures(),
            anchor: Figures {
                ops_per_sec,
                p50: ms(p50_ms),
                p99: ms(p99_ms),
            },
        }
    }
}

fn micros(d: Duration) -> String {
    format!("{:.0} µs", d.as_secs_f64() * 1e6)
}

pub(crate) fn print_table(rows: &[Row]) {
    print_table_with("raw", rows);
}

pub(crate) fn print_table_with(anchor: &str, rows: &[Row]) {
    println!(
        "| workload | agentstore ops/s | p50 | p99 | {anchor} ops/s | p50 | p99 | ratio (ours/{anchor} ops/s) |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|---:|");
    for row in rows {
        println!(
            "| {} | {:.0} | {} | {} | {:.0} | {} | {} | {:.2}x |",
            row.name,
            row.ours.ops_per_sec,
            micros(row.ours.p50),
            micros(row.ours.p99),
            row.anchor.ops_per_sec,
            micros(row.anchor.p50),
            micros(row.anchor.p99),
            row.ours.ops_per_sec / row.anchor.ops_per_sec,
        );
    }
}
