//! CPU priority of background threads: work that can wait (the store's writes) runs at a
//! lower priority than the front end, so that the kernel gives the front end the cores first
//! during a burst and the background work the cores that are idle.

/// The nice value background threads take: the kernel weighs a thread at nice 10 about a
/// tenth of one at 0, so it still gets a share under full contention and never starves.
pub const BACKGROUND_NICE: i32 = 10;

/// Lowers the calling thread's CPU priority to [`BACKGROUND_NICE`] (on Linux a thread's nice
/// value is its own). Raising it back would need a privilege, so call it only on a thread that
/// does background work for good. Elsewhere, or if refused, nothing changes.
pub fn lower_this_thread() {
    #[cfg(target_os = "linux")]
    if let Err(e) =
        rustix::process::setpriority_process(Some(rustix::thread::gettid()), BACKGROUND_NICE)
    {
        tracing::debug!(error = %e, "could not lower a background thread's priority");
    }
}

#[cfg(all(test, target_os = "linux"))]
mod tests {
    #[test]
    fn a_background_thread_runs_at_the_lower_priority() {
        let nice = std::thread::spawn(|| {
            super::lower_this_thread();
            rustix::process::getpriority_process(Some(rustix::thread::gettid()))
        })
        .join()
        .expect("thread")
        .expect("getpriority");
        assert_eq!(nice, super::BACKGROUND_NICE);
        let here = rustix::process::getpriority_process(Some(rustix::thread::gettid()));
        assert_ne!(here.ok(), Some(super::BACKGROUND_NICE), "only that thread");
    }
}
