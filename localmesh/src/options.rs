//! How a local mesh is brought up: [`MeshOptions`], [`Enrollment`] and their defaults (with
//! the environment overrides). Owns the knobs only; what they start is the other modules'.

/// How to bring the mesh up.
#[derive(Clone, Debug)]
pub struct MeshOptions {
    pub nodes: usize,
    pub ipv6: bool,
    pub trust_domain: String,
    /// meshd's `--cert-lifetime` (e.g. "24h", "10s").
    pub cert_lifetime: String,
    /// Extra `RUST_LOG` for mesh processes.
    pub log: String,
    /// ztunnel's `--capture` mode; `$MESH_CAPTURE` overrides the default.
    pub capture: String,
    /// ztunnel's `--fast-path` (same-node sockmap splice; eBPF capture only).
    pub fast_path: bool,
    /// ztunnel's `--unenroll-on-exit`: a graceful stop then removes capture from its pods
    /// (uninstall) instead of keeping them captured, failing closed (restart).
    pub unenroll_on_exit: bool,
    /// More ztunnel arguments (e.g. `--ebpf-log debug`).
    pub ztunnel_args: Vec<String>,
    /// More ztunnel environment (e.g. a test hook such as `ZTUNNEL_EBPF_NO_TAKE`), set on
    /// this mesh's ztunnels only, not on the test process every mesh inherits from.
    pub ztunnel_env: Vec<(String, String)>,
    /// Run meshd as on a real cluster: in node-0's network namespace, serving gRPC over TLS on
    /// its fabric address ([`MESHD_TLS_ADDR`](crate::MESHD_TLS_ADDR)), every ztunnel verifying
    /// it with `--meshd-ca` (the mesh root). Otherwise meshd listens on a root-only unix socket.
    pub meshd_tls: bool,
    /// API mode: meshd reads the Kubernetes API double (started with the mesh) instead of
    /// `config/`, and what local mode renders is written there (`api_mode`).
    pub api: bool,
    /// How ztunnel learns pods' network namespaces ([`Enrollment`]); `$MESH_ENROLLMENT`
    /// (`cni` or `config`) overrides the default, `cni`.
    pub enrollment: Enrollment,
    /// The agents rewrite the node's own connections to enrolled pods to the kubelet-probe
    /// source (`mesh-cni agent` without `--no-probe-snat`), as on Kubernetes. Off by default:
    /// local mode's kubelet probes from inside the pod, and tests use the node's netns as an
    /// outside client that STRICT must refuse.
    pub probe_snat: bool,
    /// API mode with CNI enrollment: each node's agent reads the double (`--view kube`, over
    /// the fabric, as its own mesh-cni pod with that ServiceAccount's token) instead of
    /// `config/`. Off by default, when API mode enrolls from meshd's config: local mode's pods
    /// have no cgroup of their own, so a Kube-view agent cannot find a running pod's netns in
    /// host /proc, and a pod whose namespace is labelled after it started is not enrolled
    /// (pods created in an ambient namespace are: their CNI ADD carries the netns).
    pub api_cni: bool,
    /// Run this ztunnel binary instead of the located one (`None`: [`Bins::ztunnel`]): the
    /// bench's same-run comparison against a previous build (`--baseline-bins`).
    ///
    /// [`Bins::ztunnel`]: crate::Bins::ztunnel
    pub ztunnel_bin: Option<std::path::PathBuf>,
}

/// How pods are enrolled with their node's ztunnel.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Enrollment {
    /// As on Kubernetes: the kubelet runs the node's CNI chain (our veth wiring, then
    /// `mesh-cni`) before a pod's apps start; each node's `mesh-cni agent` hands the pod's
    /// netns to ztunnel over ZDS (`ztunnel --enrollment zds`). A pod that cannot be enrolled
    /// does not start.
    Cni,
    /// The pre-CNI path: ztunnel enrolls the pods meshd's config says are captured, finding
    /// their netns from local mode's `mesh.local/netns` annotation (no agent, no plugin).
    Config,
}

impl Enrollment {
    /// `$MESH_ENROLLMENT`, else [`Enrollment::Cni`].
    pub fn from_env() -> Enrollment {
        match std::env::var("MESH_ENROLLMENT").as_deref() {
            Ok("config") => Enrollment::Config,
            _ => Enrollment::Cni,
        }
    }
}

impl Default for MeshOptions {
    fn default() -> Self {
        MeshOptions {
            nodes: 2,
            ipv6: true,
            trust_domain: "cluster.local".into(),
            cert_lifetime: "24h".into(),
            log: "info".into(),
            capture: std::env::var("MESH_CAPTURE").unwrap_or_else(|_| "ebpf".into()),
            fast_path: false,
            unenroll_on_exit: false,
            ztunnel_args: Vec::new(),
            ztunnel_env: Vec::new(),
            meshd_tls: false,
            probe_snat: false,
            api: false,
            api_cni: false,
            enrollment: Enrollment::from_env(),
            ztunnel_bin: None,
        }
    }
}
