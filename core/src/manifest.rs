//! How the mesh reads operator-written YAML manifests: the parser options (YAML 1.2 scalars, as
//! Kubernetes reads them) and the budgets that bound what one file may cost.
//!
//! Owns these limits only, so that meshd and local mode, which both read files an operator
//! wrote, reject the same hostile text (alias bombs, deep nesting, huge files) the same way.

/// The largest manifest file the mesh reads. Real manifests are kilobytes; this keeps a stray
/// dump or a link to a device from being read into memory.
pub const MAX_FILE_BYTES: u64 = 4 << 20;
/// Nodes (scalars, sequences, mappings) one file may hold once aliases are expanded: about
/// what a 4 MiB file of real manifests holds, far below what would strain a reader.
const MAX_NODES: usize = 1_000_000;
/// Events that aliases may replay in one file. Anchors used to share a label block or a
/// container spec replay hundreds; an alias bomb (`&a [x,..]`, `&b [*a,..]`, `[*b,..]`) needs
/// millions, and is cut off here (tens of ms in a release build, about 0.2 s in a debug one).
const MAX_ALIAS_EVENTS: usize = 10_000;
/// Nesting depth; Kubernetes objects are a dozen levels deep.
const MAX_DEPTH: usize = 64;
/// Documents in one file.
const MAX_DOCUMENTS: usize = 65_536;

/// YAML reading as Kubernetes does it (YAML 1.2 scalars: `yes`, `0755` and `1_000` stay
/// strings, as they did with serde_yaml), with every resource a document can consume bounded.
/// Callers check [`MAX_FILE_BYTES`] themselves: the text is already in memory.
pub fn yaml_options() -> serde_saphyr::Options {
    let mut budget = serde_saphyr::Budget::default();
    budget.max_nodes = MAX_NODES;
    // Each node is one event, a collection two; the default (1M) would cut in before nodes.
    budget.max_events = 2 * MAX_NODES;
    budget.max_depth = MAX_DEPTH;
    budget.max_documents = MAX_DOCUMENTS;
    let mut options = serde_saphyr::Options::default();
    options.budget = Some(budget);
    options.alias_limits.max_total_replayed_events = MAX_ALIAS_EVENTS;
    options.strict_booleans = true;
    options.leading_zero_numbers_as_strings = true;
    options.underscored_numbers_as_strings = true;
    // Errors go to one log line; the message already carries line and column.
    options.with_snippet = false;
    options
}

/// Why a manifest's text could not be read as documents.
#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    #[error("{size} bytes is over the {} MiB limit for a manifest file", MAX_FILE_BYTES >> 20)]
    TooLarge { size: u64 },
    /// Bad YAML, or over a budget (alias bomb, nesting); the message has line and column.
    #[error("{0}")]
    Yaml(Box<serde_saphyr::Error>),
}

/// Parses a multi-document YAML (or JSON) text into documents, empty ones dropped, under the
/// budgets above. The one reader of operator-written manifests as plain JSON values (local
/// mode's kubelet, meshctl); callers name the file in their errors.
pub fn parse_docs(text: &str) -> Result<Vec<serde_json::Value>, ManifestError> {
    let size = u64::try_from(text.len()).unwrap_or(u64::MAX);
    if size > MAX_FILE_BYTES {
        return Err(ManifestError::TooLarge { size });
    }
    let docs: Vec<serde_json::Value> =
        serde_saphyr::from_multiple_with_options(text, yaml_options())
            .map_err(|e| ManifestError::Yaml(Box::new(e)))?;
    Ok(docs.into_iter().filter(|v| !v.is_null()).collect())
}
