//! The manifests compiled into meshctl (`src/rendered/*.yaml`) are exactly what
//! `kubectl kustomize` renders from `manifests/` today. When this fails, refresh them:
//! `MESHCTL_BLESS=1 cargo test -p meshctl --test rendered` (or by hand:
//! `kubectl kustomize manifests/overlays/dev > meshctl/src/rendered/dev.yaml`, likewise `ha`,
//! and `kubectl kustomize manifests/crds > meshctl/src/rendered/crds.yaml`).

use std::path::Path;
use std::process::Command;

#[test]
fn built_in_manifests_are_the_rendered_kustomizations() {
    let crate_dir = Path::new(env!("CARGO_MANIFEST_DIR"));
    let manifests = crate_dir.join("../manifests");
    let bless = std::env::var_os("MESHCTL_BLESS").is_some();
    let mut stale = Vec::new();
    for (dir, file) in [
        ("overlays/dev", "dev.yaml"),
        ("overlays/ha", "ha.yaml"),
        ("crds", "crds.yaml"),
    ] {
        let out = Command::new("kubectl")
            .arg("kustomize")
            .arg(manifests.join(dir))
            .output()
            .expect("kubectl (with kustomize) must be installed to check the built-in manifests");
        assert!(
            out.status.success(),
            "kubectl kustomize {dir}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let path = crate_dir.join("src/rendered").join(file);
        let checked_in = std::fs::read(&path).unwrap_or_default();
        if checked_in != out.stdout {
            if bless {
                std::fs::write(&path, &out.stdout).unwrap();
            } else {
                stale.push(format!("src/rendered/{file} (from manifests/{dir})"));
            }
        }
    }
    assert!(
        stale.is_empty(),
        "stale built-in manifests: {}; refresh with MESHCTL_BLESS=1 cargo test -p meshctl --test rendered",
        stale.join(", ")
    );
}
