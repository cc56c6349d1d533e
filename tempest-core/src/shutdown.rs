//! Waiting on a shutdown signal: a `watch` channel that turns `true`.

use tokio::sync::watch;

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

    #[tokio::test]
    async fn a_change_fires() {
        let (tx, mut rx) = watch::channel(false);
        tx.send(true).unwrap();
        changed(&mut rx).await;
        assert!(*rx.borrow());
    }
}
