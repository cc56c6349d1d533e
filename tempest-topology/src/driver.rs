//! The source driver: the one async task that owns a [`Source`].
//!
//! A topology runs one driver per source, side by side: a slow or broken
//! source only holds up its own driver. Each polls while fewer than its
//! source's `max_pending` roots of that source are in flight (and the
//! runtime has room), hands polled messages to the runtime's [`Admission`],
//! acks and fails roots at the source in batches as they settle, sweeps timeouts and replays on a timer, and reconnects
//! with back-off after a retryable source error. On shutdown it stops
//! polling and drains: it keeps acking until no root is in flight or the
//! grace period ends; what is still in flight then stays un-acked at the
//! source, so the broker redelivers it (at-least-once).

use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use tokio::sync::watch;

use tempest_core::metrics::{catalog, Counter, Gauge, Labels, Registry};
use tempest_core::{Health, Polled, Settings, Source, SourceError};

use crate::roots::{Admission, SourceIdx, SourceWork};

/// How the driver ended.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum DriveEnd {
    /// A finite source was exhausted and every root settled.
    Exhausted,
    /// Shutdown was requested; `left` roots were still in flight when the
    /// drain ended (0 when it drained completely).
    Shutdown {
        /// Roots left un-acked at the source.
        left: usize,
    },
}

/// Whether to stop when a finite source is exhausted (standalone) or keep
/// serving (a topology server waits for shutdown).
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum OnExhausted {
    /// Finish the roots in flight and return.
    Finish,
    /// Keep running until shutdown.
    Wait,
}

const MAX_IDLE_WAIT: Duration = Duration::from_millis(50);
const MAX_SWEEP_WAIT: Duration = Duration::from_millis(100);
const MAX_RECONNECT_WAIT: Duration = Duration::from_secs(5);

/// Drives `source` into a runtime's [`Admission`] (the standalone hub or a
/// topology server) until it is exhausted or `shutdown` turns true.
pub struct Driver<A> {
    src: SourceIdx,
    name: String,
    source: Box<dyn Source>,
    runtime: Arc<Mutex<A>>,
    max_pending: usize,
    batch: usize,
    grace: Duration,
    on_exhausted: OnExhausted,
    settings: Settings,
    errors: Counter,
    healthy: Gauge,
}

impl<A: Admission> Driver<A> {
    /// A driver for `source`, the source at index `src` of the DAG's
    /// sources and called `name`, feeding `runtime`.
    pub fn new(
        src: SourceIdx,
        name: &str,
        source: Box<dyn Source>,
        runtime: Arc<Mutex<A>>,
        settings: &Settings,
        registry: &Registry,
        on_exhausted: OnExhausted,
    ) -> Self {
        let labels = Labels::new([("source", name)]);
        Driver {
            src,
            name: name.to_owned(),
            source,
            runtime,
            max_pending: settings.max_pending_of(name),
            batch: settings.batch_size,
            grace: settings.grace_period,
            on_exhausted,
            settings: settings.clone(),
            errors: registry.counter(&catalog::SOURCE_ERRORS, &labels),
            healthy: registry.gauge(&catalog::SOURCE_HEALTHY, &labels),
        }
    }

    /// Runs the driver. Errors only for a source error that retrying cannot fix.
    pub async fn run(
        mut self,
        mut shutdown: watch::Receiver<bool>,
    ) -> Result<DriveEnd, SourceError> {
        let span = tracing::info_span!("source", name = %self.name);
        tracing::Instrument::instrument(self.drive(&mut shutdown), span).await
    }

    async fn drive(
        &mut self,
        shutdown: &mut watch::Receiver<bool>,
    ) -> Result<DriveEnd, SourceError> {
        let src = self.src;
        let wake = self.runtime.lock().roots().driver_waker(src);
        self.source.configure(&self.settings).await?;
        let mut connected = false;
        let mut reconnect_wait = Duration::from_millis(100);
        // Wakes from the hub (results, failures) must not cut the back-off
        // short: the broker is retried no sooner than this.
        let mut next_connect = Instant::now();
        let mut idle_wait = Duration::from_millis(1);
        let mut exhausted = false;
        let mut drain_until: Option<Instant> = None;

        loop {
            if drain_until.is_none() && *shutdown.borrow_and_update() {
                tracing::info!(grace = ?self.grace, "shutdown: draining roots in flight");
                drain_until = Some(Instant::now() + self.grace);
            }

            // One lock: sweep, then take everything the source has not heard
            // of yet. Acking it before polling means the source never sees
            // more than `max_pending` un-acked roots.
            let (work, in_flight, room, next_sweep) = {
                let mut runtime = self.runtime.lock();
                let next = runtime.sweep();
                let room = runtime.room(src);
                let roots = runtime.roots();
                (
                    roots.take_source_work(src),
                    roots.in_flight_of(src),
                    room,
                    next,
                )
            };
            if !work.is_empty() {
                self.settle_at_source(work).await;
            }

            let finishing =
                drain_until.is_some() || (exhausted && self.on_exhausted == OnExhausted::Finish);
            if finishing && in_flight == 0 {
                break;
            }
            if let Some(deadline) = drain_until {
                if Instant::now() >= deadline {
                    tracing::warn!(
                        left = in_flight,
                        "grace period over: leaving roots un-acked at the source"
                    );
                    self.shutdown_source().await;
                    return Ok(DriveEnd::Shutdown { left: in_flight });
                }
            }

            let mut wait = next_sweep.min(MAX_SWEEP_WAIT);
            // Room also comes from the runtime: a server whose root task cannot
            // take more waits for it (its links wake the driver).
            if drain_until.is_none() && !exhausted && in_flight < self.max_pending && room > 0 {
                let now = Instant::now();
                if !connected && now < next_connect {
                    wait = wait.min(next_connect - now);
                } else if !connected {
                    match self.source.connect().await {
                        Ok(()) => {
                            connected = true;
                            reconnect_wait = Duration::from_millis(100);
                            self.healthy.set(1.0);
                            tracing::info!("source connected");
                            continue;
                        }
                        Err(e) => {
                            self.source_error(&e)?;
                            wait = reconnect_wait;
                            next_connect = Instant::now() + reconnect_wait;
                            reconnect_wait = (reconnect_wait * 2).min(MAX_RECONNECT_WAIT);
                        }
                    }
                } else {
                    let want = self.batch.min(self.max_pending - in_flight).min(room);
                    match self.source.poll(want).await {
                        Ok(Polled::Msgs(msgs)) => {
                            idle_wait = Duration::from_millis(1);
                            self.runtime.lock().admit(src, msgs);
                            // Let the workers on this thread run before polling again.
                            tokio::task::yield_now().await;
                            continue;
                        }
                        Ok(Polled::Idle) => {
                            wait = wait.min(idle_wait);
                            idle_wait = (idle_wait * 2).min(MAX_IDLE_WAIT);
                        }
                        Ok(Polled::Exhausted) => {
                            tracing::info!("source exhausted");
                            exhausted = true;
                            continue;
                        }
                        Err(e) => {
                            self.source_error(&e)?;
                            connected = false;
                            wait = reconnect_wait;
                            next_connect = Instant::now() + reconnect_wait;
                            reconnect_wait = (reconnect_wait * 2).min(MAX_RECONNECT_WAIT);
                        }
                    }
                }
            }
            if let Some(deadline) = drain_until {
                wait = wait.min(deadline.saturating_duration_since(Instant::now()));
            }
            tokio::select! {
                _ = wake.notified() => {}
                _ = tokio::time::sleep(wait) => {}
                _ = tempest_core::shutdown::changed(shutdown), if drain_until.is_none() => {}
            }
        }
        self.shutdown_source().await;
        Ok(if drain_until.is_some() {
            DriveEnd::Shutdown { left: 0 }
        } else {
            DriveEnd::Exhausted
        })
    }

    /// Acks and fails at the source what the hub has settled.
    async fn settle_at_source(&mut self, work: SourceWork) {
        if !work.acks.is_empty() {
            if let Err(e) = self.source.ack(&work.acks).await {
                // The roots stay un-acked at the broker, which redelivers them.
                self.errors.inc();
                tracing::warn!(count = work.acks.len(), "ack failed: {e}");
            }
        }
        for (id, reason) in &work.fails {
            if let Err(e) = self.source.fail(*id, reason).await {
                self.errors.inc();
                tracing::warn!(%id, "fail failed: {e}");
            }
        }
        for (id, reason) in &work.releases {
            if let Err(e) = self.source.release(*id, reason).await {
                self.errors.inc();
                tracing::warn!(%id, "release failed: {e}");
            }
        }
    }

    fn source_error(&mut self, e: &SourceError) -> Result<(), SourceError> {
        self.errors.inc();
        self.healthy.set(0.0);
        if e.retryable {
            tracing::warn!("source unhealthy, retrying: {e}");
            Ok(())
        } else {
            tracing::error!("source failed: {e}");
            Err(SourceError {
                kind: e.kind,
                message: e.message.clone(),
                retryable: false,
            })
        }
    }

    async fn shutdown_source(&mut self) {
        if let Health::Unhealthy(why) = self.source.health().await {
            tracing::warn!("source unhealthy at shutdown: {why}");
        }
        if let Err(e) = self.source.shutdown().await {
            self.errors.inc();
            tracing::warn!("source shutdown: {e}");
        }
    }
}
