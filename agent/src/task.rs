//! Small helpers for tokio tasks shared across modules.

use tokio::{sync::mpsc, task::JoinHandle};

/// Aborts the task when dropped, so a task's lifetime follows its owner's.
pub struct AbortOnDrop(pub JoinHandle<()>);

impl AbortOnDrop {
    /// Aborts the task and waits until it has stopped (its resources released), rather than
    /// leaving it to wind down after its owner is gone.
    pub async fn stop(mut self) {
        self.0.abort();
        let _ = (&mut self.0).await;
    }
}

/// Stops every task, in order.
pub async fn stop_all(tasks: impl IntoIterator<Item = AbortOnDrop>) {
    for t in tasks {
        t.stop().await;
    }
}

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
