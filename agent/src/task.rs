//! Small helpers for tokio tasks shared across modules.

use tokio::{sync::mpsc, task::JoinHandle};

/// Aborts the task when dropped, so a task's lifetime follows its owner's.
pub struct AbortOnDrop(pub JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Receives from an optional channel; without one (or once closed and set to `None`), never
/// completes, so a `select!` branch on it stays quiet.
pub async fn recv_opt<T>(rx: &mut Option<mpsc::Receiver<T>>) -> Option<T> {
    match rx {
        Some(rx) => rx.recv().await,
        None => std::future::pending().await,
    }
}
