//! The front end's threads: one single-threaded runtime per core, each serving the connections
//! handed to it, whole.
//!
//! On tokio's multi-threaded runtime a worker that wakes for a request wakes an idle one to
//! share the work, and the two hand requests back and forth: at moderate rates, where every
//! request finds the workers parked, those wake-ups cost more than the request (measured in the
//! README, *Performance*). A connection here stays on the thread it was given, as nginx's
//! workers keep theirs: one wake-up per readiness, no stealing. Connections are dealt out in
//! turn, so many connections spread evenly; a few heavy ones may load one core more.

use std::sync::atomic::{AtomicUsize, Ordering};
use tokio::runtime::Handle;

pub struct Cores {
    handles: Vec<Handle>,
    next: AtomicUsize,
    /// Dropped with the value: that ends the threads' runtimes (without waiting for them).
    stops: Vec<tokio::sync::oneshot::Sender<()>>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl Cores {
    /// Starts `n` threads (at least one) named `name`, each running its own runtime (its
    /// blocking threads are named `name` too).
    pub fn start(n: usize, name: &str) -> std::io::Result<Self> {
        let mut handles = Vec::new();
        let mut stops = Vec::new();
        let mut threads = Vec::new();
        for _ in 0..n.max(1) {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .thread_name(name)
                .build()?;
            handles.push(runtime.handle().clone());
            let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
            stops.push(stop);
            threads.push(
                std::thread::Builder::new()
                    .name(name.to_string())
                    .spawn(move || {
                        let _ = runtime.block_on(stopped);
                    })?,
            );
        }
        Ok(Self {
            handles,
            next: AtomicUsize::new(0),
            stops,
            threads,
        })
    }

    /// The runtime whose turn it is.
    pub fn next(&self) -> &Handle {
        let i = self.next.fetch_add(1, Ordering::Relaxed) % self.handles.len();
        &self.handles[i]
    }

    /// Ends the runtimes (what still runs on them is dropped) and waits for their threads.
    pub fn stop(self) {
        let Self { stops, threads, .. } = self;
        drop(stops);
        for thread in threads {
            let _ = thread.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;
    use std::thread::ThreadId;

    /// Where a task handed to `handle` runs, and where a task it spawns runs.
    async fn threads_of(handle: &Handle) -> (ThreadId, ThreadId) {
        handle
            .spawn(async {
                let spawned = tokio::spawn(async { std::thread::current().id() });
                (
                    std::thread::current().id(),
                    spawned.await.expect("the spawned task"),
                )
            })
            .await
            .expect("the task")
    }

    #[tokio::test]
    async fn connections_are_dealt_out_in_turn_and_stay_on_their_thread() {
        let cores = Cores::start(3, "test-core").expect("threads");
        let mut served: HashMap<ThreadId, usize> = HashMap::new();
        for _ in 0..9 {
            let (ran, spawned) = threads_of(cores.next()).await;
            assert_eq!(ran, spawned, "what a connection starts runs on its thread");
            assert_ne!(ran, std::thread::current().id());
            *served.entry(ran).or_default() += 1;
        }
        assert_eq!(served.len(), 3, "{served:?}");
        assert!(served.values().all(|&n| n == 3), "{served:?}");
    }

    #[tokio::test]
    async fn stopping_ends_the_threads_and_drops_what_still_runs() {
        let cores = Cores::start(2, "test-core").expect("threads");
        let (dropped_tx, dropped_rx) = tokio::sync::oneshot::channel::<()>();
        cores.next().spawn(async move {
            let _guard = dropped_tx; // dropped with the task
            std::future::pending::<()>().await;
        });
        let _ = threads_of(cores.next()).await;
        // Waited for on a thread of its own, so that a stop that never ends fails the test.
        let (stopped_tx, stopped_rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            cores.stop();
            let _ = stopped_tx.send(());
        });
        stopped_rx
            .recv_timeout(std::time::Duration::from_secs(10))
            .expect("the threads end");
        assert!(dropped_rx.await.is_err(), "the pending task was dropped");
    }

    #[test]
    fn at_least_one_thread() {
        let cores = Cores::start(0, "test-core").expect("threads");
        assert_eq!(cores.handles.len(), 1);
    }
}
