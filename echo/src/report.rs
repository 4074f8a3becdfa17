//! Benchmark report types printed (one JSON line each) by `echo bench-*`, plus
//! the latency percentile/summary logic behind them.

use serde::{Deserialize, Serialize};

/// `echo bench-rr`: sequential request/response latency on one connection.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RrReport {
    /// Measured round trips (the percentiles are theirs).
    pub count: u64,
    /// Round trips in the warm-up before them, on the same connection.
    #[serde(default)]
    pub warmup_count: u64,
    pub p50_us: f64,
    pub p90_us: f64,
    pub p99_us: f64,
    pub mean_us: f64,
}

/// `echo bench-conn`: connect + one WHO + close, per worker, in a loop.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ConnReport {
    pub count: u64,
    pub per_sec: f64,
    pub errors: u64,
    pub p50_us: f64,
    pub p99_us: f64,
}

/// `echo bench-bulk`: SINK-mode throughput with byte accounting.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BulkReport {
    /// Total bytes sent (and confirmed received by the server) over all streams.
    pub bytes: u64,
    pub gbit_per_s: f64,
    pub streams: u32,
}

/// Any benchmark report, tagged by `"mode"` exactly as the binary prints it
/// (`{"mode":"rr",...}`). The individual report structs also deserialize from
/// that output directly (the `mode` key is ignored).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "mode", rename_all = "lowercase")]
pub enum BenchReport {
    Rr(RrReport),
    Conn(ConnReport),
    Bulk(BulkReport),
}

/// Nearest-rank percentile (`p` in 0..=100) of an ascending-sorted slice;
/// 0 for an empty slice.
pub fn percentile(sorted: &[u64], p: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    let p = p.clamp(0.0, 100.0);
    // Nearest rank: ceil(p/100 * n), 1-based; rank 0 (p == 0) maps to the minimum.
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// Latency summary in microseconds, computed from nanosecond samples.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LatencySummary {
    pub count: u64,
    pub p50_us: f64,
    pub p90_us: f64,
    pub p99_us: f64,
    pub mean_us: f64,
}

impl LatencySummary {
    /// Sorts `samples_ns` in place (no allocation) and summarises them.
    pub fn from_nanos(samples_ns: &mut [u64]) -> Self {
        samples_ns.sort_unstable();
        let count = samples_ns.len() as u64;
        let sum: u128 = samples_ns.iter().map(|&v| u128::from(v)).sum();
        let mean_ns = if count == 0 {
            0.0
        } else {
            sum as f64 / count as f64
        };
        let us = |ns: u64| round3(ns as f64 / 1_000.0);
        Self {
            count,
            p50_us: us(percentile(samples_ns, 50.0)),
            p90_us: us(percentile(samples_ns, 90.0)),
            p99_us: us(percentile(samples_ns, 99.0)),
            mean_us: round3(mean_ns / 1_000.0),
        }
    }
}

/// Rounds to 3 decimals (nanosecond resolution when the unit is µs).
pub(crate) fn round3(v: f64) -> f64 {
    (v * 1_000.0).round() / 1_000.0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles() {
        let v: Vec<u64> = (1..=100).collect();
        assert_eq!(percentile(&v, 50.0), 50);
        assert_eq!(percentile(&v, 90.0), 90);
        assert_eq!(percentile(&v, 99.0), 99);
        assert_eq!(percentile(&v, 100.0), 100);
        assert_eq!(percentile(&v, 0.0), 1);
        assert_eq!(percentile(&[], 50.0), 0);
        assert_eq!(percentile(&[7], 99.0), 7);
    }

    #[test]
    fn summary() {
        let mut v = vec![3_000, 1_000, 2_000];
        let s = LatencySummary::from_nanos(&mut v);
        assert_eq!(s.count, 3);
        assert_eq!(s.p50_us, 2.0);
        assert_eq!(s.p99_us, 3.0);
        assert_eq!(s.mean_us, 2.0);
        let empty = LatencySummary::from_nanos(&mut []);
        assert_eq!(empty.count, 0);
        assert_eq!(empty.mean_us, 0.0);
    }

    #[test]
    fn tagged_output_deserializes_both_ways() {
        let report = BenchReport::Rr(RrReport {
            count: 5,
            warmup_count: 2,
            p50_us: 1.5,
            p90_us: 2.0,
            p99_us: 3.0,
            mean_us: 1.75,
        });
        let line = serde_json::to_string(&report).unwrap();
        assert!(line.starts_with(r#"{"mode":"rr","count":5"#), "{line}");
        let direct: RrReport = serde_json::from_str(&line).unwrap();
        assert_eq!(direct.count, 5);
        let back: BenchReport = serde_json::from_str(&line).unwrap();
        assert_eq!(back, report);

        let bulk = r#"{"mode":"bulk","bytes":10,"gbit_per_s":0.5,"streams":2}"#;
        let b: BulkReport = serde_json::from_str(bulk).unwrap();
        assert_eq!(b.streams, 2);
        let c = r#"{"mode":"conn","count":1,"per_sec":2.0,"errors":0,"p50_us":1.0,"p99_us":1.0}"#;
        assert!(matches!(
            serde_json::from_str::<BenchReport>(c).unwrap(),
            BenchReport::Conn(_)
        ));
    }
}
