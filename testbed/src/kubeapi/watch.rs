//! Watch streams: replay from a resourceVersion (or the current state as synthetic ADDED),
//! then live events, filtered by namespace and selectors with selector transitions turned
//! into ADDED/DELETED; bookmarks, `timeoutSeconds`, the in-stream 410, and the
//! `drop_watches` hook. Reads the store under its lock; never writes it.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use bytes::Bytes;
use hyper::body::Frame;
use serde_json::{Value, json};
use tokio::sync::{broadcast, mpsc};

use super::errors::ApiErr;
use super::kinds::Kind;
use super::selector::Selector;
use super::server::{BodyError, Shared};
use super::store::{Event, EventType};

/// Open watches per server; beyond this a watch gets 429 (a leak in the code under test,
/// not a workload the double must carry).
pub(crate) const MAX_WATCHES: usize = 4096;

/// What a watch request asked for.
pub(crate) struct WatchReq {
    pub kind: Kind,
    pub version: String,
    pub namespace: Option<String>,
    pub selector: Selector,
    /// `None`: unset or "0" (start with the current state).
    pub rv: Option<u64>,
    pub send_initial: bool,
    pub bookmarks: bool,
    pub timeout: Option<Duration>,
}

type Chunk = Result<Frame<Bytes>, BodyError>;

/// Decrements the open-watch count when the stream task ends.
struct Slot(Arc<Shared>);
impl Drop for Slot {
    fn drop(&mut self) {
        self.0.watchers.fetch_sub(1, Ordering::SeqCst);
    }
}

impl WatchReq {
    fn line(&self, etype: &str, obj: &Value) -> Bytes {
        let mut obj = obj.clone();
        if etype != "ERROR" {
            obj["apiVersion"] = json!(self.kind.api_version(&self.version));
        }
        let mut s = json!({"type": etype, "object": obj}).to_string();
        s.push('\n');
        Bytes::from(s)
    }

    fn bookmark(&self, rv: u64, initial_end: bool) -> Bytes {
        let mut meta = json!({"resourceVersion": rv.to_string()});
        if initial_end {
            meta["annotations"] = json!({"k8s.io/initial-events-end": "true"});
        }
        let obj = json!({"kind": self.kind.kind, "apiVersion": self.kind.api_version(&self.version), "metadata": meta});
        self.line("BOOKMARK", &obj)
    }

    fn selects(&self, obj: &Value) -> bool {
        self.selector.matches(obj)
    }

    /// The line this event becomes for this watch, if any.
    fn translate(&self, ev: &Event) -> Option<Bytes> {
        if ev.key != self.kind.key() {
            return None;
        }
        if let Some(ns) = &self.namespace
            && *ns != ev.namespace
        {
            return None;
        }
        let now = self.selects(&ev.obj);
        let etype = match ev.etype {
            EventType::Added if now => "ADDED",
            EventType::Deleted if now => "DELETED",
            EventType::Modified => {
                let before = ev.old.as_ref().is_some_and(|o| self.selects(o));
                match (before, now) {
                    (true, true) => "MODIFIED",
                    (false, true) => "ADDED",
                    (true, false) => "DELETED",
                    (false, false) => return None,
                }
            }
            _ => return None,
        };
        Some(self.line(etype, &ev.obj))
    }
}

/// The stream's first lines and its live feed, taken atomically under the store lock.
fn begin(shared: &Shared, req: &WatchReq) -> (Vec<Bytes>, Option<broadcast::Receiver<Arc<Event>>>) {
    let st = shared.lock_state();
    let mut lines = Vec::new();
    match req.rv {
        Some(rv) if !req.send_initial => {
            if rv < st.horizon {
                let e = ApiErr::expired("The resourceVersion for the provided watch is too old.");
                lines.push(req.line("ERROR", &e.status()));
                return (lines, None);
            }
            lines.extend(st.events_after(rv).iter().filter_map(|e| req.translate(e)));
        }
        _ => {
            let ns = req.namespace.as_deref();
            for obj in st.list(&req.kind, ns) {
                if req.selects(obj) {
                    lines.push(req.line("ADDED", obj));
                }
            }
            if req.send_initial {
                lines.push(req.bookmark(st.rv, true));
            }
        }
    }
    (lines, Some(st.tx.subscribe()))
}

/// Starts a watch; the receiver feeds the chunked response body.
pub(crate) fn start(shared: Arc<Shared>, req: WatchReq) -> Result<mpsc::Receiver<Chunk>, ApiErr> {
    if shared.watchers.fetch_add(1, Ordering::SeqCst) >= MAX_WATCHES {
        shared.watchers.fetch_sub(1, Ordering::SeqCst);
        return Err(ApiErr::new(429, "TooManyRequests", "too many open watches"));
    }
    let slot = Slot(shared.clone());
    // Subscribed before the first line is taken: a drop_watches from here on reaches this
    // watch, so none can slip between its start and its live feed.
    let drops = shared.drop_tx.subscribe();
    let (initial, live) = begin(&shared, &req);
    let (tx, rx) = mpsc::channel::<Chunk>(256);
    tokio::spawn(async move {
        let _slot = slot;
        stream(shared, req, initial, live, drops, tx).await;
    });
    Ok(rx)
}

async fn stream(
    shared: Arc<Shared>,
    req: WatchReq,
    initial: Vec<Bytes>,
    live: Option<broadcast::Receiver<Arc<Event>>>,
    mut drops: tokio::sync::watch::Receiver<(u64, bool)>,
    tx: mpsc::Sender<Chunk>,
) {
    // Dropped while it started: its first lines may be newer than the drop.
    if drops.has_changed().unwrap_or(true) {
        return end_dropped(&mut drops, &tx).await;
    }
    for line in initial {
        if tx.send(Ok(Frame::data(line))).await.is_err() {
            return;
        }
    }
    let Some(mut live) = live else {
        return;
    };
    // A timeout too large to add to now is no timeout.
    let deadline = req
        .timeout
        .and_then(|t| tokio::time::Instant::now().checked_add(t));
    let period = shared.opts.bookmark_interval.max(Duration::from_millis(10));
    let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
    // A dropped watch sends nothing after the drop: `drop_watches` is followed at once by
    // changes the test means the client to miss (and learn of only by re-listing). So the
    // drop is checked first, and again before anything is sent: an event or bookmark made
    // after the drop can only be seen after the drop is visible.
    loop {
        tokio::select! {
            biased;
            _ = drops.changed() => return end_dropped(&mut drops, &tx).await,
            ev = live.recv() => match ev {
                Ok(ev) => {
                    if drops.has_changed().unwrap_or(true) {
                        return end_dropped(&mut drops, &tx).await;
                    }
                    if let Some(line) = req.translate(&ev)
                        && tx.send(Ok(Frame::data(line))).await.is_err()
                    {
                        return;
                    }
                }
                // Lagged or closed: end cleanly; the client resumes from its last RV.
                Err(_) => return,
            },
            _ = tick.tick(), if req.bookmarks => {
                if !send_bookmark(&shared, &req, &mut live, &drops, &tx).await {
                    return end_dropped(&mut drops, &tx).await;
                }
            }
            _ = sleep_until(deadline) => {
                if req.bookmarks && !send_bookmark(&shared, &req, &mut live, &drops, &tx).await {
                    return end_dropped(&mut drops, &tx).await;
                }
                return;
            }
            _ = tx.closed() => return,
        }
    }
}

/// Ends a watch that `drop_watches` dropped (or whose stream is done): cleanly, or cut.
async fn end_dropped(
    drops: &mut tokio::sync::watch::Receiver<(u64, bool)>,
    tx: &mpsc::Sender<Chunk>,
) {
    let clean = drops.has_changed().is_err() || drops.borrow_and_update().1;
    if !clean {
        let _ = tx
            .send(Err("watch cut by drop_watches(false)".into()))
            .await;
    }
}

async fn sleep_until(deadline: Option<tokio::time::Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}

/// Sends events still queued for this watch, then a BOOKMARK at the current RV: under the
/// store lock no event at or below that RV can still be on its way. False when the watch
/// must end: the client is gone, or the watch was dropped (checked under the lock, so the
/// bookmark never carries a version made after the drop).
async fn send_bookmark(
    shared: &Shared,
    req: &WatchReq,
    live: &mut broadcast::Receiver<Arc<Event>>,
    drops: &tokio::sync::watch::Receiver<(u64, bool)>,
    tx: &mpsc::Sender<Chunk>,
) -> bool {
    let mut lines = Vec::new();
    {
        let st = shared.lock_state();
        if drops.has_changed().unwrap_or(true) {
            return false;
        }
        loop {
            match live.try_recv() {
                Ok(ev) => lines.extend(req.translate(&ev)),
                Err(broadcast::error::TryRecvError::Empty) => break,
                Err(_) => return false,
            }
        }
        lines.push(req.bookmark(st.rv, false));
    }
    for line in lines {
        if tx.send(Ok(Frame::data(line))).await.is_err() {
            return false;
        }
    }
    true
}
