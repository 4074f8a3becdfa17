//! The CNI configuration files themselves: which file is the primary one (the lexically
//! first `.conf`/`.conflist`/`.json`, as the container runtime picks it), and the pure edits —
//! put our entry last in the chain (wrapping a single-plugin `.conf` into a list), or take it
//! out. Reads text, returns text; never touches the filesystem beyond listing and reading.

use std::path::{Path, PathBuf};

use serde_json::{Map, Value};

/// The `type` of our entry in a chain: the runtime execs the binary of this name.
pub const PLUGIN_TYPE: &str = "mesh-cni";

/// A conf file larger than this is not a CNI config (refused, not read whole).
pub const MAX_CONF_BYTES: u64 = 1024 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum ConfError {
    #[error("reading the CNI conf dir {dir}: {source}")]
    ListDir {
        dir: PathBuf,
        source: std::io::Error,
    },
    #[error("reading CNI config {file}: {source}")]
    Read {
        file: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "CNI config {file} is malformed ({why}); left as it is — fix or remove it and the plugin is inserted on the next pass"
    )]
    Malformed { file: PathBuf, why: String },
}

/// Whether the runtime would load a file of this name as a CNI config (libcni's extensions).
pub fn is_conf_name(name: &str) -> bool {
    [".conf", ".conflist", ".json"]
        .iter()
        .any(|ext| name.len() > ext.len() && name.ends_with(ext))
}

/// Every CNI config file in `dir`, sorted by name (the first is the primary one). A missing
/// dir is empty: the primary CNI may not have created it yet.
pub fn conf_files(dir: &Path) -> Result<Vec<PathBuf>, ConfError> {
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(source) => {
            return Err(ConfError::ListDir {
                dir: dir.to_path_buf(),
                source,
            });
        }
    };
    let mut files: Vec<PathBuf> = entries
        .filter_map(Result::ok)
        .filter(|e| e.file_type().is_ok_and(|t| t.is_file() || t.is_symlink()))
        .filter(|e| e.file_name().to_str().is_some_and(is_conf_name))
        .map(|e| e.path())
        .collect();
    files.sort();
    Ok(files)
}

/// A file's text, refusing anything too large to be a config.
pub fn read_conf(file: &Path) -> Result<String, ConfError> {
    use std::io::Read;
    let read_err = |source| ConfError::Read {
        file: file.to_path_buf(),
        source,
    };
    let f = std::fs::File::open(file).map_err(read_err)?;
    let mut text = String::new();
    f.take(MAX_CONF_BYTES + 1)
        .read_to_string(&mut text)
        .map_err(read_err)?;
    if text.len() as u64 > MAX_CONF_BYTES {
        return Err(ConfError::Malformed {
            file: file.to_path_buf(),
            why: format!("larger than {MAX_CONF_BYTES} bytes"),
        });
    }
    Ok(text)
}

/// A config as the runtime reads it.
enum Parsed {
    /// A `.conflist`: `plugins` is the chain.
    List(Map<String, Value>),
    /// A single plugin's `.conf`.
    Single(Map<String, Value>),
}

fn parse(file: &Path, text: &str) -> Result<Parsed, ConfError> {
    let bad = |why: String| ConfError::Malformed {
        file: file.to_path_buf(),
        why,
    };
    let v: Value = serde_json::from_str(text).map_err(|e| bad(format!("not JSON: {e}")))?;
    let Value::Object(obj) = v else {
        return Err(bad("not a JSON object".into()));
    };
    if !obj.get("cniVersion").is_some_and(Value::is_string) {
        return Err(bad("no string cniVersion".into()));
    }
    match obj.get("plugins") {
        Some(Value::Array(plugins)) => {
            if plugins.is_empty() {
                return Err(bad("plugins is empty".into()));
            }
            if !plugins
                .iter()
                .all(|p| p.get("type").is_some_and(Value::is_string))
            {
                return Err(bad("a plugin in plugins has no string type".into()));
            }
            Ok(Parsed::List(obj))
        }
        Some(_) => Err(bad("plugins is not a list".into())),
        None if obj.get("type").is_some_and(Value::is_string) => Ok(Parsed::Single(obj)),
        None => Err(bad("neither plugins nor a type".into())),
    }
}

fn is_ours(p: &Value) -> bool {
    p.get("type").and_then(Value::as_str) == Some(PLUGIN_TYPE)
}

/// What [`with_entry`] decided.
#[derive(Debug, PartialEq)]
pub enum Insert {
    /// Our entry already is the chain's last, exactly as wanted: nothing to write.
    Unchanged,
    /// Write this text; `wrapped` when a single-plugin `.conf` became a list (it must be
    /// written under a `.conflist` name and the `.conf` removed).
    Write { text: String, wrapped: bool },
}

/// `text` (the primary config) with `entry` as the chain's last plugin and no other entry of
/// ours. A `.conf` becomes a list with the same `cniVersion` and `name`.
pub fn with_entry(file: &Path, text: &str, entry: &Value) -> Result<Insert, ConfError> {
    let (mut list, wrapped) = match parse(file, text)? {
        Parsed::List(l) => (l, false),
        Parsed::Single(mut one) => {
            let mut list = Map::new();
            for key in ["cniVersion", "name"] {
                if let Some(v) = one.remove(key) {
                    list.insert(key.into(), v);
                }
            }
            list.insert("plugins".into(), Value::Array(vec![Value::Object(one)]));
            (list, true)
        }
    };
    let Some(Value::Array(plugins)) = list.get_mut("plugins") else {
        // parse() guarantees a list; a wrapped single always has one.
        return Err(ConfError::Malformed {
            file: file.to_path_buf(),
            why: "plugins is not a list".into(),
        });
    };
    if !wrapped
        && plugins.last() == Some(entry)
        && plugins.iter().filter(|p| is_ours(p)).count() == 1
    {
        return Ok(Insert::Unchanged);
    }
    plugins.retain(|p| !is_ours(p));
    if plugins.is_empty() {
        return Err(ConfError::Malformed {
            file: file.to_path_buf(),
            why: format!("its only plugin is {PLUGIN_TYPE}: there is no primary CNI to chain to"),
        });
    }
    plugins.push(entry.clone());
    Ok(Insert::Write {
        text: render(&list),
        wrapped,
    })
}

/// `text` without any entry of ours, or `None` when it has none (or is not ours to edit).
pub fn without_entry(file: &Path, text: &str) -> Result<Option<String>, ConfError> {
    let Parsed::List(mut list) = parse(file, text)? else {
        return Ok(None);
    };
    let Some(Value::Array(plugins)) = list.get_mut("plugins") else {
        return Ok(None);
    };
    if !plugins.iter().any(is_ours) {
        return Ok(None);
    }
    plugins.retain(|p| !is_ours(p));
    Ok(Some(render(&list)))
}

fn render(list: &Map<String, Value>) -> String {
    // Maps of serde_json values always serialize.
    let mut s = serde_json::to_string_pretty(list).unwrap_or_default();
    s.push('\n');
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn entry() -> Value {
        json!({"type": PLUGIN_TYPE, "agent_socket": "/s"})
    }
    const F: &str = "/x/10-a.conflist";

    #[test]
    fn names_the_runtime_loads() {
        assert!(is_conf_name("10-a.conf"));
        assert!(is_conf_name("10-a.conflist"));
        assert!(is_conf_name("a.json"));
        assert!(!is_conf_name(".conf"));
        assert!(!is_conf_name("10-a.conf.bak"));
        assert!(!is_conf_name(".10-a.conflist.mesh-cni-tmp"));
    }

    #[test]
    fn appends_last_once_and_is_idempotent() {
        let text = json!({"cniVersion": "1.0.0", "name": "k", "plugins": [
            {"type": "bridge"}, {"type": PLUGIN_TYPE, "old": true}, {"type": "portmap"}]})
        .to_string();
        let Insert::Write { text, wrapped } = with_entry(F.as_ref(), &text, &entry()).unwrap()
        else {
            panic!("expected a write")
        };
        assert!(!wrapped);
        let v: Value = serde_json::from_str(&text).unwrap();
        assert_eq!(
            v["plugins"],
            json!([{"type": "bridge"}, {"type": "portmap"}, entry()])
        );
        assert_eq!(
            with_entry(F.as_ref(), &text, &entry()).unwrap(),
            Insert::Unchanged
        );
        let back = without_entry(F.as_ref(), &text).unwrap().unwrap();
        let back: Value = serde_json::from_str(&back).unwrap();
        assert_eq!(
            back["plugins"],
            json!([{"type": "bridge"}, {"type": "portmap"}])
        );
        assert_eq!(without_entry(F.as_ref(), &back.to_string()).unwrap(), None);
    }

    #[test]
    fn malformed_is_refused() {
        for text in [
            "{",
            "[]",
            r#"{"plugins":[{"type":"a"}]}"#,
            r#"{"cniVersion":"1.0.0","plugins":{}}"#,
            r#"{"cniVersion":"1.0.0","plugins":[]}"#,
            r#"{"cniVersion":"1.0.0","plugins":[{"type":"mesh-cni"}]}"#,
            r#"{"cniVersion":"1.0.0","plugins":[{"x":1}]}"#,
            r#"{"cniVersion":"1.0.0"}"#,
        ] {
            assert!(
                matches!(
                    with_entry(F.as_ref(), text, &entry()),
                    Err(ConfError::Malformed { .. })
                ),
                "{text}"
            );
        }
    }
}
