//! The config subscription: keeps a local copy of what meshd says, through meshd outages.
//!
//! Owns the stream, its reconnect backoff, and publishing each new [`ConfigStore`] on a watch
//! channel. If meshd goes away, the last config stays in force and we reconnect with capped,
//! jittered exponential backoff. Does not act on the config.

use std::sync::Arc;
use std::time::Duration;

use meshcore::proto::config::SubscribeRequest;
use meshcore::proto::config::config_service_client::ConfigServiceClient;
use meshcore::store::ConfigStore;
use rand::Rng;
use tokio::sync::watch;
use tracing::{info, warn};

use crate::meshd::Meshd;

/// The latest config; `None` until the first snapshot arrives.
pub type ConfigRx = watch::Receiver<Option<Arc<ConfigStore>>>;

/// Subscribes forever. Returns only when every receiver is gone.
pub async fn run(meshd: Meshd, node: String, tx: watch::Sender<Option<Arc<ConfigStore>>>) {
    let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(5));
    loop {
        match subscribe_once(&meshd, &node, &tx, &mut backoff).await {
            Ok(()) => warn!(%node, "config stream from meshd ended; keeping the last config"),
            Err(status) => {
                warn!(%node, code = ?status.code(), message = status.message(), "config stream from meshd failed; keeping the last config")
            }
        }
        if tx.is_closed() {
            return;
        }
        tokio::time::sleep(backoff.next_delay()).await;
    }
}

async fn subscribe_once(
    meshd: &Meshd,
    node: &str,
    tx: &watch::Sender<Option<Arc<ConfigStore>>>,
    backoff: &mut Backoff,
) -> Result<(), tonic::Status> {
    let mut client =
        ConfigServiceClient::new(meshd.channel.clone()).max_decoding_message_size(256 << 20);
    let mut stream = client
        .subscribe(meshd.request(SubscribeRequest {
            node: node.to_string(),
        }))
        .await?
        .into_inner();
    while let Some(update) = stream.message().await? {
        let mut store = tx.borrow().as_deref().cloned().unwrap_or_default();
        let snapshot = update.snapshot;
        store.apply(update);
        if snapshot {
            info!(
                version = store.version,
                workloads = store.workloads().count(),
                services = store.services().count(),
                "config snapshot from meshd"
            );
            backoff.reset();
        }
        tx.send_replace(Some(Arc::new(store)));
    }
    Ok(())
}

/// Capped exponential backoff with full jitter.
pub struct Backoff {
    base: Duration,
    cap: Duration,
    attempt: u32,
}

impl Backoff {
    pub fn new(base: Duration, cap: Duration) -> Backoff {
        Backoff {
            base,
            cap,
            attempt: 0,
        }
    }

    pub fn next_delay(&mut self) -> Duration {
        let ceiling = self
            .base
            .saturating_mul(1 << self.attempt.min(16))
            .min(self.cap);
        self.attempt += 1;
        let ms =
            rand::rng().random_range(ceiling.as_millis() as u64 / 2..=ceiling.as_millis() as u64);
        Duration::from_millis(ms)
    }

    pub fn reset(&mut self) {
        self.attempt = 0;
    }
}
