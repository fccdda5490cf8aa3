//! CPU priority of background threads: work that can wait (processing, the store's writes)
//! runs at a lower priority than the front end, so that the kernel gives the front end the
//! cores first during a burst and the background work the cores that are idle.

use serde::Deserialize;
use std::sync::atomic::{AtomicU8, Ordering};

/// How background threads give way (`background_priority`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Background {
    /// Linux's `SCHED_IDLE`: the thread runs on cores nothing else wants, and a thread of any
    /// other policy that wakes takes its core at once. A burst then gets every core the front
    /// end can use, and processing catches up as soon as the load leaves a core idle. Right
    /// where nothing but the engine needs the machine.
    Idle,
    /// Nice 10: the kernel weighs the thread about a tenth of one at nice 0, so it keeps a
    /// share under full contention, also against other programs on the machine (a Kafka
    /// broker beside the engine), but a front-end thread that wakes may wait for its slice.
    Nice,
}

impl std::str::FromStr for Background {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "idle" => Ok(Self::Idle),
            "nice" => Ok(Self::Nice),
            other => Err(format!("expected idle or nice, got {other:?}")),
        }
    }
}

/// The nice value background threads take with [`Background::Nice`] (or where `SCHED_IDLE` is
/// refused).
pub const BACKGROUND_NICE: i32 = 10;

static POLICY: AtomicU8 = AtomicU8::new(Background::Nice as u8);

/// Chooses how background threads started from now on give way (once, at start).
pub fn set_background(policy: Background) {
    POLICY.store(policy as u8, Ordering::Relaxed);
}

fn background() -> Background {
    if POLICY.load(Ordering::Relaxed) == Background::Idle as u8 {
        Background::Idle
    } else {
        Background::Nice
    }
}

/// Lowers the calling thread's CPU priority as [`set_background`] chose (on Linux both are the
/// thread's own, and threads it starts inherit them). Raising it back would need a privilege,
/// so call it only on a thread that does background work for good. Elsewhere, or if refused,
/// nothing changes.
pub fn lower_this_thread() {
    #[cfg(target_os = "linux")]
    {
        if background() == Background::Idle {
            match sched_idle() {
                Ok(()) => return,
                Err(e) => tracing::warn!(error = %e, "SCHED_IDLE refused; using nice instead"),
            }
        }
        if let Err(e) =
            rustix::process::setpriority_process(Some(rustix::thread::gettid()), BACKGROUND_NICE)
        {
            tracing::debug!(error = %e, "could not lower a background thread's priority");
        }
    }
}

/// Puts the calling thread under `SCHED_IDLE` (allowed without privileges since Linux 2.6.39).
#[cfg(target_os = "linux")]
fn sched_idle() -> Result<(), String> {
    use thread_priority::{NormalThreadSchedulePolicy, ThreadPriority, ThreadSchedulePolicy};
    thread_priority::set_thread_priority_and_policy(
        thread_priority::thread_native_id(),
        ThreadPriority::Min,
        ThreadSchedulePolicy::Normal(NormalThreadSchedulePolicy::Idle),
    )
    .map_err(|e| format!("{e:?}"))
}

#[cfg(all(test, target_os = "linux"))]
mod tests {
    use super::*;
    use thread_priority::{NormalThreadSchedulePolicy as Normal, ThreadSchedulePolicy as Policy};

    fn policy_and_nice() -> (Policy, i32) {
        let policy = thread_priority::thread_schedule_policy().expect("policy");
        let nice = rustix::process::getpriority_process(Some(rustix::thread::gettid()))
            .expect("getpriority");
        (policy, nice)
    }

    fn on_a_background_thread() -> (Policy, i32) {
        std::thread::spawn(|| {
            lower_this_thread();
            policy_and_nice()
        })
        .join()
        .expect("thread")
    }

    /// Both policies in one test: the choice is process-wide.
    #[test]
    fn a_background_thread_runs_at_the_chosen_lower_priority() {
        set_background(Background::Nice);
        assert_eq!(
            on_a_background_thread(),
            (Policy::Normal(Normal::Other), BACKGROUND_NICE)
        );
        set_background(Background::Idle);
        assert_eq!(on_a_background_thread().0, Policy::Normal(Normal::Idle));
        set_background(Background::Nice);
        let (policy, nice) = policy_and_nice();
        assert_eq!(policy, Policy::Normal(Normal::Other), "only those threads");
        assert_ne!(nice, BACKGROUND_NICE);
        assert_eq!("idle".parse(), Ok(Background::Idle));
        assert!("low".parse::<Background>().is_err());
    }
}
