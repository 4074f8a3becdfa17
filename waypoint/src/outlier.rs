//! Outlier detection for one destination, as Envoy does it for Istio's `outlierDetection`:
//! consecutive 5xx (local-origin failures count as 503, attempt timeouts as 504) and consecutive
//! gateway errors (502/503/504) eject an endpoint inline; it stays out for
//! `baseEjectionTime × its ejection multiplier` (capped at `max_ejection_time`) and returns at
//! the first review (every `interval`) after that; the multiplier goes up by one per ejection
//! and down by one per review while the endpoint has been back for a base ejection time. At
//! most `maxEjectionPercent` of the endpoints are ejected, but one always may be. Below
//! `minHealthPercent` healthy endpoints the balancer panics and uses all of them (0: never).
//!
//! A pure state machine: every call takes `now`, so tests drive time by hand. Owns only the
//! per-endpoint counters and ejections; the choice among usable endpoints is `balance`'s.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use meshcore::route::resilience::OutlierDetection;

use crate::balance::Outcome;

/// One destination's detector.
#[derive(Debug)]
pub struct Detector {
    hosts: HashMap<SocketAddr, Host>,
    /// When the next review is due (Envoy's interval timer, run lazily).
    next_review: Instant,
}

#[derive(Debug, Default)]
struct Host {
    consecutive_5xx: u32,
    consecutive_gateway: u32,
    ejected_at: Option<Instant>,
    /// Envoy's ejection-time backoff: ejection time = base × this.
    multiplier: u32,
    returned_at: Option<Instant>,
    ejections: u64,
}

/// Which endpoints a pick may use.
#[derive(Debug, PartialEq, Eq)]
pub enum Usable {
    /// Those not ejected (maybe none: then "no healthy upstream").
    Healthy(Vec<bool>),
    /// Too few are healthy: all of them (panic).
    Panic,
}

/// Longest catch-up of missed reviews done at once (a detector idle for longer just reviews now).
const MAX_CATCH_UP: u32 = 10_000;

impl Detector {
    pub fn new(now: Instant, config: &OutlierDetection) -> Detector {
        Detector {
            hosts: HashMap::new(),
            next_review: now + interval(config),
        }
    }

    /// Which of `endpoints` (the destination's endpoints now) a pick may use. Endpoints that
    /// are gone are forgotten; new ones start healthy.
    pub fn usable(
        &mut self,
        now: Instant,
        config: &OutlierDetection,
        endpoints: &[SocketAddr],
    ) -> Usable {
        if self.hosts.len() != endpoints.len()
            || endpoints.iter().any(|e| !self.hosts.contains_key(e))
        {
            self.hosts.retain(|a, _| endpoints.contains(a));
            for e in endpoints {
                self.hosts.entry(*e).or_default();
            }
        }
        self.review(now, config);
        let healthy: Vec<bool> = endpoints
            .iter()
            .map(|e| self.hosts.get(e).is_none_or(|h| h.ejected_at.is_none()))
            .collect();
        let n = healthy.iter().filter(|h| **h).count();
        // Envoy panics when strictly below the threshold.
        if !endpoints.is_empty()
            && (n as f64) * 100.0 / (endpoints.len() as f64) < f64::from(config.min_health_percent)
        {
            Usable::Panic
        } else {
            Usable::Healthy(healthy)
        }
    }

    /// Feeds how an attempt to `endpoint` ended; may eject it.
    pub fn report(
        &mut self,
        now: Instant,
        config: &OutlierDetection,
        endpoint: SocketAddr,
        outcome: Outcome,
    ) {
        self.review(now, config);
        // Local-origin failures count as the codes Envoy maps them to (errors not split).
        let code = match outcome {
            Outcome::Status(s) => s,
            Outcome::ConnectFailure | Outcome::Reset => 503,
            Outcome::Timeout => 504,
        };
        let host = self.hosts.entry(endpoint).or_default();
        let mut eject = false;
        if (500..600).contains(&code) {
            if matches!(code, 502..=504) {
                host.consecutive_gateway += 1;
                if config.consecutive_gateway > 0
                    && host.consecutive_gateway >= config.consecutive_gateway
                {
                    host.consecutive_gateway = 0;
                    eject = true;
                }
            } else {
                host.consecutive_gateway = 0;
            }
            host.consecutive_5xx += 1;
            if config.consecutive_5xx > 0 && host.consecutive_5xx >= config.consecutive_5xx {
                host.consecutive_5xx = 0;
                eject = true;
            }
        } else {
            host.consecutive_5xx = 0;
            host.consecutive_gateway = 0;
        }
        if eject {
            self.eject(now, config, endpoint);
        }
    }

    fn eject(&mut self, now: Instant, config: &OutlierDetection, endpoint: SocketAddr) {
        let ejected = self
            .hosts
            .values()
            .filter(|h| h.ejected_at.is_some())
            .count();
        let total = self.hosts.len().max(1);
        let Some(host) = self.hosts.get_mut(&endpoint) else {
            return;
        };
        if host.ejected_at.is_some() {
            return;
        }
        // One more ejection must stay within maxEjectionPercent, unless none is ejected yet.
        let percent = (ejected + 1) as f64 * 100.0 / total as f64;
        if ejected > 0 && percent > f64::from(config.max_ejection_percent) {
            return;
        }
        host.ejected_at = Some(now);
        host.ejections += 1;
        if config.base_ejection_time * host.multiplier < cap(config) {
            host.multiplier += 1;
        }
    }

    /// Runs the reviews due by `now`, each at its own time, as Envoy's interval timer would.
    fn review(&mut self, now: Instant, config: &OutlierDetection) {
        let step = interval(config);
        let mut done = 0;
        while self.next_review <= now {
            let at = self.next_review;
            self.review_at(at, config);
            self.next_review = at + step;
            done += 1;
            if done >= MAX_CATCH_UP {
                self.review_at(now, config);
                self.next_review = now + step;
                break;
            }
        }
    }

    fn review_at(&mut self, at: Instant, config: &OutlierDetection) {
        let base = config.base_ejection_time;
        for host in self.hosts.values_mut() {
            match host.ejected_at {
                Some(ejected) => {
                    let time = (base * host.multiplier).min(cap(config));
                    if at.saturating_duration_since(ejected) >= time {
                        host.ejected_at = None;
                        host.returned_at = Some(at);
                        host.consecutive_5xx = 0;
                        host.consecutive_gateway = 0;
                    }
                }
                None => {
                    // Back and healthy for a base ejection time: forgive one ejection per review.
                    if host.multiplier > 0
                        && host
                            .returned_at
                            .is_some_and(|r| at.saturating_duration_since(r) >= base)
                    {
                        host.multiplier -= 1;
                    }
                }
            }
        }
    }

    /// The ejected endpoints with when they were ejected and for how long, for `/config_dump`
    /// (after the reviews due, so an endpoint whose time is up shows as back).
    pub fn dump(&mut self, now: Instant, config: &OutlierDetection) -> serde_json::Value {
        self.review(now, config);
        let mut ejected: Vec<serde_json::Value> = self
            .hosts
            .iter()
            .filter_map(|(addr, h)| {
                let at = h.ejected_at?;
                Some(serde_json::json!({
                    "endpoint": addr.to_string(),
                    "ejectedForMs": now.saturating_duration_since(at).as_millis() as u64,
                    "ejectionTimeMs": (config.base_ejection_time * h.multiplier).min(cap(config)).as_millis() as u64,
                    "ejections": h.ejections,
                }))
            })
            .collect();
        ejected.sort_by_key(|v| v["endpoint"].as_str().map(str::to_string));
        serde_json::json!({ "endpoints": self.hosts.len(), "ejected": ejected })
    }

    #[cfg(test)]
    fn is_ejected(&self, endpoint: SocketAddr) -> bool {
        self.hosts
            .get(&endpoint)
            .is_some_and(|h| h.ejected_at.is_some())
    }
}

fn interval(config: &OutlierDetection) -> Duration {
    config.interval.max(Duration::from_millis(1))
}

/// The longest ejection: `max_ejection_time`, but never below the base.
fn cap(config: &OutlierDetection) -> Duration {
    config.max_ejection_time.max(config.base_ejection_time)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(i: u8) -> SocketAddr {
        SocketAddr::from(([10, 0, 0, i], 80))
    }

    fn config() -> OutlierDetection {
        OutlierDetection {
            consecutive_5xx: 3,
            consecutive_gateway: 0,
            interval: Duration::from_secs(1),
            base_ejection_time: Duration::from_secs(10),
            max_ejection_time: Duration::from_secs(25),
            max_ejection_percent: 100,
            min_health_percent: 0,
        }
    }

    fn fail(d: &mut Detector, now: Instant, c: &OutlierDetection, e: SocketAddr, n: u32) {
        for _ in 0..n {
            d.report(now, c, e, Outcome::Status(500));
        }
    }

    /// Seconds after `t0` at which `e` is first seen back, probing every 100 ms.
    fn returns_after(
        d: &mut Detector,
        t0: Instant,
        c: &OutlierDetection,
        eps: &[SocketAddr],
        e: SocketAddr,
    ) -> Duration {
        let mut t = Duration::ZERO;
        while t < Duration::from_secs(600) {
            d.usable(t0 + t, c, eps);
            if !d.is_ejected(e) {
                return t;
            }
            t += Duration::from_millis(100);
        }
        panic!("never returned");
    }

    #[test]
    fn consecutive_5xx_eject_and_any_other_status_resets_the_count() {
        let c = config();
        let t0 = Instant::now();
        let mut d = Detector::new(t0, &c);
        let eps = [addr(1), addr(2)];
        d.usable(t0, &c, &eps);
        fail(&mut d, t0, &c, addr(1), 2);
        d.report(t0, &c, addr(1), Outcome::Status(404));
        fail(&mut d, t0, &c, addr(1), 2);
        assert_eq!(d.usable(t0, &c, &eps), Usable::Healthy(vec![true, true]));
        // Connect failures and resets are 503s, a timeout a 504.
        d.report(t0, &c, addr(1), Outcome::ConnectFailure);
        assert_eq!(d.usable(t0, &c, &eps), Usable::Healthy(vec![false, true]));
        d.report(t0, &c, addr(2), Outcome::Reset);
        d.report(t0, &c, addr(2), Outcome::Timeout);
        d.report(t0, &c, addr(2), Outcome::Status(503));
        assert_eq!(d.usable(t0, &c, &eps), Usable::Healthy(vec![false, false]));
    }

    #[test]
    fn gateway_errors_count_only_502_503_504_and_local_failures() {
        let c = OutlierDetection {
            consecutive_5xx: 0,
            consecutive_gateway: 2,
            ..config()
        };
        let t0 = Instant::now();
        let mut d = Detector::new(t0, &c);
        let eps = [addr(1)];
        d.usable(t0, &c, &eps);
        // A 500 breaks a run of gateway errors and is no gateway error itself.
        d.report(t0, &c, addr(1), Outcome::Status(502));
        d.report(t0, &c, addr(1), Outcome::Status(500));
        d.report(t0, &c, addr(1), Outcome::Status(504));
        assert!(!d.is_ejected(addr(1)));
        d.report(t0, &c, addr(1), Outcome::ConnectFailure);
        assert!(d.is_ejected(addr(1)));
    }

    #[test]
    fn ejection_lasts_base_times_the_ejection_count_capped_and_the_count_decays() {
        let c = config();
        let eps = [addr(1), addr(2)];
        let t0 = Instant::now();
        let mut d = Detector::new(t0, &c);
        // Reviews run every second from t0; ejected at t0 + 0.5 s.
        let t = t0 + Duration::from_millis(500);
        fail(&mut d, t, &c, addr(1), 3);
        // 10 s: back at the first review 10 s after the ejection (t0 + 11 s).
        assert_eq!(
            returns_after(&mut d, t, &c, &eps, addr(1)),
            Duration::from_millis(10_500)
        );
        let t = t + Duration::from_millis(10_500);
        fail(&mut d, t, &c, addr(1), 3);
        assert_eq!(
            returns_after(&mut d, t, &c, &eps, addr(1)),
            Duration::from_secs(20)
        );
        let t = t + Duration::from_secs(20);
        // The third would be 30 s: capped at max_ejection_time, 25 s.
        fail(&mut d, t, &c, addr(1), 3);
        assert_eq!(
            returns_after(&mut d, t, &c, &eps, addr(1)),
            Duration::from_secs(25)
        );
        let t = t + Duration::from_secs(25);
        // Back for a base ejection time (10 s), each review takes one off the multiplier
        // (3 → 2 at +10 s, → 1 at +11 s): ejected again at +11.5 s, it is out for 2 × 10 s
        // (25 s without the decay).
        let t = t + Duration::from_millis(11_500);
        d.usable(t, &c, &eps);
        fail(&mut d, t, &c, addr(1), 3);
        assert_eq!(
            returns_after(&mut d, t, &c, &eps, addr(1)),
            Duration::from_millis(20_500)
        );
    }

    #[test]
    fn max_ejection_percent_is_respected_but_one_may_always_be_ejected() {
        let c = OutlierDetection {
            max_ejection_percent: 10,
            ..config()
        };
        let t0 = Instant::now();
        let eps: Vec<SocketAddr> = (1..=4).map(addr).collect();
        let mut d = Detector::new(t0, &c);
        d.usable(t0, &c, &eps);
        for e in &eps {
            fail(&mut d, t0, &c, *e, 3);
        }
        // 10% of 4 is less than one endpoint, but the first ejection is always allowed.
        assert_eq!(
            d.usable(t0, &c, &eps),
            Usable::Healthy(vec![false, true, true, true])
        );
        // 50%: two of four.
        let c = OutlierDetection {
            max_ejection_percent: 50,
            ..config()
        };
        let mut d = Detector::new(t0, &c);
        d.usable(t0, &c, &eps);
        for e in &eps {
            fail(&mut d, t0, &c, *e, 3);
        }
        assert_eq!(
            d.usable(t0, &c, &eps),
            Usable::Healthy(vec![false, false, true, true])
        );
    }

    #[test]
    fn below_min_health_percent_all_endpoints_are_used_and_zero_never_panics() {
        let t0 = Instant::now();
        let eps: Vec<SocketAddr> = (1..=4).map(addr).collect();
        let c = OutlierDetection {
            min_health_percent: 50,
            ..config()
        };
        let mut d = Detector::new(t0, &c);
        d.usable(t0, &c, &eps);
        fail(&mut d, t0, &c, addr(1), 3);
        fail(&mut d, t0, &c, addr(2), 3);
        // 50% healthy is not below 50%: no panic.
        assert_eq!(
            d.usable(t0, &c, &eps),
            Usable::Healthy(vec![false, false, true, true])
        );
        fail(&mut d, t0, &c, addr(3), 3);
        assert_eq!(d.usable(t0, &c, &eps), Usable::Panic);
        // 0: all ejected and still no panic.
        let c = config();
        let mut d = Detector::new(t0, &c);
        d.usable(t0, &c, &eps);
        for e in &eps {
            fail(&mut d, t0, &c, *e, 3);
        }
        assert_eq!(d.usable(t0, &c, &eps), Usable::Healthy(vec![false; 4]));
    }

    #[test]
    fn endpoints_that_leave_are_forgotten() {
        let c = OutlierDetection {
            max_ejection_percent: 50,
            ..config()
        };
        let t0 = Instant::now();
        let mut d = Detector::new(t0, &c);
        d.usable(t0, &c, &[addr(1), addr(2)]);
        fail(&mut d, t0, &c, addr(1), 3);
        // addr(1) left: addr(2) is one of one, and the first ejection is always allowed.
        d.usable(t0, &c, &[addr(2)]);
        fail(&mut d, t0, &c, addr(2), 3);
        assert_eq!(d.usable(t0, &c, &[addr(2)]), Usable::Healthy(vec![false]));
    }
}
