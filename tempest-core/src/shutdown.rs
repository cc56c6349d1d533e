//! Waiting on a shutdown signal: a `watch` channel that turns `true`, and
//! the process's own SIGINT / SIGTERM ([`Signals`]), which every Tempest
//! process (package, agent, director, CLI) stops on.

use tokio::sync::watch;

/// SIGINT and SIGTERM, installed at once (so a signal that arrives before
/// anyone waits is not lost to the default action) and awaited later.
pub struct Signals {
    #[cfg(unix)]
    interrupt: Option<tokio::signal::unix::Signal>,
    #[cfg(unix)]
    terminate: Option<tokio::signal::unix::Signal>,
}

impl Signals {
    /// Installs the handlers (within a tokio runtime). A handler that cannot
    /// be installed is logged; that signal then keeps its default action.
    pub fn install() -> Self {
        #[cfg(unix)]
        {
            use tokio::signal::unix::{signal, SignalKind};
            let install = |kind: SignalKind, name: &str| match signal(kind) {
                Ok(s) => Some(s),
                Err(e) => {
                    tracing::warn!("cannot install a {name} handler: {e}");
                    None
                }
            };
            Signals {
                interrupt: install(SignalKind::interrupt(), "SIGINT"),
                terminate: install(SignalKind::terminate(), "SIGTERM"),
            }
        }
        #[cfg(not(unix))]
        Signals {}
    }

    /// Resolves at the first SIGINT or SIGTERM (never, if neither handler
    /// could be installed).
    pub async fn wait(mut self) {
        self.recv().await
    }

    /// Resolves at the next SIGINT or SIGTERM (never, if neither handler
    /// could be installed): for a process that acts on a second signal too.
    pub async fn recv(&mut self) {
        #[cfg(unix)]
        match (self.interrupt.as_mut(), self.terminate.as_mut()) {
            (Some(i), Some(t)) => {
                tokio::select! {
                    _ = i.recv() => {}
                    _ = t.recv() => {}
                }
            }
            (Some(one), None) | (None, Some(one)) => {
                one.recv().await;
            }
            (None, None) => std::future::pending::<()>().await,
        }
        #[cfg(not(unix))]
        {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

/// Resolves when `rx` changes. If its sender is gone it can never change
/// again, so this never resolves: a `select!` arm on it must not spin on
/// `changed()`'s immediate error.
pub async fn changed(rx: &mut watch::Receiver<bool>) {
    if rx.changed().await.is_err() {
        std::future::pending::<()>().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test(start_paused = true)]
    async fn a_dropped_sender_never_fires() {
        let (tx, mut rx) = watch::channel(false);
        drop(tx);
        let waited = tokio::time::timeout(Duration::from_secs(60), changed(&mut rx)).await;
        assert!(waited.is_err(), "changed() resolved with no sender");
    }

    #[cfg(unix)]
    #[tokio::test]
    async fn a_sigterm_ends_the_wait() {
        let signals = Signals::install();
        // SAFETY: raise(3) on this process, whose SIGTERM handler is installed.
        unsafe { libc::raise(libc::SIGTERM) };
        tokio::time::timeout(Duration::from_secs(30), signals.wait())
            .await
            .expect("the wait ended");
    }

    #[tokio::test]
    async fn a_change_fires() {
        let (tx, mut rx) = watch::channel(false);
        tx.send(true).unwrap();
        changed(&mut rx).await;
        assert!(*rx.borrow());
    }
}
