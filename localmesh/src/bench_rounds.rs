//! Repeated rounds of the L4 bench: which round each figure reports (its median round) and how
//! far the rounds spread.
//!
//! Wall time on a shared 2-core machine moves by 10–20% between interleaved runs of the same
//! code (two builds differing only in debug sections once measured "1.10×" bulk and "1.23×"
//! connections/s). With several rounds, each figure is reported from its median round (its
//! counters from that same round, so per-unit costs stay consistent), and the spread and the
//! per-round after/before ratios are printed, so one lucky round cannot decide an A/B.
//!
//! Owns only that choosing and the spread's text; the measuring is [`crate::bench_l4`]'s.

use serde_json::Value;

use crate::bench::{median_by, num};
use crate::bench_stats::Spent;

/// Figure slots of a mesh pair, in [`Round::subjects`] order; the first three also index
/// [`Round::raw`], [`Round::relay`] and [`KEYS`].
pub const BULK: usize = 0;
pub const RR: usize = 1;
pub const CONN: usize = 2;
pub const CONN_PACED: usize = 3;

/// The report field each of [`BULK`], [`RR`] and [`CONN`] is ranked and spread by.
const KEYS: [&str; 3] = ["gbit_per_s", "p50_us", "per_sec"];

/// What one round measured: every figure on every pair.
#[derive(Clone)]
pub struct Round {
    /// Raw TCP: bulk, 1 KiB request/response, connections.
    pub raw: [Value; 3],
    /// The plaintext relay chain: the same three, each with what its two relays spent.
    pub relay: [(Value, Spent); 3],
    /// Per mesh pair (the current build first, then the baseline): bulk, request/response,
    /// connections, paced connections ([`BULK`]…[`CONN_PACED`]), each with what its
    /// ztunnels spent.
    pub subjects: Vec<[(Value, Spent); 4]>,
}

/// What a mesh pair's figure in `slot` is ranked by: its [`KEYS`] field, but paced
/// connections, which all run at the same rate, by what differs, their cost.
fn rank(slot: usize, (v, spent): &(Value, Spent)) -> f64 {
    match KEYS.get(slot) {
        Some(key) => num(v, key),
        None => spent.cpu_secs / num(v, "count"),
    }
}

impl Round {
    /// Each figure from its median round; `None` for no rounds.
    pub fn median(rounds: &[Round]) -> Option<Round> {
        let first = rounds.first()?;
        // The round in the middle when ranked by `key` (never `first` by default: rounds is
        // not empty here, so there always is one).
        let middle = |key: &dyn Fn(&Round) -> f64| median_by(rounds, key).unwrap_or(first);
        let raw = std::array::from_fn(|i| middle(&|r| num(&r.raw[i], KEYS[i])).raw[i].clone());
        let relay = std::array::from_fn(|i| middle(&|r| rank(i, &r.relay[i])).relay[i].clone());
        let subjects = (0..first.subjects.len())
            .map(|s| {
                std::array::from_fn(|slot| {
                    middle(&|r| rank(slot, &r.subjects[s][slot])).subjects[s][slot].clone()
                })
            })
            .collect();
        Some(Round {
            raw,
            relay,
            subjects,
        })
    }
}

/// Lines saying how far `rounds` spread (nothing for a single round).
pub fn spread(rounds: &[Round]) -> Vec<String> {
    if rounds.len() < 2 {
        return Vec::new();
    }
    let range = |values: Vec<f64>| {
        let lo = values.iter().copied().fold(f64::INFINITY, f64::min);
        let hi = values.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        format!("{lo:.1}–{hi:.1}")
    };
    const NAMES: [&str; 3] = ["bulk Gbit/s", "1 KiB p50 µs", "conn/s"];
    let mut lines = vec![format!(
        "over {} rounds (each figure above is its median round's):",
        rounds.len()
    )];
    for (slot, (name, key)) in NAMES.into_iter().zip(KEYS).enumerate() {
        let column = |get: &dyn Fn(&Round) -> &Value| {
            range(rounds.iter().map(|r| num(get(r), key)).collect())
        };
        let subject = |r: &Round, s: usize| num(&r.subjects[s][slot].0, key);
        let mut line = format!(
            "  {name}: raw {}, relay chain {}, mesh {}",
            column(&|r| &r.raw[slot]),
            column(&|r| &r.relay[slot].0),
            column(&|r| &r.subjects[0][slot].0),
        );
        if rounds[0].subjects.len() > 1 {
            let ratios: Vec<f64> = rounds
                .iter()
                .map(|r| subject(r, 0) / subject(r, 1))
                .collect();
            let listed: Vec<String> = ratios.iter().map(|x| format!("{x:.2}")).collect();
            // Each round's ratio compares two builds under the same moment's load: their
            // median is steadier than the ratio of the two builds' median rounds.
            let median = median_by(&ratios, |x| *x).copied().unwrap_or(f64::NAN);
            line.push_str(&format!(
                ", baseline {}; after/before per round {} (median {median:.2})",
                column(&|r| &r.subjects[1][slot].0),
                listed.join(", ")
            ));
        }
        lines.push(line);
    }
    lines
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn round(raw_gbit: f64, mesh_gbit: f64, mesh_cpu: f64) -> Round {
        let spent = Spent {
            cpu_secs: mesh_cpu,
            ..Default::default()
        };
        let v = |k: &str, x: f64| json!({ k: x, "count": 1000.0 });
        Round {
            raw: [
                v("gbit_per_s", raw_gbit),
                v("p50_us", 50.0),
                v("per_sec", 9.0),
            ],
            relay: [
                (v("gbit_per_s", 1.0), spent),
                (v("p50_us", 1.0), spent),
                (v("per_sec", 1.0), spent),
            ],
            subjects: vec![[
                (v("gbit_per_s", mesh_gbit), spent),
                (v("p50_us", 1.0), spent),
                (v("per_sec", 1.0), spent),
                (v("per_sec", 1.0), spent),
            ]],
        }
    }

    #[test]
    fn each_figure_comes_from_its_own_median_round_with_that_rounds_counters() {
        let rounds = [
            round(12.0, 6.0, 3.0),
            round(8.0, 7.0, 1.0),
            round(10.0, 9.0, 2.0),
        ];
        let m = Round::median(&rounds).unwrap();
        assert_eq!(num(&m.raw[0], "gbit_per_s"), 10.0);
        assert_eq!(num(&m.subjects[0][BULK].0, "gbit_per_s"), 7.0);
        // The bulk figure's counters are its round's (the second), not the median CPU.
        assert_eq!(m.subjects[0][BULK].1.cpu_secs, 1.0);
        // Paced connections rank by their cost: the median CPU is the third round's.
        assert_eq!(m.subjects[0][CONN_PACED].1.cpu_secs, 2.0);
        assert!(Round::median(&[]).is_none());
    }

    #[test]
    fn an_even_count_takes_the_upper_middle_and_nan_ranks_last() {
        let id = |x: &f64| *x;
        assert_eq!(median_by(&[4.0, 1.0, 3.0, 2.0], id), Some(&3.0));
        assert_eq!(median_by(&[f64::NAN, 5.0, 1.0], id), Some(&5.0));
        assert_eq!(median_by(&[7.0], id), Some(&7.0));
        assert_eq!(median_by(&[], id), None);
    }

    #[test]
    fn spread_lists_ranges_and_nothing_for_one_round() {
        assert!(spread(&[round(1.0, 1.0, 1.0)]).is_empty());
        let lines = spread(&[round(12.0, 6.0, 1.0), round(8.0, 7.0, 1.0)]);
        assert!(
            lines[1].contains("raw 8.0–12.0") && lines[1].contains("mesh 6.0–7.0"),
            "{lines:?}"
        );
    }

    /// With a baseline, each round's after/before ratio is listed, and their median.
    #[test]
    fn spread_gives_each_rounds_ratio_and_their_median() {
        let with_baseline = |mesh: f64, baseline: f64| {
            let mut r = round(10.0, mesh, 1.0);
            let mut b = r.subjects[0].clone();
            b[BULK].0 = json!({"gbit_per_s": baseline, "count": 1000.0});
            r.subjects.push(b);
            r
        };
        let lines = spread(&[
            with_baseline(6.0, 5.0),
            with_baseline(4.0, 5.0),
            with_baseline(9.0, 6.0),
        ]);
        assert!(
            lines[1].contains("after/before per round 1.20, 0.80, 1.50 (median 1.20)"),
            "{lines:?}"
        );
    }
}
