//! Wiring: [`build`] turns a [`Config`] into a running [`App`] (meshd connection, capture,
//! config subscription, policy, certificates, admin listeners, pod manager); [`App::run`]
//! serves until told to stop, then drains. The binary and the tests start ztunnel the same
//! way. Owns no traffic path and no logging setup (that is `main`'s: one per process).

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use dataplane::record_encryption::RecordEncryption;
use meshcore::hbone::{Pool, PoolSettings};
use meshcore::policy::{DecisionCache, PolicySet};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tracing::{error, info, warn};

use crate::admin::{self, AdminState, SetLogLevelFn};
use crate::capture::Capture;
use crate::certs::CertManager;
use crate::limits::{Admission, Limits};
use crate::meshd::Meshd;
use crate::metrics::Metrics;
use crate::pods::OnExit;
use crate::policy::LiveConns;
use crate::proxy::Ctx;
use crate::settings::Config;
use crate::supervise::Supervisor;

use crate::{config, dump, netns, pods, policy};

/// Process-wide setup, once, on the main thread before any runtime thread exists: the
/// open-files limit, the host network namespace every socket-making thread returns to, the TLS
/// crypto provider, and malloc's thresholds.
pub fn prepare() -> anyhow::Result<()> {
    dataplane::memory::configure();
    raise_fd_limit();
    netns::init_host_netns().context("reading this process's network namespace")?;
    meshcore::tls::install_crypto_provider();
    Ok(())
}

/// Every proxied connection costs ztunnel two or three fds, and the usual soft limit (1024)
/// would cap a node at a few hundred connections; [`crate::limits::Limits`] sizes the node's
/// connection caps from what this sets. Raised "as needed": with CAP_SYS_RESOURCE (root) both
/// limits go up to [`FD_LIMIT_TARGET`] (capped by `fs.nr_open`, never lowered), which is what a
/// container gets from containerd's default; without it, the soft limit goes up to the hard one,
/// as Istio's ztunnel does. Failure is logged, not fatal.
fn raise_fd_limit() {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let (soft, hard) = match getrlimit(Resource::RLIMIT_NOFILE) {
        Ok(limits) => limits,
        Err(e) => {
            warn!(error = %e, "cannot read the open-files limit");
            return;
        }
    };
    let target = fd_limit_target(hard, nr_open());
    if target > hard {
        match setrlimit(Resource::RLIMIT_NOFILE, target, target) {
            Ok(()) => {
                info!(
                    from_soft = soft,
                    from_hard = hard,
                    to = target,
                    "raised the open-files limit"
                );
                return;
            }
            // EPERM without CAP_SYS_RESOURCE: the hard limit is all we may have.
            Err(e) => info!(hard, target, error = %e, "cannot raise the hard open-files limit"),
        }
    }
    if soft < hard {
        match setrlimit(Resource::RLIMIT_NOFILE, hard, hard) {
            Ok(()) => info!(from = soft, to = hard, "raised the open-files limit"),
            Err(e) => warn!(soft, hard, error = %e, "cannot raise the open-files limit"),
        }
    } else {
        info!(limit = soft, "open-files limit kept");
    }
}

/// What a privileged ztunnel asks for: 2^20 fds, as many as Kubernetes nodes commonly give a
/// container; the connection caps of [`crate::limits::Limits`] follow from it (40%: 419,430
/// connections, 104,857 per source).
const FD_LIMIT_TARGET: u64 = 1 << 20;

/// The hard limit to ask for: [`FD_LIMIT_TARGET`], no more than the kernel allows a process
/// (`fs.nr_open`, when known) and never below the present hard limit.
fn fd_limit_target(hard: u64, nr_open: Option<u64>) -> u64 {
    let ceiling = nr_open.map_or(FD_LIMIT_TARGET, |n| n.min(FD_LIMIT_TARGET));
    ceiling.max(hard)
}

/// `fs.nr_open`: the largest RLIMIT_NOFILE the kernel accepts.
fn nr_open() -> Option<u64> {
    std::fs::read_to_string("/proc/sys/fs/nr_open")
        .ok()?
        .trim()
        .parse()
        .ok()
}

/// A started ztunnel: its background tasks, admin listeners and pod manager are running.
pub struct App {
    config: Config,
    ctx: Arc<Ctx>,
    tasks: Supervisor,
    pods: JoinHandle<()>,
    shutdown: watch::Sender<bool>,
    on_exit: OnExit,
}

/// How [`App::run`] ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    /// Stopped on request and drained.
    Stopped,
    /// A background task or the pod manager ended: the process must exit at once with this
    /// code, as a crash does (capture stays; pods fail closed until a restart).
    Fatal(i32),
}

/// Starts ztunnel. `set_log_level` serves the admin `/logging` endpoint.
pub async fn build(config: Config, set_log_level: SetLogLevelFn) -> anyhow::Result<App> {
    let meshd_tls = config
        .meshd_ca
        .clone()
        .map(|ca_file| crate::meshd::MeshdTls {
            ca_file,
            server_name: config.meshd_name.clone(),
        });
    // The token file is read again when it changes (kubelet rotates projected tokens).
    let meshd = Meshd::with_token_file(&config.meshd, &config.token_file, meshd_tls)?;
    // Capture first: an explicit mode that cannot run stops us before anything else starts.
    let instance = crate::ebpf::Instance::new(&config.node, config.ebpf_instance.as_deref())?;
    let capture = Capture::new(config.capture, &instance, config.fast_path, config.ebpf_log)
        .context("setting up capture")?;
    if config.fast_path && capture.ebpf().is_none_or(|e| !e.fast_path()) {
        warn!(capture = %capture.mode(), "--fast-path needs eBPF capture; same-node traffic uses HBONE");
    }
    if let Some(reason) = capture.fallback_reason() {
        warn!(requested = %config.capture, effective = %capture.mode(), %reason, "capture fell back");
    }
    let spans = match &config.trace_collector {
        Some(collector) => Some(dataplane::conn_result::ConnSpans {
            spans: dataplane::spans::Spans::start(&dataplane::spans::ExportSettings {
                collector: collector.clone(),
                service_name: format!("ztunnel.{}", config.node),
                flush_every: Duration::from_secs(1),
            })
            .context("--trace-collector")?,
            sampling: (config.trace_sampling / 100.0).clamp(0.0, 1.0),
        }),
        None => None,
    };
    // Sized from the open-files limit `prepare` raised, unless the flags set them.
    let limits = Limits::default()
        .with_connection_caps(config.max_connections, config.max_connections_per_source);
    info!(
        max_connections = limits.max_connections,
        max_connections_per_source = limits.max_connections_per_source,
        max_handshakes = limits.max_handshakes,
        max_handshakes_per_source = limits.max_handshakes_per_source,
        "connection caps"
    );
    let kernel_tls = RecordEncryption::probe(config.kernel_tls);
    let metrics = Metrics::new();
    metrics.set_capture_mode(&capture.mode().to_string());
    let (config_tx, config_rx) = watch::channel(None);
    let mut tasks = Supervisor::default();
    tasks.spawn(
        "config",
        config::run(
            meshd.clone(),
            meshcore::proto::config::SubscribeRequest {
                node: config.node.clone(),
                waypoint: String::new(),
            },
            Duration::from_secs(config.mass_removal_hold),
            config_tx,
        ),
    );
    let (policies_tx, policies_rx) =
        watch::channel(Arc::new(PolicySet::compile([], &config.root_namespace)));
    let live = Arc::new(LiveConns::default());
    let decisions = Arc::new(DecisionCache::new(65536));
    tasks.spawn(
        "policy",
        policy::run(
            config_rx.clone(),
            config.root_namespace.clone(),
            policies_tx,
            live.clone(),
            decisions.clone(),
        ),
    );
    let certs = CertManager::new(meshd, metrics.clone());
    tasks.spawn(
        "trust-bundle",
        trust_bundle_watch(config_rx.clone(), certs.clone()),
    );
    let ctx = Arc::new(Ctx {
        node: config.node.clone(),
        config: config_rx,
        certs,
        // A connection is full when the peer would refuse more streams: Istio's HBONE servers
        // (and ours) advertise 200 concurrent streams.
        pool: Pool::new(PoolSettings {
            max_streams_per_conn: 200,
            kernel_tls: kernel_tls.in_use(),
            ..PoolSettings::default()
        }),
        capture,
        kernel_tls,
        policies: policies_rx,
        decisions,
        live,
        routed: Arc::default(),
        metrics: metrics.clone(),
        enrolled: Default::default(),
        local_pods: Default::default(),
        drain: Default::default(),
        admission: Admission::new(&limits),
        waypoints: crate::outbound::Waypoints::new(config.missing_waypoint),
        spans,
        enrollment: match config.enrollment {
            pods::EnrollmentSource::Config => pods::SourceStatus::Config,
            pods::EnrollmentSource::Zds => pods::SourceStatus::zds(config.zds_socket.clone()),
        },
    });
    let admin_state = Arc::new(AdminState {
        metrics,
        ready: Box::new({
            let ctx = ctx.clone();
            move || dump::ready(&ctx)
        }),
        config_dump: Box::new({
            let ctx = ctx.clone();
            move || dump::config_dump(&ctx)
        }),
        set_log_level,
    });
    let bound = admin::bind(
        admin_state,
        config.admin_addr,
        config.metrics_addr,
        config.ready_addr,
    )
    .await?;
    tasks.spawn("admin", bound.run());
    let (shutdown, shutdown_rx) = watch::channel(false);
    let on_exit = if config.unenroll_on_exit {
        OnExit::Unenroll
    } else {
        OnExit::KeepCapture
    };
    let pods = tokio::spawn(pods::run(
        ctx.clone(),
        shutdown_rx,
        on_exit,
        config.trust_domain.clone(),
    ));
    // Start-up (the eBPF load parses the kernel's BTF) freed more than ztunnel keeps; give it
    // back now, and what load frees from then on, periodically.
    tasks.spawn(
        "memory",
        dataplane::memory::trim_every(dataplane::memory::TRIM_PERIOD),
    );
    info!(node = %config.node, meshd = %config.meshd, capture = %ctx.capture.mode(), enrollment = %config.enrollment, admin = %config.admin_addr, metrics = %config.metrics_addr, "ztunnel started");
    Ok(App {
        config,
        ctx,
        tasks,
        pods,
        shutdown,
        on_exit,
    })
}

impl App {
    /// Serves until `stop` completes, then closes the listeners, drains the connections (up
    /// to `--drain-timeout`) and, with `--unenroll-on-exit`, removes capture.
    pub async fn run(self, stop: impl Future<Output = ()>) -> Exit {
        let App {
            config,
            ctx,
            mut tasks,
            mut pods,
            shutdown,
            on_exit,
        } = self;
        tokio::select! {
            () = stop => {},
            // Fail closed: a dead task would leave stale policy or config in force forever. Exit
            // at once, as a crash does; capture stays and pods fail closed until a restart.
            exit = tasks.first_exit() => {
                error!(%exit, "a background task ended; exiting so ztunnel is restarted (capture stays)");
                return crash(tasks, shutdown, pods);
            }
            r = &mut pods => {
                error!(result = ?r.map_err(|e| e.to_string()), "the pod manager ended; exiting so ztunnel is restarted (capture stays)");
                return crash(tasks, shutdown, pods);
            }
        }
        info!(?on_exit, "shutting down");
        let _ = shutdown.send(true);
        if let Err(e) = pods.await {
            error!(error = %e, "pod manager ended abnormally");
        }
        // Listeners are closed (a next ztunnel takes new connections); finish what we serve.
        let open = ctx.drain.active();
        if open > 0 {
            info!(
                connections = open,
                timeout_s = config.drain_timeout,
                "draining"
            );
        }
        let left = ctx
            .drain
            .stop(Duration::from_secs(config.drain_timeout))
            .await;
        if left > 0 {
            warn!(
                connections = left,
                "drain timeout: closing the connections still open"
            );
        }
        if on_exit == OnExit::Unenroll {
            ctx.capture.shutdown();
        } else {
            ctx.capture.release_if_idle();
        }
        info!("ztunnel stopped");
        Exit::Stopped
    }
}

/// A fatal exit must look like a crash: dropping the shutdown sender or the tasks would read as
/// a stop to the pod manager (which could then unenroll), so they are leaked until the caller
/// exits the process.
fn crash(tasks: Supervisor, shutdown: watch::Sender<bool>, pods: JoinHandle<()>) -> Exit {
    std::mem::forget((tasks, shutdown, pods));
    Exit::Fatal(70)
}

/// When meshd's trust bundle changes (a root added or retired), fetch fresh certificates so
/// they carry the new bundle; connections in flight are untouched.
async fn trust_bundle_watch(mut config: config::ConfigRx, certs: Arc<CertManager>) {
    let mut last: Option<Vec<String>> = None;
    loop {
        let roots = config
            .borrow_and_update()
            .as_ref()
            .and_then(|s| s.trust_bundle().map(|t| t.roots_pem.clone()));
        if roots.is_some() && last.is_some() && roots != last {
            info!(
                roots = roots.as_ref().map_or(0, Vec::len),
                "trust bundle changed; renewing certificates"
            );
            certs.refresh_all();
        }
        if roots.is_some() {
            last = roots;
        }
        if config.changed().await.is_err() {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fd_limit_target_is_capped_by_nr_open_and_never_lowers_the_hard_limit() {
        assert_eq!(fd_limit_target(20_000, Some(1 << 20)), 1 << 20);
        assert_eq!(fd_limit_target(20_000, Some(1 << 30)), FD_LIMIT_TARGET);
        assert_eq!(fd_limit_target(20_000, Some(65_536)), 65_536);
        assert_eq!(fd_limit_target(20_000, None), FD_LIMIT_TARGET);
        // A hard limit already above the target is kept, not lowered.
        assert_eq!(fd_limit_target(1 << 21, Some(1 << 22)), 1 << 21);
        // So is one above nr_open (it was set before nr_open was lowered).
        assert_eq!(fd_limit_target(100_000, Some(50_000)), 100_000);
    }
}
