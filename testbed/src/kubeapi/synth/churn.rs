//! Churn: one step at a time, the changes a busy cluster sees (pods coming and going, label
//! edits, policy edits, a few policies created or deleted), each with what subscribers must
//! then see and the model updated to match. Part of [`super`]'s generator.

use serde_json::{Value, json};

use super::render::{pod_object, policy_api_version, policy_object};
use super::{CHURN_LABEL, Phase, Synth, SynthPod};

/// One write a churn step makes.
#[derive(Debug, Clone)]
pub enum Change {
    /// Create or replace (spec and status).
    Put(Value),
    Delete {
        api_version: &'static str,
        kind: &'static str,
        namespace: String,
        name: String,
    },
}

/// What a churn step must make subscribers see, and who must see it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Effect {
    /// Every node: the workload is there (with `CHURN_LABEL` = `marker` if set) or gone.
    Workload {
        uid: String,
        present: bool,
        marker: Option<String>,
    },
    /// The nodes [`Synth::policy_nodes`] names: the policy is there (its spec containing
    /// `marker` if set) or gone.
    Policy {
        key: String,
        namespace: String,
        present: bool,
        marker: Option<String>,
    },
}

#[derive(Debug, Clone)]
pub struct Churn {
    pub change: Change,
    pub effect: Effect,
}

impl Synth {
    /// One churn step, the model updated: weighted as a busy cluster's (mostly pods coming and
    /// going; label edits; policy edits, a few created or deleted).
    pub fn churn(&mut self) -> Churn {
        self.serial += 1;
        let serial = self.serial;
        let roll = self.rng.below(100);
        let running: Vec<String> = self
            .pods
            .values()
            .filter(|p| p.phase == Phase::Running)
            .map(SynthPod::key)
            .collect();
        match roll {
            0..=34 => {
                let d = self.rng.below(self.size.services.max(1));
                let key = self.add_pod(d, true);
                let pod = &self.pods[&key];
                Churn {
                    change: Change::Put(pod_object(pod)),
                    effect: Effect::Workload {
                        uid: key,
                        present: true,
                        marker: None,
                    },
                }
            }
            35..=64 if !running.is_empty() => {
                let key = running[self.rng.below(running.len())].clone();
                let pod = self.pods.remove(&key).expect("picked from the model");
                Churn {
                    change: Change::Delete {
                        api_version: "v1",
                        kind: "Pod",
                        namespace: pod.namespace,
                        name: pod.name,
                    },
                    effect: Effect::Workload {
                        uid: key,
                        present: false,
                        marker: None,
                    },
                }
            }
            65..=84 if !running.is_empty() => {
                let key = running[self.rng.below(running.len())].clone();
                let marker = serial.to_string();
                let pod = self.pods.get_mut(&key).expect("picked from the model");
                pod.labels.insert(CHURN_LABEL.into(), marker.clone());
                Churn {
                    change: Change::Put(pod_object(pod)),
                    effect: Effect::Workload {
                        uid: key,
                        present: true,
                        marker: Some(marker),
                    },
                }
            }
            _ => self.churn_policy(serial, roll),
        }
    }

    fn churn_policy(&mut self, serial: u64, roll: usize) -> Churn {
        // Policies nodes hold: a waypoint-only one's edit reaches no node to wait for.
        let keys: Vec<String> = self
            .policies
            .iter()
            .filter(|(_, p)| p.for_ztunnel())
            .map(|(k, _)| k.clone())
            .collect();
        let marker = format!("churn-{serial}");
        if roll >= 97 || keys.is_empty() {
            let ns = self.team_namespaces();
            let ns = ns[self.rng.below(ns.len())].clone();
            let name = format!("churn-{serial}");
            let spec = json!({"rules": [{"from": [{"source": {"principals": [format!("cluster.local/ns/{ns}/sa/{marker}")]}}]}],
                              "selector": {"matchLabels": {"app": marker}}});
            self.insert_policy("AuthorizationPolicy", &ns, &name, spec);
            let p = &self.policies[&format!("AuthorizationPolicy/{ns}/{name}")];
            return Churn {
                change: Change::Put(policy_object(p)),
                effect: Effect::Policy {
                    key: p.key(),
                    namespace: ns,
                    present: true,
                    marker: Some(marker),
                },
            };
        }
        let key = keys[self.rng.below(keys.len())].clone();
        if roll == 96 {
            let p = self.policies.remove(&key).expect("picked from the model");
            return Churn {
                change: Change::Delete {
                    api_version: policy_api_version(),
                    kind: p.kind,
                    namespace: p.namespace.clone(),
                    name: p.name.clone(),
                },
                effect: Effect::Policy {
                    key,
                    namespace: p.namespace,
                    present: false,
                    marker: None,
                },
            };
        }
        let p = self.policies.get_mut(&key).expect("picked from the model");
        match p.kind {
            "PeerAuthentication" => {
                // Flip a port's mode and name the edit in a harmless extra port entry.
                p.spec["portLevelMtls"] = json!({"9090": {"mode": "PERMISSIVE"}});
                p.spec["selector"] = json!({"matchLabels": {"app": marker}});
            }
            _ => {
                p.spec["rules"] = json!([{"from": [{"source": {"principals": [format!("cluster.local/ns/{}/sa/{marker}", p.namespace)]}}]}]);
            }
        }
        Churn {
            change: Change::Put(policy_object(p)),
            effect: Effect::Policy {
                key,
                namespace: p.namespace.clone(),
                present: true,
                marker: Some(marker),
            },
        }
    }
}
