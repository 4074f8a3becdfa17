//! The config-directory source as meshd runs it: what it publishes while the directory has a
//! fault. A published empty set would make every ztunnel unenroll every pod (audit H2).

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use meshd::local_source::LocalSource;
use meshd::resources::ResourceSet;
use tokio::sync::watch;

const POLL: Duration = Duration::from_millis(10);

fn ns(name: &str) -> String {
    format!("apiVersion: v1\nkind: Namespace\nmetadata: {{name: {name}}}\n")
}

fn names(set: &ResourceSet) -> BTreeSet<String> {
    set.namespaces.keys().cloned().collect()
}

/// Records every set the source publishes until it publishes one holding `want`.
async fn published_until(
    mut rx: watch::Receiver<Arc<ResourceSet>>,
    want: &str,
) -> Vec<BTreeSet<String>> {
    let mut seen = Vec::new();
    let wait = async {
        loop {
            rx.changed().await.expect("the source stopped");
            let set = names(&rx.borrow_and_update());
            let done = set.contains(want);
            seen.push(set);
            if done {
                break;
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(10), wait)
        .await
        .unwrap_or_else(|_| panic!("{want} was never published; saw {seen:?}"));
    seen
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_config_dir_outage_publishes_nothing() {
    let top = tempfile::tempdir().unwrap();
    let cfg = top.path().join("cfg");
    let away = top.path().join("cfg.away");
    std::fs::create_dir(&cfg).unwrap();
    std::fs::write(cfg.join("a.yaml"), ns("a")).unwrap();
    let (_source, rx) = LocalSource::start(&cfg, POLL).unwrap();
    assert_eq!(names(&rx.borrow()), BTreeSet::from(["a".to_string()]));
    let watcher = tokio::spawn(published_until(rx, "b"));
    // The outage itself: the directory renamed away for 30 polls (a deploy that swaps it,
    // an editor, an NFS hiccup), then back with one more file.
    std::fs::rename(&cfg, &away).unwrap();
    tokio::time::sleep(POLL * 30).await;
    std::fs::write(away.join("b.yaml"), ns("b")).unwrap();
    std::fs::rename(&away, &cfg).unwrap();
    let seen = watcher.await.unwrap();
    assert!(
        seen.iter().all(|s| s.contains("a")),
        "a set without namespace a was published during the outage: {seen:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_file_replaced_by_delete_and_create_never_drops_out() {
    // Polls are 40 ms (and a little) apart. Each cycle below has the file missing for 15 ms
    // and present for 100 ms, so a poll that sees it missing is followed by one that sees it
    // present however late a sleep wakes. A cycle is 115 ms, so the gaps drift 5 ms against
    // the polls each time and sweep a whole poll period within 8 cycles: some poll lands in a
    // gap, which is what used to drop the file. The sleeps shape the stimulus; the assertion
    // waits on what is published.
    let poll = Duration::from_millis(40);
    let dir = tempfile::tempdir().unwrap();
    let a = dir.path().join("a.yaml");
    std::fs::write(&a, ns("a")).unwrap();
    let (_source, rx) = LocalSource::start(dir.path(), poll).unwrap();
    let watcher = tokio::spawn(published_until(rx, "b"));
    // `rm a.yaml && cp new/a.yaml .`, a few times.
    for _ in 0..10 {
        std::fs::remove_file(&a).unwrap();
        tokio::time::sleep(Duration::from_millis(15)).await;
        std::fs::write(&a, ns("a")).unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    std::fs::write(dir.path().join("b.yaml"), ns("b")).unwrap();
    let seen = watcher.await.unwrap();
    assert!(
        seen.iter().all(|s| s.contains("a")),
        "namespace a dropped out while its file was being replaced: {seen:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_files_in_the_dir_leave_the_rest_applying() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("a.yaml"), ns("a")).unwrap();
    let (_source, rx) = LocalSource::start(dir.path(), POLL).unwrap();
    let watcher = tokio::spawn(published_until(rx, "b"));
    // An alias bomb (the audit's K=1000, J=200: 200 million nodes once expanded) carrying a
    // namespace of its own, then a good file after it in name order.
    let a = vec!["x"; 1000].join(",");
    let b = vec!["*a"; 1000].join(",");
    let z = vec!["*b"; 200].join(",");
    let bomb = format!("{}a: &a [{a}]\nb: &b [{b}]\nz: [{z}]\n", ns("bomb"));
    std::fs::write(dir.path().join("a-bomb.yaml"), bomb).unwrap();
    std::fs::write(dir.path().join("b.yaml"), ns("b")).unwrap();
    let seen = watcher.await.unwrap();
    let last = seen.last().unwrap();
    assert!(last.contains("a") && !last.contains("bomb"), "{seen:?}");
}
