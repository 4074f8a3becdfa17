//! Istio's per-pod port exclusion annotations: parsing them into the [`Exclusions`] capture
//! applies. Owns the annotation names and their syntax; applying them is [`crate::enroll`]'s.

use meshcore::proto::config::Workload;
use tracing::warn;

use crate::capture::Exclusions;

/// Istio's per-pod port exclusion annotations (comma-separated destination ports).
pub const EXCLUDE_OUTBOUND_ANNOTATION: &str = "traffic.sidecar.istio.io/excludeOutboundPorts";
pub const EXCLUDE_INBOUND_ANNOTATION: &str = "traffic.sidecar.istio.io/excludeInboundPorts";

/// The exclusion annotations' raw values (what decides whether capture must be redone).
pub fn excl_annotations(w: &Workload) -> [Option<String>; 2] {
    [EXCLUDE_OUTBOUND_ANNOTATION, EXCLUDE_INBOUND_ANNOTATION].map(|k| w.annotations.get(k).cloned())
}

/// The pod's port exclusions, from its annotations. A malformed annotation is logged (pod and
/// annotation named) and ignored as a whole; the other annotation still applies.
pub fn exclusions(w: &Workload) -> Exclusions {
    let get = |k: &str| w.annotations.get(k).map(String::as_str);
    let (excl, errors) = exclusions_from(
        get(EXCLUDE_OUTBOUND_ANNOTATION),
        get(EXCLUDE_INBOUND_ANNOTATION),
    );
    for e in errors {
        warn!(pod = %w.uid, annotation = e.annotation, value = %e.value, error = %e.reason,
            "ignoring malformed port exclusion annotation");
    }
    excl
}

/// A port exclusion annotation that could not be parsed.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
#[error("{annotation}={value:?}: {reason}")]
pub struct ExclusionError {
    pub annotation: &'static str,
    pub value: String,
    pub reason: String,
}

/// Parses the two annotation values (comma-separated ports 1-65535, blanks around entries
/// allowed). An annotation with any bad entry is ignored entirely and reported; the other one
/// still counts.
pub fn exclusions_from(
    outbound: Option<&str>,
    inbound: Option<&str>,
) -> (Exclusions, Vec<ExclusionError>) {
    let mut errors = Vec::new();
    let mut parse = |annotation: &'static str, v: Option<&str>| -> Vec<u16> {
        let Some(v) = v else { return Vec::new() };
        match parse_ports(v) {
            Ok(p) => p,
            Err(reason) => {
                errors.push(ExclusionError {
                    annotation,
                    value: v.to_string(),
                    reason,
                });
                Vec::new()
            }
        }
    };
    let excl = Exclusions {
        outbound: parse(EXCLUDE_OUTBOUND_ANNOTATION, outbound),
        inbound: parse(EXCLUDE_INBOUND_ANNOTATION, inbound),
    };
    (excl, errors)
}

fn parse_ports(v: &str) -> Result<Vec<u16>, String> {
    let mut ports = Vec::new();
    for entry in v.split(',').map(str::trim).filter(|e| !e.is_empty()) {
        match entry.parse::<u16>() {
            Ok(p) if p != 0 => ports.push(p),
            _ => return Err(format!("{entry:?} is not a port (1-65535)")),
        }
    }
    ports.sort_unstable();
    ports.dedup();
    Ok(ports)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exclusion_annotations_parse_ports() {
        let (e, errs) = exclusions_from(Some("9090, 5432,,9090"), Some("15020"));
        assert!(errs.is_empty(), "{errs:?}");
        assert_eq!(e.outbound, vec![5432, 9090]);
        assert_eq!(e.inbound, vec![15020]);
        assert_eq!(
            exclusions_from(None, Some("")),
            (Exclusions::default(), vec![])
        );
    }

    #[test]
    fn malformed_exclusion_annotation_is_ignored_alone() {
        for bad in ["junk", "80,0", "70000", "80;81", "-1"] {
            let (e, errs) = exclusions_from(Some(bad), Some("8080"));
            assert_eq!(e.outbound, Vec::<u16>::new(), "{bad}");
            assert_eq!(
                e.inbound,
                vec![8080],
                "{bad}: the other annotation must still apply"
            );
            assert_eq!(errs.len(), 1, "{bad}");
            assert_eq!(errs[0].annotation, EXCLUDE_OUTBOUND_ANNOTATION);
        }
    }
}
