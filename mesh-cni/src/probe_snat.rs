//! The node side of kubelet probes to captured pods: connections the node itself opens to an
//! enrolled pod's IP leave with source [`meshcore::enrollment::PROBE_SNAT_V4`] / `_V6` (an nft
//! table in the node's network namespace with a set of enrolled pod IPs), so the pod's capture
//! can let exactly those reach the app without mTLS. Owns that nft table only.
