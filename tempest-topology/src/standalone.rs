//! The standalone runtime: a whole topology in one process.
//!
//! The same [`Roots`](crate::roots::Roots) and [`Driver`] as the topology
//! server, with the [`Hub`] routing in process instead of workers routing
//! over TCP: each task instance runs on its own thread and swaps its handled
//! batch for the next one in one short lock of the hub, and waits on its own
//! notifier when there is nothing for it.

use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use tokio::sync::watch;

use tempest_core::metrics::targets::{push_targets, spawn_flusher, Flusher};
use tempest_core::metrics::{catalog, Labels, Registry, Snapshot, TargetSpec};
use tempest_core::pipeline::TaskIdx;
use tempest_core::{
    BuildError, NamedSource, PipelineErrors, SourceError, SourcesError, TaskContext, Topology,
};
use tempest_task::{Instance, TaskMetrics};

use crate::driver::{DriveEnd, Driver, OnExhausted};
use crate::hub::Hub;
use crate::roots::Admission;
use crate::scrape::ScrapeEndpoint;

/// Why a topology could not run.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// The pipeline is invalid.
    #[error("{0}")]
    Pipeline(#[from] PipelineErrors),
    /// A setting is invalid.
    #[error("{0}")]
    Settings(#[from] BuildError),
    /// Neither the code nor `Topology.toml` gave a source.
    #[error("the topology has no source: give one in code or as [source] kind in Topology.toml")]
    NoSource,
    /// The sources given do not match the ones the pipeline names.
    #[error("{0}")]
    Sources(BuildError),
    /// The source failed in a way retrying cannot fix.
    #[error("source: {0}")]
    Source(#[from] SourceError),
    /// A named source (one of several) failed in a way retrying cannot fix.
    #[error("source `{name}`: {error}")]
    NamedSource {
        /// The source's name.
        name: String,
        /// What failed.
        error: SourceError,
    },
    /// Binding or serving the network.
    #[error("{context}: {source}")]
    Io {
        /// What was being done.
        context: String,
        /// The error.
        source: std::io::Error,
    },
}

/// What a run did.
#[derive(Debug, Clone)]
pub struct RunReport {
    /// How the run ended.
    pub end: DriveEnd,
    /// Wall time from start to the end of the drain.
    pub elapsed: Duration,
    /// Every metric at the end.
    pub metrics: Snapshot,
}

impl RunReport {
    /// Roots polled from the source.
    pub fn polled(&self) -> u64 {
        self.metrics.counter(catalog::SOURCE_POLLED.name, &[])
    }
    /// Roots acked.
    pub fn acked(&self) -> u64 {
        self.metrics.counter(catalog::SOURCE_ACKED.name, &[])
    }
    /// Root failures (errors and timeouts, each attempt counted).
    pub fn failed(&self) -> u64 {
        self.metrics.counter(catalog::SOURCE_FAILED.name, &[])
            + self.metrics.counter(catalog::SOURCE_TIMED_OUT.name, &[])
    }
    /// Roots dead-lettered at the source.
    pub fn dead_lettered(&self) -> u64 {
        self.metrics
            .counter(catalog::SOURCE_DEAD_LETTERED.name, &[])
    }
}

/// A change to the hub before a run starts.
type HubSetup = Box<dyn FnOnce(&mut Hub) + Send>;

/// Options of a standalone run beyond the topology's settings.
pub struct Standalone {
    topology: Topology,
    registry: Option<Registry>,
    setup: Vec<HubSetup>,
    worker_threads: Option<usize>,
}

impl Standalone {
    /// A standalone run of `topology`.
    pub fn new(topology: Topology) -> Self {
        Standalone {
            topology,
            registry: None,
            setup: Vec::new(),
            worker_threads: None,
        }
    }

    /// Records metrics in `registry` (by default a new one labelled with the
    /// topology's name and the host; [`Registry::disabled`] turns metrics off).
    pub fn registry(mut self, registry: Registry) -> Self {
        self.registry = Some(registry);
        self
    }

    /// Adjusts the hub before the run starts (tests record events with it).
    pub fn with_hub(mut self, f: impl FnOnce(&mut Hub) + Send + 'static) -> Self {
        self.setup.push(Box::new(f));
        self
    }

    /// The tokio worker threads [`Standalone::run_blocking`] uses (default:
    /// one per core).
    pub fn worker_threads(mut self, n: usize) -> Self {
        self.worker_threads = Some(n);
        self
    }

    /// Builds a multi-threaded tokio runtime and runs on it until the source
    /// is exhausted or `shutdown` turns true.
    pub fn run_blocking(
        self,
        shutdown: watch::Receiver<bool>,
    ) -> Result<(RunReport, Arc<Mutex<Hub>>), RunError> {
        let mut rt = tokio::runtime::Builder::new_multi_thread();
        if let Some(n) = self.worker_threads {
            rt.worker_threads(n);
        }
        let rt = rt.enable_all().build().map_err(|e| {
            RunError::Source(SourceError::fatal(
                tempest_core::SourceErrorKind::Connect,
                format!("cannot start the tokio runtime: {e}"),
            ))
        })?;
        rt.block_on(self.run(shutdown))
    }

    /// Runs until a finite source is exhausted and every root settled, or
    /// until `shutdown` turns true and the drain ends. Returns the report and
    /// the hub (for what it recorded).
    pub async fn run(
        self,
        shutdown: watch::Receiver<bool>,
    ) -> Result<(RunReport, Arc<Mutex<Hub>>), RunError> {
        let mut parts = Parts::prepare(self.topology, self.registry)?;
        let mut hub = Hub::new(parts.dag.clone(), &parts.settings, &parts.registry);
        for f in self.setup {
            f(&mut hub);
        }
        let hub = Arc::new(Mutex::new(hub));
        let started = Instant::now();
        let (stop_workers, workers_stopped) = watch::channel(false);
        let mut workers = Vec::new();
        for (idx, task) in parts.dag.tasks() {
            let metrics = TaskMetrics::new(&parts.registry, &task.name);
            for i in 0..task.workers {
                let ctx = TaskContext {
                    topology: parts.settings.name.clone(),
                    task: task.name.clone(),
                    instance: i,
                    instances: task.workers,
                };
                let instance = Instance::new((task.factory)(), ctx, metrics.clone());
                let (hub, stop) = (hub.clone(), workers_stopped.clone());
                let (batch_size, rt) =
                    (parts.settings.batch_size, tokio::runtime::Handle::current());
                let thread = std::thread::Builder::new()
                    .name(format!("{}-{i}", task.name))
                    .spawn(move || work(hub, idx, i, instance, batch_size, stop, rt))
                    .map_err(|source| RunError::Io {
                        context: format!("starting a thread for task `{}`", task.name),
                        source,
                    })?;
                workers.push(thread);
            }
        }
        let capacity = tokio::spawn(track_capacity(
            parts.registry.clone(),
            parts.dag.clone(),
            workers_stopped.clone(),
        ));
        let end = parts.drive(hub.clone(), shutdown).await;

        let _ = stop_workers.send(true);
        hub.lock().wake_all();
        let joined = tokio::task::spawn_blocking(move || {
            for w in workers {
                if w.join().is_err() {
                    tracing::error!("a task instance's thread ended abnormally");
                }
            }
        });
        if let Err(e) = joined.await {
            tracing::error!("joining task instances: {e}");
        }
        let _ = capacity.await;
        Admission::sweep(&mut *hub.lock()); // final gauges
        let report = parts.finish(end?, started).await;
        Ok((report, hub))
    }
}

/// What every runtime of a topology sets up the same way: the validated
/// DAG, the source, and the metrics registry and flusher.
pub(crate) struct Parts {
    pub settings: tempest_core::Settings,
    pub dag: Arc<tempest_core::Dag>,
    pub registry: Registry,
    sources: Vec<NamedSource>,
    flusher: Flusher,
    scrape: Vec<ScrapeEndpoint>,
}

impl Parts {
    pub fn prepare(mut topology: Topology, registry: Option<Registry>) -> Result<Parts, RunError> {
        let mut problems = topology.settings.problems();
        problems.extend(target_problems(&topology.settings.metrics.targets));
        if !problems.is_empty() {
            return Err(BuildError(problems).into());
        }
        let settings = topology.settings.clone();
        let dag = Arc::new(topology.dag()?);
        let sources = topology.take_sources(&dag).map_err(|e| match e {
            SourcesError::None => RunError::NoSource,
            SourcesError::Mismatch(problems) => RunError::Sources(problems),
        })?;
        let registry = registry.unwrap_or_else(|| Registry::for_topology(&settings.name));
        let scrape = start_scrape(&registry, &settings.metrics.targets)?;
        let flusher = spawn_flusher(
            registry.clone(),
            push_targets(&settings.metrics.targets),
            settings.metrics.flush_interval,
        );
        Ok(Parts {
            settings,
            dag,
            registry,
            sources,
            flusher,
            scrape,
        })
    }

    /// Runs one driver per source into `runtime`, side by side, until
    /// every source is exhausted or the drain ends. A source that fails in
    /// a way retrying cannot fix stops the others too (they drain), and its
    /// error is returned.
    pub async fn drive<A: Admission>(
        &mut self,
        runtime: Arc<Mutex<A>>,
        mut shutdown: watch::Receiver<bool>,
    ) -> Result<DriveEnd, RunError> {
        let sources = std::mem::take(&mut self.sources);
        if sources.is_empty() {
            return Err(RunError::NoSource);
        }
        let named = sources.len() > 1;
        let (stop, stopping) = watch::channel(*shutdown.borrow());
        let mut drivers = tokio::task::JoinSet::new();
        for (src, NamedSource { name, source }) in sources.into_iter().enumerate() {
            let driver = Driver::new(
                src,
                &name,
                source,
                runtime.clone(),
                &self.settings,
                &self.registry,
                OnExhausted::Finish,
            );
            let stopping = stopping.clone();
            drivers.spawn(async move { (name, driver.run(stopping).await) });
        }
        let mut left = 0;
        let mut drained = false;
        let mut failed: Option<RunError> = None;
        loop {
            tokio::select! {
                joined = drivers.join_next() => {
                    let Some(joined) = joined else { break };
                    let error = match joined {
                        Ok((_, Ok(DriveEnd::Exhausted))) => continue,
                        Ok((_, Ok(DriveEnd::Shutdown { left: l }))) => {
                            drained = true;
                            left += l;
                            continue;
                        }
                        Ok((name, Err(error))) if named => RunError::NamedSource { name, error },
                        Ok((_, Err(error))) => RunError::Source(error),
                        Err(e) => RunError::Source(SourceError::fatal(
                            tempest_core::SourceErrorKind::Poll,
                            format!("a source driver ended abnormally: {e}"),
                        )),
                    };
                    tracing::error!("{error}: stopping the other sources");
                    failed.get_or_insert(error);
                    let _ = stop.send(true);
                }
                _ = tempest_core::shutdown::changed(&mut shutdown), if !*stop.borrow() => {
                    if *shutdown.borrow() {
                        let _ = stop.send(true);
                    }
                }
            }
        }
        match failed {
            Some(e) => Err(e),
            None if drained => Ok(DriveEnd::Shutdown { left }),
            None => Ok(DriveEnd::Exhausted),
        }
    }

    /// Flushes the metrics a last time and makes the report.
    pub async fn finish(self, end: DriveEnd, started: Instant) -> RunReport {
        let elapsed = started.elapsed();
        let flusher = self.flusher;
        if let Err(e) = tokio::task::spawn_blocking(move || flusher.stop()).await {
            tracing::error!("stopping the metrics flusher: {e}");
        }
        for endpoint in self.scrape {
            endpoint.stop().await;
        }
        RunReport {
            end,
            elapsed,
            metrics: self.registry.snapshot(),
        }
    }
}

/// The problems of metric targets set in code (`Topology.toml` reports its
/// own with their line).
pub fn target_problems(targets: &[TargetSpec]) -> Vec<String> {
    targets
        .iter()
        .enumerate()
        .filter_map(|(i, t)| {
            t.validate()
                .err()
                .map(|p| format!("metric target {i} ({}): {p}", t.kind()))
        })
        .collect()
}

/// Starts a `/metrics` endpoint for each Prometheus target, and prints
/// `metrics on http://ADDR/metrics` for each on stdout (so the address is
/// known when port 0 picked it).
pub fn start_scrape(
    registry: &Registry,
    targets: &[TargetSpec],
) -> Result<Vec<ScrapeEndpoint>, RunError> {
    let mut endpoints = Vec::new();
    for t in targets {
        if let TargetSpec::Prometheus { listen } = t {
            let endpoint =
                ScrapeEndpoint::start(registry.clone(), listen).map_err(|source| RunError::Io {
                    context: format!("serving metrics on {listen}"),
                    source,
                })?;
            let addr = endpoint.local_addr();
            tracing::info!(target: "tempest::metrics", "serving Prometheus metrics on http://{addr}/metrics");
            // println! (not a raw stdout handle) so that tests capture it.
            println!("metrics on http://{addr}/metrics");
            use std::io::Write;
            let _ = std::io::stdout().flush();
            endpoints.push(endpoint);
        }
    }
    Ok(endpoints)
}

/// One in-process task instance, on its own thread: swap handled for new
/// work until stopped. Handlers run off the tokio runtime, so one that blocks
/// (or runs long) never stalls the source driver or another task.
fn work(
    hub: Arc<Mutex<Hub>>,
    task: TaskIdx,
    instance: u32,
    mut inst: Instance,
    batch_size: usize,
    stop: watch::Receiver<bool>,
    rt: tokio::runtime::Handle,
) {
    let wake = hub.lock().waker(task, instance);
    let mut handled = Vec::with_capacity(batch_size);
    let mut batch = Vec::with_capacity(batch_size);
    inst.start();
    loop {
        hub.lock()
            .exchange(task, instance, &mut handled, batch_size, &mut batch);
        if batch.is_empty() {
            if *stop.borrow() {
                break;
            }
            // Woken by the hub when work arrives, and by `wake_all` at stop.
            rt.block_on(wake.notified());
            continue;
        }
        inst.run_batch(batch.drain(..), &mut handled);
    }
    inst.shutdown();
}

/// Keeps each task's capacity gauge: busy time over wall time and workers.
async fn track_capacity(
    registry: Registry,
    dag: Arc<tempest_core::Dag>,
    mut stop: watch::Receiver<bool>,
) {
    let every = Duration::from_secs(1);
    let tasks: Vec<_> = dag
        .tasks()
        .map(|(_, t)| {
            let l = Labels::new([("task", t.name.as_str())]);
            (
                registry.counter(&catalog::TASK_BUSY, &l),
                registry.gauge(&catalog::TASK_CAPACITY, &l),
                f64::from(t.workers),
            )
        })
        .collect();
    let mut last: Vec<u64> = tasks.iter().map(|(busy, _, _)| busy.get()).collect();
    let mut at = Instant::now();
    loop {
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            _ = tempest_core::shutdown::changed(&mut stop) => return,
        }
        let secs = at.elapsed().as_secs_f64();
        at = Instant::now();
        for ((busy, gauge, workers), last) in tasks.iter().zip(last.iter_mut()) {
            let now = busy.get();
            gauge.set(((now - *last) as f64 / 1e6 / secs / workers).min(1.0));
            *last = now;
        }
    }
}
