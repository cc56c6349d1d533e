//! The director's decisions: what each topology needs, where each process
//! runs, and what each agent is told.
//!
//! [`Director`] holds the cluster state in memory behind one lock and writes
//! every change through to the [`Store`] before answering, so what an API
//! call answered is what a restarted director loads. The lifecycle rules are
//! in [`crate::lifecycle`], the placement policy behind
//! [`crate::placement::Scheduler`]; this module only applies them.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use parking_lot::Mutex;
use serde::{Deserialize, Serialize};
use tempest_control::package::{self, is_content_hash, sha256_hex};
use tempest_control::{
    Assignment, Heartbeat, Manifest, NodeInfo, ProcessSpec, ProcessState, ProcessStatus, Role,
    Secret,
};
use tempest_core::config::TopologyFile;
use utoipa::ToSchema;

use crate::error::Error;
use crate::lifecycle::{Command, Lifecycle, Phase, Transition};
use crate::metrics::{
    Figures, PerSourceFigures, PipelineEdge, SamplePoint, SourceEdge, SourceFigures, TaskFigures,
};
use crate::placement::{AgentLoad, Scheduler};
use crate::store::{AgentRecord, PackageRecord, PlacementRecord, Snapshot, Store, TopologyRecord};

/// How long the metric series are kept.
pub const SAMPLES_KEPT: Duration = Duration::from_secs(15 * 60);

/// The most worker instances of one task.
const MAX_WORKERS: u32 = 1024;

/// Unix milliseconds now.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// The director's settings that its decisions depend on.
#[derive(Clone, Debug)]
pub struct Settings {
    /// Where the database and the packages are.
    pub data_dir: PathBuf,
    /// An agent not heard from for this long is down.
    pub agent_timeout: Duration,
    /// The largest package upload, in bytes.
    pub max_upload: u64,
    /// The cluster CA (with its key): each deployment gets a data-plane
    /// certificate from it. Without it topology links are plain TCP.
    pub ca: Option<std::sync::Arc<tempest_control::tls::ClusterCa>>,
}

/// A deploy request.
#[derive(Clone, Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct DeployRequest {
    /// The topology's name in the cluster (letters, digits, `-`, `_`, `.`).
    pub name: String,
    /// The package's content hash.
    pub package: String,
    /// `Topology.toml` text laid over the package's own.
    #[serde(default)]
    pub config: Option<String>,
    /// Worker instances per task; required for the tasks whose count the
    /// package's `Topology.toml` does not give.
    #[serde(default)]
    pub workers: BTreeMap<String, u32>,
    /// Environment variables every process of the topology gets, e.g. the
    /// address of a store its tasks write to. Names are letters, digits and
    /// `_`, not starting with a digit or `TEMPEST_` (those are the agent's).
    #[serde(default)]
    pub env: BTreeMap<String, String>,
}

/// A rebalance request.
#[derive(Clone, Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RebalanceRequest {
    /// The new worker counts of the tasks named.
    pub workers: BTreeMap<String, u32>,
}

/// An agent as the API shows it.
#[derive(Clone, Debug, Serialize, ToSchema)]
pub struct AgentView {
    /// Its id.
    pub id: String,
    /// Its API address, `host:port`.
    pub address: String,
    /// Whether it heartbeats within the agent timeout.
    pub up: bool,
    /// Its last heartbeat, Unix milliseconds.
    pub last_heartbeat_ms: u64,
    /// Its node's figures.
    #[schema(value_type = Object)]
    pub node: NodeInfo,
    /// The processes the director placed on it.
    pub placed: usize,
    /// The processes it reported.
    #[schema(value_type = Vec<Object>)]
    pub processes: Vec<ProcessStatus>,
}

/// A package as the API shows it.
#[derive(Clone, Debug, Serialize, ToSchema)]
pub struct PackageView {
    /// The archive's content hash.
    pub hash: String,
    /// Its manifest.
    #[schema(value_type = Object)]
    pub manifest: Manifest,
    /// Its default `Topology.toml`, if any.
    pub topology_toml: Option<String>,
    /// The archive's size in bytes.
    pub size: u64,
    /// When it was uploaded, Unix milliseconds.
    pub uploaded_at_ms: u64,
}

/// One process of a topology.
#[derive(Clone, Debug, Serialize, ToSchema)]
pub struct ProcessView {
    /// Its id.
    pub id: String,
    /// `topology` or `task`.
    pub role: String,
    /// A worker's task.
    pub task: Option<String>,
    /// A worker's instance.
    pub instance: Option<u32>,
    /// The agent it is placed on.
    pub agent: String,
    /// Whether that agent is up.
    pub agent_up: bool,
    /// The generation it was placed with.
    pub generation: u64,
    /// What its agent reports (`starting`, `running`, ...), `pending` until
    /// it reports this generation, `waiting` for a worker whose topology
    /// server has no address yet.
    pub state: String,
    /// Its OS process id.
    pub pid: Option<u32>,
    /// A topology server's address, or a worker's peer address.
    pub address: Option<String>,
    /// Restarts after exits.
    pub restarts: u32,
    /// Seconds since it started.
    pub uptime_secs: u64,
    /// Why it failed.
    pub error: Option<String>,
}

/// A topology in a list.
#[derive(Clone, Debug, Serialize, ToSchema)]
pub struct TopologySummary {
    /// Its name.
    pub name: String,
    /// Its package's hash.
    pub package: String,
    /// Its package's name and version.
    pub package_name: String,
    /// What the operator asked for.
    pub state: Lifecycle,
    /// Where it stands.
    pub phase: Phase,
    /// Bumped by deploy, start and rebalance.
    pub generation: u64,
    /// Worker instances per task.
    pub workers: BTreeMap<String, u32>,
    /// Processes it should have.
    pub processes: usize,
    /// Of which are running.
    pub running: usize,
    /// When it was deployed, Unix milliseconds.
    pub created_at_ms: u64,
    /// Seconds its topology server has run (0 while it does not run).
    pub uptime_secs: u64,
    /// Roots acked per second over the last scrape interval.
    pub msgs_per_sec: f64,
    /// Roots acked, in total (since its processes started).
    pub acked: u64,
    /// Roots failed or timed out, in total.
    pub failed: u64,
    /// Roots in flight.
    pub in_flight: u64,
    /// The median root complete latency over the last interval, ms.
    pub p50_ms: Option<f64>,
    /// The 99th percentile root complete latency over the last interval, ms.
    pub p99_ms: Option<f64>,
}

/// A process that failed or is backing off, with its agent's reason.
#[derive(Clone, Debug, Serialize, ToSchema)]
pub struct RecentError {
    /// The process id.
    pub process: String,
    /// The agent that reported it.
    pub agent: String,
    /// `failed` or `backoff`.
    pub state: String,
    /// Restarts after exits.
    pub restarts: u32,
    /// Why, as the agent reports it.
    pub error: Option<String>,
}

/// The cluster at a glance.
#[derive(Clone, Debug, Serialize, ToSchema)]
pub struct ClusterSummary {
    /// Agents heartbeating within the timeout.
    pub agents_up: usize,
    /// Agents that are not.
    pub agents_down: usize,
    /// Topologies asked to run.
    pub topologies_running: usize,
    /// Topologies stopped.
    pub topologies_stopped: usize,
    /// Roots acked per second over every topology.
    pub msgs_per_sec: f64,
    /// Roots acked over every running topology, in total.
    pub acked: u64,
    /// Roots failed or timed out over every running topology, in total.
    pub failed: u64,
}

/// One topology in detail.
#[derive(Clone, Debug, Serialize, ToSchema)]
pub struct TopologyDetail {
    /// The summary.
    #[serde(flatten)]
    pub summary: TopologySummary,
    /// The overrides it was deployed with.
    pub config: String,
    /// The environment variables its processes get, their values shown as
    /// `***`: they are write-only (database passwords live there).
    pub env: BTreeMap<String, String>,
    /// Whether it has a data-plane secret (never shown).
    pub data_secret: bool,
    /// Its effective `Topology.toml`: the package's, the overrides, its name
    /// and worker counts. Its processes run with the same text without the
    /// worker counts (a worker is given its task's count on its command line).
    pub effective_config: String,
    /// Its processes and where they run.
    pub placement: Vec<ProcessView>,
    /// Per task: workers, messages in, msgs/s, errors, handle p99, capacity.
    pub tasks: BTreeMap<String, TaskFigures>,
    /// The sources' figures, summed over every source.
    pub source: SourceFigures,
    /// Per source, by name (`default` for a topology's one unnamed source):
    /// health, polled, acked, failed, errors, in flight, acked/s. Empty
    /// until its server reports them.
    pub sources: BTreeMap<String, PerSourceFigures>,
    /// The pipeline's edges, as its running server reports them (empty
    /// until then).
    pub edges: Vec<PipelineEdge>,
    /// The edges from sources to the tasks they feed, as its running server
    /// reports them (empty until then, and from a server older than named
    /// sources, whose one source feeds the task no edge leads to).
    pub source_edges: Vec<SourceEdge>,
    /// Its processes that failed or are backing off.
    pub recent_errors: Vec<RecentError>,
}

/// The cluster state and the decisions over it.
pub struct Director {
    inner: Mutex<Inner>,
    scheduler: Box<dyn Scheduler>,
    settings: Settings,
    /// Agents get a full timeout from the director's start before they
    /// count as down, so a restarted director does not move everything.
    started_ms: u64,
    /// When this director first heard any agent (0: not yet). Until some
    /// agent is heard, a silent agent proves nothing (the director itself
    /// may be unreachable or still starting), so nothing counts as down;
    /// after that, an agent has a full timeout from then to be heard too.
    first_beat_ms: std::sync::atomic::AtomicU64,
}

struct Inner {
    store: Store,
    s: Snapshot,
    /// The configuration texts of each topology.
    effective: HashMap<String, Configs>,
    /// The last scrape's figures of each running topology.
    figures: HashMap<String, Figures>,
}

/// A topology's `Topology.toml` texts, derived from its record (they are
/// not stored: a restarted director derives the same texts again).
#[derive(Clone, Debug, PartialEq, Eq)]
struct Configs {
    /// The effective `Topology.toml` ([`effective_config`]): validated, and
    /// shown by the API and the UI.
    effective: String,
    /// What its processes run with ([`process_config`]): the same without
    /// worker counts, so that it stays the same across rebalances.
    processes: String,
}

impl Configs {
    fn of(
        name: &str,
        package_toml: Option<&str>,
        overrides: &str,
        workers: &BTreeMap<String, u32>,
    ) -> Result<Configs, Error> {
        Ok(Configs {
            effective: effective_config(name, package_toml, overrides, workers)?,
            processes: process_config(name, package_toml, overrides)?,
        })
    }
}

/// One process a running topology needs.
struct Want {
    id: String,
    topology: String,
    server: bool,
}

impl Director {
    /// Opens the state in `settings.data_dir` and reconciles it.
    pub fn open(settings: Settings, scheduler: Box<dyn Scheduler>) -> anyhow::Result<Director> {
        crate::store::private_dir(&settings.data_dir)
            .map_err(|e| anyhow::anyhow!("creating {}: {e}", settings.data_dir.display()))?;
        let mut store = Store::open(&settings.data_dir)?;
        let mut s = store.load()?;
        // Topologies deployed by a director that made no data-plane secret
        // (or, now that it has the cluster CA, no certificate) get one now
        // (their processes restart once, with it).
        let mut given = Vec::new();
        for t in s.topologies.values_mut() {
            let secret = t.data_secret.is_none();
            if secret {
                t.data_secret = Some(Secret::generate()?);
            }
            let cert = match (&settings.ca, &t.data_tls) {
                (Some(ca), None) => {
                    t.data_tls = Some(ca.issue_data(&t.name)?);
                    true
                }
                _ => false,
            };
            if secret || cert {
                given.push(t.name.clone());
            }
        }
        if !given.is_empty() {
            let records: Vec<&TopologyRecord> = given.iter().map(|n| &s.topologies[n]).collect();
            store.save(&records, &[], &s.placements, s.next_generation)?;
            tracing::info!(
                "gave a data-plane secret or certificate to {}",
                given.join(", ")
            );
        }
        let mut effective = HashMap::new();
        for t in s.topologies.values() {
            let pkg = s
                .packages
                .get(&t.package)
                .and_then(|p| p.topology_toml.as_deref());
            match Configs::of(&t.name, pkg, &t.config, &t.workers) {
                Ok(configs) => {
                    effective.insert(t.name.clone(), configs);
                }
                Err(e) => tracing::error!("topology {}: {e}", t.name),
            }
        }
        tracing::info!(
            "loaded {} agents, {} packages, {} topologies, {} placements",
            s.agents.len(),
            s.packages.len(),
            s.topologies.len(),
            s.placements.len()
        );
        Ok(Director {
            inner: Mutex::new(Inner {
                store,
                s,
                effective,
                figures: HashMap::new(),
            }),
            scheduler,
            settings,
            started_ms: now_ms(),
            first_beat_ms: std::sync::atomic::AtomicU64::new(0),
        })
    }

    /// The settings.
    pub fn settings(&self) -> &Settings {
        &self.settings
    }

    fn is_up(&self, a: &AgentRecord, now: u64) -> bool {
        let first = self
            .first_beat_ms
            .load(std::sync::atomic::Ordering::Relaxed);
        if first == 0 {
            return true;
        }
        let seen = a.last_heartbeat_ms.max(self.started_ms).max(first);
        now.saturating_sub(seen) <= self.settings.agent_timeout.as_millis() as u64
    }

    /// Re-places what needs it (agents gone down, topologies changed) and
    /// persists the result.
    pub fn tick(&self) -> Result<(), Error> {
        let mut inner = self.inner.lock();
        if self.reconcile(&mut inner) {
            inner.persist(&[], &[])?;
        }
        Ok(())
    }

    /// Makes the placements match the running topologies and the live
    /// agents. Returns whether anything changed.
    fn reconcile(&self, inner: &mut Inner) -> bool {
        let now = now_ms();
        let s = &mut inner.s;
        let live: BTreeSet<String> = s
            .agents
            .values()
            .filter(|a| self.is_up(a, now))
            .map(|a| a.id.clone())
            .collect();
        let mut wants: Vec<Want> = Vec::new();
        for t in s.topologies.values() {
            if t.state != Lifecycle::Running || !inner.effective.contains_key(&t.name) {
                continue;
            }
            wants.push(Want {
                id: server_id(&t.name),
                topology: t.name.clone(),
                server: true,
            });
            for (task, n) in &t.workers {
                for i in 0..*n {
                    wants.push(Want {
                        id: worker_id(&t.name, task, i),
                        topology: t.name.clone(),
                        server: false,
                    });
                }
            }
        }
        let wanted: BTreeSet<&str> = wants.iter().map(|w| w.id.as_str()).collect();
        let before = s.placements.len();
        s.placements.retain(|id, _| wanted.contains(id.as_str()));
        let mut changed = s.placements.len() != before;
        let mut loads: Vec<AgentLoad> = live
            .iter()
            .map(|id| AgentLoad {
                id: id.clone(),
                processes: s.placements.values().filter(|p| &p.agent == id).count(),
            })
            .collect();
        // Servers first, so the load spreads the workers around them.
        wants.sort_by_key(|w| !w.server);
        for w in &wants {
            if let Some(p) = s.placements.get(&w.id) {
                // A process stays where it is while its agent lives, or
                // while there is nowhere else to put it.
                if live.contains(&p.agent) || loads.is_empty() {
                    continue;
                }
            }
            if loads.is_empty() {
                continue;
            }
            let i = self.scheduler.choose(&w.id, &loads);
            loads[i].processes += 1;
            let generation = s.next_generation;
            s.next_generation += 1;
            if let Some(old) = s.placements.get(&w.id) {
                tracing::info!(
                    "re-placing {} from {} (down) on {} (generation {generation})",
                    w.id,
                    old.agent,
                    loads[i].id
                );
            }
            s.placements.insert(
                w.id.clone(),
                PlacementRecord {
                    process: w.id.clone(),
                    topology: w.topology.clone(),
                    agent: loads[i].id.clone(),
                    generation,
                },
            );
            changed = true;
        }
        changed
    }

    /// Records a heartbeat and answers the agent's assignment.
    pub fn heartbeat(&self, hb: Heartbeat) -> Result<Assignment, Error> {
        if hb.agent_id.trim().is_empty() || hb.address.trim().is_empty() {
            return Err(Error::BadRequest(
                "a heartbeat needs an agent_id and an address".into(),
            ));
        }
        check_name("agent id", &hb.agent_id)?;
        crate::agents::check_address(&hb.address).map_err(Error::BadRequest)?;
        let _ = self.first_beat_ms.compare_exchange(
            0,
            now_ms(),
            std::sync::atomic::Ordering::Relaxed,
            std::sync::atomic::Ordering::Relaxed,
        );
        let mut inner = self.inner.lock();
        let record = AgentRecord {
            id: hb.agent_id.clone(),
            address: hb.address,
            last_heartbeat_ms: now_ms(),
            node: hb.node,
            processes: hb.processes,
        };
        if !inner.s.agents.contains_key(&record.id) {
            tracing::info!("agent {} at {} joined", record.id, record.address);
        }
        inner.store.put_agent(&record)?;
        inner.s.agents.insert(record.id.clone(), record);
        if self.reconcile(&mut inner) {
            inner.persist(&[], &[])?;
        }
        Ok(inner.assignment(&hb.agent_id))
    }

    /// Every agent.
    pub fn agents(&self) -> Vec<AgentView> {
        let inner = self.inner.lock();
        let now = now_ms();
        inner
            .s
            .agents
            .values()
            .map(|a| AgentView {
                id: a.id.clone(),
                address: a.address.clone(),
                up: self.is_up(a, now),
                last_heartbeat_ms: a.last_heartbeat_ms,
                node: a.node.clone(),
                placed: inner
                    .s
                    .placements
                    .values()
                    .filter(|p| p.agent == a.id)
                    .count(),
                processes: a.processes.clone(),
            })
            .collect()
    }

    /// Verifies and stores a package archive. Returns whether it is new.
    pub fn upload(&self, archive: &[u8]) -> Result<(bool, PackageView), Error> {
        // Verified without keeping the binary: a gzip bomb inflates to
        // nothing in memory (only the manifest and Topology.toml are kept).
        let pkg = package::verify(archive, self.settings.max_upload.saturating_mul(4))
            .map_err(|e| Error::BadRequest(format!("the package was refused: {e}")))?;
        if let Some(toml) = &pkg.topology_toml {
            TopologyFile::parse(toml, Some(Path::new("Topology.toml"))).map_err(|e| {
                Error::BadRequest(format!("the package's Topology.toml is invalid: {e}"))
            })?;
            declared_workers(toml)?;
        }
        let hash = sha256_hex(archive);
        let mut inner = self.inner.lock();
        if let Some(p) = inner.s.packages.get(&hash) {
            return Ok((false, package_view(p)));
        }
        let record = PackageRecord {
            hash: hash.clone(),
            manifest: pkg.manifest,
            topology_toml: pkg.topology_toml,
            size: archive.len() as u64,
            uploaded_at_ms: now_ms(),
        };
        inner
            .store
            .put_package(&record, archive)
            .map_err(Error::internal)?;
        tracing::info!(
            "stored package {} {} ({hash})",
            record.manifest.name,
            record.manifest.version
        );
        let view = package_view(&record);
        inner.s.packages.insert(hash, record);
        Ok((true, view))
    }

    /// Every package.
    pub fn packages(&self) -> Vec<PackageView> {
        self.inner
            .lock()
            .s
            .packages
            .values()
            .map(package_view)
            .collect()
    }

    /// Where a package's archive is.
    pub fn archive(&self, hash: &str) -> Result<PathBuf, Error> {
        let inner = self.inner.lock();
        if !is_content_hash(hash) || !inner.s.packages.contains_key(hash) {
            return Err(Error::NotFound(format!("no package {hash}")));
        }
        Ok(inner.store.archive_path(hash))
    }

    /// Deploys a package as a named, running topology.
    pub fn deploy(&self, req: DeployRequest) -> Result<TopologyDetail, Error> {
        check_name("topology name", &req.name)?;
        let mut inner = self.inner.lock();
        let pkg = inner
            .s
            .packages
            .get(&req.package)
            .ok_or_else(|| Error::NotFound(format!("no package {}", req.package)))?;
        if inner.s.topologies.contains_key(&req.name) {
            return Err(Error::Conflict(format!(
                "a topology named {} is already deployed",
                req.name
            )));
        }
        let overrides = req.config.unwrap_or_default();
        TopologyFile::parse(&overrides, Some(Path::new("config")))
            .map_err(|e| Error::BadRequest(format!("invalid config: {e}")))?;
        let mut workers = pkg
            .topology_toml
            .as_deref()
            .map(declared_workers)
            .transpose()?
            .unwrap_or_default();
        let known: BTreeSet<String> = workers.keys().cloned().collect();
        workers.extend(declared_workers(&overrides)?);
        for (task, n) in &req.workers {
            if !known.is_empty() && !known.contains(task) {
                return Err(Error::BadRequest(format!(
                    "unknown task `{task}`; the package's tasks are {}",
                    known.iter().cloned().collect::<Vec<_>>().join(", ")
                )));
            }
            workers.insert(task.clone(), *n);
        }
        if workers.is_empty() {
            return Err(Error::BadRequest(
                "the package's Topology.toml gives no [tasks.NAME] workers, so the request must \
                 give `workers` for every task, e.g. {\"split\": 1, \"count\": 2}"
                    .into(),
            ));
        }
        check_workers(&workers)?;
        check_env(&req.env)?;
        let data_secret = Secret::generate().map_err(Error::internal)?;
        let data_tls = match &self.settings.ca {
            Some(ca) => Some(ca.issue_data(&req.name).map_err(Error::internal)?),
            None => None,
        };
        let effective = Configs::of(
            &req.name,
            pkg.topology_toml.as_deref(),
            &overrides,
            &workers,
        )?;
        let record = TopologyRecord {
            name: req.name.clone(),
            package: req.package,
            config: overrides,
            state: Lifecycle::Running,
            workers,
            env: req.env,
            data_secret: Some(data_secret),
            data_tls,
            generation: 1,
            created_at_ms: now_ms(),
        };
        let saved = inner.checkpoint();
        inner.s.topologies.insert(record.name.clone(), record);
        inner.effective.insert(req.name.clone(), effective);
        self.reconcile(&mut inner);
        if let Err(e) = inner.persist(&[&req.name], &[]) {
            inner.restore(saved);
            return Err(e);
        }
        tracing::info!("deployed topology {}", req.name);
        Ok(self.detail(&inner, &req.name))
    }

    /// Applies an operator's command to a topology.
    pub fn command(&self, name: &str, command: Command) -> Result<Option<TopologyDetail>, Error> {
        let mut inner = self.inner.lock();
        let t = inner
            .s
            .topologies
            .get(name)
            .ok_or_else(|| Error::NotFound(format!("no topology {name}")))?;
        let transition = t
            .state
            .next(command)
            .map_err(|e| Error::Conflict(format!("{name}: {e}")))?;
        let saved = inner.checkpoint();
        let result = self.apply(&mut inner, name, transition);
        if result.is_err() {
            inner.restore(saved);
        }
        result
    }

    fn apply(
        &self,
        inner: &mut Inner,
        name: &str,
        transition: Transition,
    ) -> Result<Option<TopologyDetail>, Error> {
        match transition {
            Transition::Remove => {
                inner.s.topologies.remove(name);
                inner.effective.remove(name);
                self.reconcile(inner);
                inner.persist(&[], &[name])?;
                tracing::info!("killed topology {name}");
                return Ok(None);
            }
            Transition::To(state) => {
                let t = inner.s.topologies.get_mut(name).expect("checked");
                t.state = state;
                t.generation += 1;
                tracing::info!("topology {name} is now {}", state.as_db());
            }
            Transition::Rebalance(changes) => {
                let t = inner.s.topologies.get(name).expect("checked");
                let mut workers = t.workers.clone();
                for (task, n) in changes {
                    if !workers.contains_key(&task) {
                        return Err(Error::BadRequest(format!(
                            "unknown task `{task}`; {name}'s tasks are {}",
                            workers.keys().cloned().collect::<Vec<_>>().join(", ")
                        )));
                    }
                    workers.insert(task, n);
                }
                check_workers(&workers)?;
                let pkg = inner
                    .s
                    .packages
                    .get(&t.package)
                    .and_then(|p| p.topology_toml.clone());
                let effective = Configs::of(name, pkg.as_deref(), &t.config, &workers)?;
                inner.effective.insert(name.to_owned(), effective);
                let t = inner.s.topologies.get_mut(name).expect("checked");
                let old = std::mem::replace(&mut t.workers, workers);
                t.generation += 1;
                let moved = relayout(&mut inner.s, name, &old);
                tracing::info!(
                    "rebalanced topology {name}: {} worker(s) of the changed tasks get a new \
                     generation",
                    moved.len()
                );
            }
        }
        self.reconcile(inner);
        inner.persist(&[name], &[])?;
        Ok(Some(self.detail(inner, name)))
    }

    /// The API addresses of the live agents, to scrape.
    pub fn live_agents(&self) -> Vec<String> {
        let now = now_ms();
        self.inner
            .lock()
            .s
            .agents
            .values()
            .filter(|a| self.is_up(a, now))
            .map(|a| a.address.clone())
            .collect()
    }

    /// Turns one scrape of every live agent into each running topology's
    /// figures and stores a point of its series.
    pub fn record_metrics(
        &self,
        samples: &[crate::metrics::Sample],
        ts_ms: u64,
    ) -> Result<(), Error> {
        let mut inner = self.inner.lock();
        let inner = &mut *inner;
        let running: Vec<(String, BTreeMap<String, u32>)> = inner
            .s
            .topologies
            .values()
            .filter(|t| t.state == Lifecycle::Running)
            .map(|t| (t.name.clone(), t.workers.clone()))
            .collect();
        inner
            .figures
            .retain(|name, _| running.iter().any(|(n, _)| n == name));
        for (name, workers) in running {
            let f = Figures::compute(&name, samples, &workers, inner.figures.get(&name), ts_ms);
            let point = SamplePoint {
                ts: ts_ms,
                acked: f.acked,
                failed: f.failed,
                in_flight: f.in_flight,
                rate: f.msgs_per_sec,
                p50_ms: f.p50_ms,
                p99_ms: f.p99_ms,
            };
            inner
                .store
                .put_sample(&name, &point, SAMPLES_KEPT.as_millis() as u64)?;
            inner.figures.insert(name, f);
        }
        Ok(())
    }

    /// A topology's stored series of the last 15 minutes.
    pub fn samples(&self, name: &str) -> Result<Vec<SamplePoint>, Error> {
        let inner = self.inner.lock();
        if !inner.s.topologies.contains_key(name) {
            return Err(Error::NotFound(format!("no topology {name}")));
        }
        let keep = now_ms().saturating_sub(SAMPLES_KEPT.as_millis() as u64);
        let mut out = inner.store.samples(name)?;
        out.retain(|p| p.ts >= keep);
        Ok(out)
    }

    /// The address of the agent a topology's process is placed on. `id` is
    /// the process id, with or without the `topology/` prefix.
    pub fn process_agent(&self, name: &str, id: &str) -> Result<(String, String), Error> {
        let inner = self.inner.lock();
        if !inner.s.topologies.contains_key(name) {
            return Err(Error::NotFound(format!("no topology {name}")));
        }
        let full = if id.starts_with(&format!("{name}/")) {
            id.to_owned()
        } else {
            format!("{name}/{id}")
        };
        let agent = inner
            .s
            .placements
            .get(&full)
            .filter(|p| p.topology == name)
            .and_then(|p| inner.s.agents.get(&p.agent))
            .ok_or_else(|| Error::NotFound(format!("topology {name} has no process {id}")))?;
        Ok((full, agent.address.clone()))
    }

    /// The cluster at a glance.
    pub fn cluster(&self) -> ClusterSummary {
        let inner = self.inner.lock();
        let now = now_ms();
        let up = inner
            .s
            .agents
            .values()
            .filter(|a| self.is_up(a, now))
            .count();
        let running = inner
            .s
            .topologies
            .values()
            .filter(|t| t.state == Lifecycle::Running)
            .count();
        ClusterSummary {
            agents_up: up,
            agents_down: inner.s.agents.len() - up,
            topologies_running: running,
            topologies_stopped: inner.s.topologies.len() - running,
            msgs_per_sec: inner.figures.values().map(|f| f.msgs_per_sec).sum(),
            acked: inner.figures.values().map(|f| f.acked).sum(),
            failed: inner.figures.values().map(|f| f.failed).sum(),
        }
    }

    /// Every topology.
    pub fn topologies(&self) -> Vec<TopologySummary> {
        let inner = self.inner.lock();
        inner
            .s
            .topologies
            .keys()
            .map(|n| self.detail(&inner, n).summary)
            .collect()
    }

    /// One topology.
    pub fn topology(&self, name: &str) -> Result<TopologyDetail, Error> {
        let inner = self.inner.lock();
        if !inner.s.topologies.contains_key(name) {
            return Err(Error::NotFound(format!("no topology {name}")));
        }
        Ok(self.detail(&inner, name))
    }

    fn detail(&self, inner: &Inner, name: &str) -> TopologyDetail {
        let now = now_ms();
        let s = &inner.s;
        let t = &s.topologies[name];
        let assigned: BTreeMap<String, ProcessSpec> = s
            .placements
            .values()
            .filter(|p| p.topology == name)
            .map(|p| p.agent.clone())
            .collect::<BTreeSet<_>>()
            .into_iter()
            .flat_map(|a| inner.assignment(&a).processes)
            .map(|spec| (spec.id.clone(), spec))
            .collect();
        let mut placement = Vec::new();
        for p in s.placements.values().filter(|p| p.topology == name) {
            let agent = s.agents.get(&p.agent);
            let status = agent
                .and_then(|a| a.processes.iter().find(|st| st.id == p.process))
                .filter(|st| st.generation == p.generation);
            let (role, task, instance) = parse_process_id(name, &p.process);
            let state = match status {
                Some(st) => state_name(st.state).to_owned(),
                None if !assigned.contains_key(&p.process) => "waiting".into(),
                None => "pending".into(),
            };
            placement.push(ProcessView {
                id: p.process.clone(),
                role: if role == Role::Topology {
                    "topology"
                } else {
                    "task"
                }
                .into(),
                task,
                instance,
                agent: p.agent.clone(),
                agent_up: agent.is_some_and(|a| self.is_up(a, now)),
                generation: p.generation,
                state,
                pid: status.and_then(|st| st.pid),
                address: status.and_then(|st| st.address.clone()),
                restarts: status.map_or(0, |st| st.restarts),
                uptime_secs: status.map_or(0, |st| st.uptime_secs),
                error: status.and_then(|st| st.error.clone()),
            });
        }
        let expected = 1 + t.workers.values().map(|n| *n as usize).sum::<usize>();
        let running = placement.iter().filter(|p| p.state == "running").count();
        let phase = match t.state {
            Lifecycle::Running => {
                if placement
                    .iter()
                    .any(|p| p.state == "failed" || p.state == "backoff")
                {
                    Phase::Recovering
                } else if running == expected {
                    Phase::Running
                } else {
                    Phase::Scheduling
                }
            }
            Lifecycle::Stopped => {
                let still = s.agents.values().any(|a| {
                    self.is_up(a, now)
                        && a.processes.iter().any(|st| {
                            st.topology == name
                                && matches!(
                                    st.state,
                                    ProcessState::Running
                                        | ProcessState::Starting
                                        | ProcessState::Stopping
                                        | ProcessState::Backoff
                                )
                        })
                });
                if still {
                    Phase::Stopping
                } else {
                    Phase::Stopped
                }
            }
        };
        let figures = inner.figures.get(name);
        let recent_errors = placement
            .iter()
            .filter(|p| p.state == "failed" || p.state == "backoff")
            .map(|p| RecentError {
                process: p.id.clone(),
                agent: p.agent.clone(),
                state: p.state.clone(),
                restarts: p.restarts,
                error: p.error.clone(),
            })
            .collect();
        let package_name = s
            .packages
            .get(&t.package)
            .map(|p| format!("{} {}", p.manifest.name, p.manifest.version))
            .unwrap_or_default();
        TopologyDetail {
            summary: TopologySummary {
                name: t.name.clone(),
                package: t.package.clone(),
                package_name,
                state: t.state,
                phase,
                generation: t.generation,
                workers: t.workers.clone(),
                processes: if t.state == Lifecycle::Running {
                    expected
                } else {
                    0
                },
                running,
                created_at_ms: t.created_at_ms,
                uptime_secs: placement
                    .iter()
                    .find(|p| p.role == "topology" && p.state == "running")
                    .map_or(0, |p| p.uptime_secs),
                msgs_per_sec: figures.map_or(0.0, |f| f.msgs_per_sec),
                acked: figures.map_or(0, |f| f.acked),
                failed: figures.map_or(0, |f| f.failed),
                in_flight: figures.map_or(0, |f| f.in_flight),
                p50_ms: figures.and_then(|f| f.p50_ms),
                p99_ms: figures.and_then(|f| f.p99_ms),
            },
            config: t.config.clone(),
            env: t
                .env
                .keys()
                .map(|k| (k.clone(), "***".to_owned()))
                .collect(),
            data_secret: t.data_secret.is_some(),
            effective_config: inner
                .effective
                .get(name)
                .map(|c| c.effective.clone())
                .unwrap_or_default(),
            // The worker counts asked for, not those of the last scrape,
            // so a rebalance shows at once.
            tasks: t
                .workers
                .iter()
                .map(|(task, n)| {
                    let figures = figures.and_then(|f| f.tasks.get(task)).cloned();
                    (
                        task.clone(),
                        TaskFigures {
                            workers: *n,
                            ..figures.unwrap_or_default()
                        },
                    )
                })
                .collect(),
            source: figures.map(|f| f.source.clone()).unwrap_or_default(),
            sources: figures.map(|f| f.sources.clone()).unwrap_or_default(),
            edges: figures.map(|f| f.edges.clone()).unwrap_or_default(),
            source_edges: figures.map(|f| f.source_edges.clone()).unwrap_or_default(),
            recent_errors,
            placement,
        }
    }
}

type Checkpoint = (
    BTreeMap<String, TopologyRecord>,
    BTreeMap<String, PlacementRecord>,
    u64,
    HashMap<String, Configs>,
);

impl Inner {
    fn checkpoint(&self) -> Checkpoint {
        (
            self.s.topologies.clone(),
            self.s.placements.clone(),
            self.s.next_generation,
            self.effective.clone(),
        )
    }

    fn restore(&mut self, c: Checkpoint) {
        self.s.topologies = c.0;
        self.s.placements = c.1;
        self.s.next_generation = c.2;
        self.effective = c.3;
    }

    fn persist(&mut self, changed: &[&str], removed: &[&str]) -> Result<(), Error> {
        let topologies: Vec<&TopologyRecord> = changed
            .iter()
            .filter_map(|n| self.s.topologies.get(*n))
            .collect();
        self.store.save(
            &topologies,
            removed,
            &self.s.placements,
            self.s.next_generation,
        )?;
        Ok(())
    }

    /// What `agent` should run. A worker is left out until its topology
    /// server reports the address it listens on.
    fn assignment(&self, agent: &str) -> Assignment {
        let s = &self.s;
        let mut processes = Vec::new();
        for p in s.placements.values().filter(|p| p.agent == agent) {
            let Some(t) = s.topologies.get(&p.topology) else {
                continue;
            };
            let Some(configs) = self.effective.get(&t.name) else {
                continue;
            };
            let (role, task, instance) = parse_process_id(&t.name, &p.process);
            let topology_addr = if role == Role::Task {
                match self.server_address(&t.name) {
                    Some(a) => Some(a),
                    None => continue,
                }
            } else {
                None
            };
            // A worker's task count in the current layout; its generation
            // is that layout's version.
            let instances = task.as_ref().and_then(|task| t.workers.get(task)).copied();
            processes.push(ProcessSpec {
                id: p.process.clone(),
                topology: t.name.clone(),
                package: t.package.clone(),
                role,
                task,
                instance,
                instances,
                topology_addr,
                config: Some(configs.processes.clone()),
                env: t.env.clone(),
                data_secret: t.data_secret.clone(),
                data_tls: t.data_tls.clone(),
                generation: p.generation,
            });
        }
        Assignment { processes }
    }

    /// The address the current generation of a topology's server reports.
    fn server_address(&self, topology: &str) -> Option<String> {
        let id = server_id(topology);
        let p = self.s.placements.get(&id)?;
        let agent = self.s.agents.get(&p.agent)?;
        agent
            .processes
            .iter()
            .find(|st| {
                st.id == id && st.generation == p.generation && st.state == ProcessState::Running
            })
            .and_then(|st| st.address.clone())
    }
}

/// After a rebalance of `topology` from the worker counts `old` to those of
/// its record: the placed workers of every task whose count changed, and
/// that stay, get a new generation, the version of their task's new layout
/// (a worker runs with its task's count, and the topology server adopts the
/// count of the highest layout). The workers of the other tasks and the
/// server keep theirs, so their agents leave them running. Instances beyond
/// a shrunk count and new ones are left to [`Director::reconcile`], which
/// drops and places them. Returns the ids given a new generation.
fn relayout(s: &mut Snapshot, topology: &str, old: &BTreeMap<String, u32>) -> Vec<String> {
    let Some(t) = s.topologies.get(topology) else {
        return Vec::new();
    };
    let changed: BTreeMap<&str, u32> = t
        .workers
        .iter()
        .filter(|(task, n)| old.get(*task) != Some(*n))
        .map(|(task, n)| (task.as_str(), *n))
        .collect();
    let mut moved = Vec::new();
    for p in s.placements.values_mut().filter(|p| p.topology == topology) {
        let (_, task, instance) = parse_process_id(topology, &p.process);
        let (Some(task), Some(instance)) = (task, instance) else {
            continue;
        };
        if changed.get(task.as_str()).is_some_and(|n| instance < *n) {
            p.generation = s.next_generation;
            s.next_generation += 1;
            moved.push(p.process.clone());
        }
    }
    moved
}

fn package_view(p: &PackageRecord) -> PackageView {
    PackageView {
        hash: p.hash.clone(),
        manifest: p.manifest.clone(),
        topology_toml: p.topology_toml.clone(),
        size: p.size,
        uploaded_at_ms: p.uploaded_at_ms,
    }
}

fn state_name(s: ProcessState) -> &'static str {
    match s {
        ProcessState::Starting => "starting",
        ProcessState::Running => "running",
        ProcessState::Backoff => "backoff",
        ProcessState::Stopping => "stopping",
        ProcessState::Stopped => "stopped",
        ProcessState::Failed => "failed",
    }
}

/// A topology server's process id.
pub fn server_id(topology: &str) -> String {
    format!("{topology}/server")
}

/// A worker's process id.
pub fn worker_id(topology: &str, task: &str, instance: u32) -> String {
    format!("{topology}/{task}/{instance}")
}

fn parse_process_id(topology: &str, id: &str) -> (Role, Option<String>, Option<u32>) {
    let rest = id
        .strip_prefix(topology)
        .and_then(|r| r.strip_prefix('/'))
        .unwrap_or(id);
    match rest.rsplit_once('/') {
        Some((task, i)) => (Role::Task, Some(task.to_owned()), i.parse().ok()),
        None => (Role::Topology, None, None),
    }
}

fn check_name(what: &str, name: &str) -> Result<(), Error> {
    tempest_control::check_name(what, name).map_err(Error::BadRequest)
}

fn check_env(env: &BTreeMap<String, String>) -> Result<(), Error> {
    env.iter()
        .try_for_each(|(name, value)| tempest_control::check_env_var(name, value))
        .map_err(Error::BadRequest)
}

fn check_workers(workers: &BTreeMap<String, u32>) -> Result<(), Error> {
    for (task, n) in workers {
        check_name("task name", task)?;
        if !(1..=MAX_WORKERS).contains(n) {
            return Err(Error::BadRequest(format!(
                "task `{task}`: workers must be 1 to {MAX_WORKERS}, not {n}"
            )));
        }
    }
    Ok(())
}

/// The `[tasks.NAME] workers` a `Topology.toml` gives.
fn declared_workers(text: &str) -> Result<BTreeMap<String, u32>, Error> {
    let table: toml::Table = text
        .parse()
        .map_err(|e| Error::BadRequest(format!("invalid Topology.toml: {e}")))?;
    let mut out = BTreeMap::new();
    if let Some(toml::Value::Table(tasks)) = table.get("tasks") {
        for (task, v) in tasks {
            if let Some(n) = v.get("workers").and_then(toml::Value::as_integer) {
                let n = u32::try_from(n).map_err(|_| {
                    Error::BadRequest(format!("task `{task}`: bad worker count {n}"))
                })?;
                out.insert(task.clone(), n);
            }
        }
    }
    Ok(out)
}

fn merge(base: &mut toml::Table, over: toml::Table) {
    for (k, v) in over {
        match (base.get_mut(&k), v) {
            (Some(toml::Value::Table(b)), toml::Value::Table(o)) => merge(b, o),
            (_, v) => {
                base.insert(k, v);
            }
        }
    }
}

/// The package's `Topology.toml`, the overrides over it, the name over both.
fn base_config(
    name: &str,
    package_toml: Option<&str>,
    overrides: &str,
) -> Result<toml::Table, Error> {
    let parse = |what: &str, text: &str| -> Result<toml::Table, Error> {
        text.parse()
            .map_err(|e| Error::BadRequest(format!("invalid {what}: {e}")))
    };
    let mut table = parse("package Topology.toml", package_toml.unwrap_or(""))?;
    merge(&mut table, parse("config", overrides)?);
    table.insert("name".into(), toml::Value::String(name.into()));
    Ok(table)
}

/// Serializes `table` and checks that it is a valid `Topology.toml`.
fn checked(table: &toml::Table) -> Result<String, Error> {
    let text = toml::to_string(table).map_err(Error::internal)?;
    TopologyFile::parse(&text, Some(Path::new("Topology.toml")))
        .map_err(|e| Error::BadRequest(format!("invalid configuration: {e}")))?;
    Ok(text)
}

/// A topology's effective `Topology.toml`: the package's own, the overrides
/// over it, its name and worker counts over both. It is what the API and
/// the UI show, and it is validated before a deploy or a rebalance is
/// stored. Its processes get [`process_config`].
pub fn effective_config(
    name: &str,
    package_toml: Option<&str>,
    overrides: &str,
    workers: &BTreeMap<String, u32>,
) -> Result<String, Error> {
    let mut table = base_config(name, package_toml, overrides)?;
    let mut tasks = toml::Table::new();
    for (task, n) in workers {
        let mut t = toml::Table::new();
        t.insert("workers".into(), toml::Value::Integer(i64::from(*n)));
        tasks.insert(task.clone(), toml::Value::Table(t));
    }
    merge(
        &mut table,
        [("tasks".to_owned(), toml::Value::Table(tasks))]
            .into_iter()
            .collect(),
    );
    checked(&table)
}

/// The `Topology.toml` a topology's processes run with: the package's own,
/// the overrides over it, its name over both, and no worker counts (those
/// of the package and the overrides are dropped too). A worker is told its
/// task's count in its spec (`instances`, with its generation as the layout
/// version) and the topology server learns the counts from its workers, so
/// this text does not change when a count does: a rebalance restarts only
/// the workers of the tasks whose count changed.
pub fn process_config(
    name: &str,
    package_toml: Option<&str>,
    overrides: &str,
) -> Result<String, Error> {
    let mut table = base_config(name, package_toml, overrides)?;
    if let Some(toml::Value::Table(tasks)) = table.get_mut("tasks") {
        for (_, t) in tasks.iter_mut() {
            if let toml::Value::Table(t) = t {
                t.remove("workers");
            }
        }
        tasks.retain(|_, t| !matches!(t, toml::Value::Table(t) if t.is_empty()));
    }
    if matches!(table.get("tasks"), Some(toml::Value::Table(t)) if t.is_empty()) {
        table.remove("tasks");
    }
    checked(&table)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::placement::LeastLoaded;

    const TOML: &str =
        "[tasks.split]\nworkers = 1\n\n[tasks.count]\nworkers = 2\n\n[tasks.output]\nworkers = 1\n";

    /// Where each process is placed, and its spec.
    type Placed = BTreeMap<String, (String, ProcessSpec)>;

    fn open(dir: &Path) -> Director {
        Director::open(
            Settings {
                data_dir: dir.join("data"),
                // No agent counts as down during a test.
                agent_timeout: Duration::from_secs(3600),
                max_upload: 1 << 20,
                ca: None,
            },
            Box::new(LeastLoaded),
        )
        .unwrap()
    }

    /// A director with agents `a` and `b` and word count deployed.
    fn deployed(dir: &Path) -> Director {
        let d = open(dir);
        for agent in ["a", "b"] {
            beat(&d, agent, &[]);
        }
        let (archive, hash) = tempest_testkit::cluster::script_package(
            dir,
            "wordcount",
            "#!/bin/sh\nexec sleep 600\n",
            Some(TOML),
        );
        d.upload(&archive).unwrap();
        d.deploy(DeployRequest {
            name: "wc".into(),
            package: hash,
            config: Some("max_pending = 64\n".into()),
            workers: BTreeMap::new(),
            env: [("WORDCOUNT_REDIS".to_owned(), "redis://r".to_owned())].into(),
        })
        .unwrap();
        d
    }

    /// A heartbeat of `agent` reporting `running` as running (a server
    /// with its address); answers its assignment.
    fn beat(d: &Director, agent: &str, running: &[ProcessSpec]) -> Assignment {
        let processes = running
            .iter()
            .map(|spec| ProcessStatus {
                id: spec.id.clone(),
                topology: spec.topology.clone(),
                role: spec.role,
                task: spec.task.clone(),
                instance: spec.instance,
                pid: Some(100),
                state: ProcessState::Running,
                restarts: 0,
                uptime_secs: 1,
                address: Some(format!("{agent}.test:7500")),
                metrics_address: None,
                generation: spec.generation,
                error: None,
            })
            .collect();
        d.heartbeat(Heartbeat {
            agent_id: agent.into(),
            address: format!("{agent}.test:7400"),
            node: NodeInfo::default(),
            processes,
        })
        .unwrap()
    }

    /// Heartbeats from `a` and `b`, each running what it was assigned,
    /// until no assignment changes.
    fn settle(d: &Director) -> Placed {
        let mut last: BTreeMap<&str, Assignment> = BTreeMap::new();
        for _ in 0..10 {
            let mut changed = false;
            for agent in ["a", "b"] {
                let running = last.get(agent).cloned().unwrap_or_default();
                let now = beat(d, agent, &running.processes);
                changed |= last.get(agent) != Some(&now);
                last.insert(agent, now);
            }
            if !changed {
                return last
                    .into_iter()
                    .flat_map(|(agent, a)| {
                        a.processes
                            .into_iter()
                            .map(move |s| (s.id.clone(), (agent.to_owned(), s)))
                    })
                    .collect();
            }
        }
        panic!("the assignments do not settle");
    }

    fn rebalance(d: &Director, task: &str, n: u32) {
        d.command("wc", Command::Rebalance([(task.to_owned(), n)].into()))
            .unwrap();
    }

    #[test]
    fn workers_are_told_their_task_count_and_every_process_the_same_config() {
        let tmp = tempfile::tempdir().unwrap();
        let d = deployed(tmp.path());
        let placed = settle(&d);
        let ids: Vec<&str> = placed.keys().map(String::as_str).collect();
        assert_eq!(
            ids,
            [
                "wc/count/0",
                "wc/count/1",
                "wc/output/0",
                "wc/server",
                "wc/split/0"
            ]
        );
        let agents: BTreeSet<&str> = placed.values().map(|(a, _)| a.as_str()).collect();
        assert_eq!(agents, ["a", "b"].into(), "spread over both agents");
        let config = placed["wc/server"].1.config.clone().unwrap();
        for (id, (_, spec)) in &placed {
            assert_eq!(spec.config.as_ref(), Some(&config), "{id}");
            let want = match spec.task.as_deref() {
                Some("count") => Some(2),
                Some(_) => Some(1),
                None => None,
            };
            assert_eq!(spec.instances, want, "{id}");
            if spec.role == Role::Task {
                let server = &placed["wc/server"].0;
                assert_eq!(
                    spec.topology_addr.as_deref(),
                    Some(format!("{server}.test:7500").as_str())
                );
            }
        }
        // The processes' text has the overrides and no worker counts; the
        // effective one shown has the counts.
        assert!(config.contains("max_pending = 64"), "{config}");
        assert!(!config.contains("workers"), "{config}");
        let shown = d.topology("wc").unwrap().effective_config;
        let t: toml::Table = shown.parse().unwrap();
        assert_eq!(t["tasks"]["count"]["workers"].as_integer(), Some(2));
        assert_eq!(t["max_pending"].as_integer(), Some(64));
    }

    #[test]
    fn a_rebalance_gives_new_generations_only_to_the_workers_of_the_changed_task() {
        let tmp = tempfile::tempdir().unwrap();
        let d = deployed(tmp.path());
        let before = settle(&d);
        let newest = before.values().map(|(_, s)| s.generation).max().unwrap();
        let topology_generation = d.topology("wc").unwrap().summary.generation;

        rebalance(&d, "count", 3);
        let after = settle(&d);
        assert_eq!(after.len(), 6, "{after:#?}");
        // The server and the other tasks' workers: the very same specs on
        // the same agents, so their agents leave them running.
        for id in ["wc/server", "wc/split/0", "wc/output/0"] {
            assert_eq!(after[id], before[id], "{id}");
        }
        // The count workers: a new layout, newer than every generation
        // before it, with the new count and the same config.
        let mut layouts = BTreeSet::new();
        for i in 0..3 {
            let id = format!("wc/count/{i}");
            let (agent, spec) = &after[&id];
            assert!(spec.generation > newest, "{id}: {spec:?}");
            assert_eq!(spec.instances, Some(3), "{id}");
            assert_eq!(spec.config, before["wc/server"].1.config, "{id}");
            if let Some((was, _)) = before.get(&id) {
                assert_eq!(agent, was, "{id} stays where it was");
            }
            layouts.insert(spec.generation);
        }
        assert_eq!(layouts.len(), 3, "generations are never reused");
        let d_after = d.topology("wc").unwrap();
        assert_eq!(d_after.summary.generation, topology_generation + 1);
        assert_eq!(d_after.summary.workers["count"], 3);
        assert!(d_after.effective_config.contains("workers = 3"));

        // Shrinking: the instances beyond the count go, the one that stays
        // gets a new layout, the rest is untouched.
        let newest = after.values().map(|(_, s)| s.generation).max().unwrap();
        rebalance(&d, "count", 1);
        let shrunk = settle(&d);
        let ids: Vec<&str> = shrunk.keys().map(String::as_str).collect();
        assert_eq!(
            ids,
            ["wc/count/0", "wc/output/0", "wc/server", "wc/split/0"]
        );
        for id in ["wc/server", "wc/split/0", "wc/output/0"] {
            assert_eq!(shrunk[id], before[id], "{id}");
        }
        let count = &shrunk["wc/count/0"].1;
        assert!(count.generation > newest, "{count:?}");
        assert_eq!(count.instances, Some(1));

        // A rebalance that changes nothing moves nothing.
        rebalance(&d, "count", 1);
        assert_eq!(settle(&d), shrunk);
        // Nor does one of a task that does not exist.
        assert!(d
            .command("wc", Command::Rebalance([("nope".to_owned(), 2)].into()))
            .is_err());
        assert_eq!(settle(&d), shrunk);
    }

    #[test]
    fn a_restarted_director_assigns_exactly_what_it_did() {
        let tmp = tempfile::tempdir().unwrap();
        let d = deployed(tmp.path());
        settle(&d);
        rebalance(&d, "count", 3);
        let placed = settle(&d);
        let reported: BTreeMap<&str, Vec<ProcessSpec>> = ["a", "b"]
            .into_iter()
            .map(|agent| {
                let specs = placed
                    .values()
                    .filter(|(a, _)| a == agent)
                    .map(|(_, s)| s.clone())
                    .collect();
                (agent, specs)
            })
            .collect();
        drop(d);

        let d = open(tmp.path());
        // The first heartbeat of each agent, reporting what it runs, is
        // answered with exactly that.
        for (agent, specs) in &reported {
            let mut got = beat(&d, agent, specs).processes;
            got.sort_by(|x, y| x.id.cmp(&y.id));
            assert_eq!(&got, specs, "{agent}");
        }
        assert_eq!(settle(&d), placed);
    }

    #[test]
    fn a_deployment_has_one_data_secret_until_it_is_killed() {
        let tmp = tempfile::tempdir().unwrap();
        let d = deployed(tmp.path());
        let secrets = |placed: &Placed| -> BTreeSet<Secret> {
            placed
                .values()
                .map(|(_, s)| s.data_secret.clone().expect("every spec has the secret"))
                .collect()
        };
        let first = secrets(&settle(&d));
        assert_eq!(first.len(), 1, "one secret for every process");
        let secret = first.iter().next().unwrap().clone();
        assert_eq!(secret.expose().len(), 64);
        let shown = serde_json::to_string(&d.topology("wc").unwrap()).unwrap();
        assert!(!shown.contains(secret.expose()), "never shown: {shown}");
        assert!(shown.contains("\"data_secret\":true"), "{shown}");

        // Stop, start, rebalance, a restarted director: the same one.
        d.command("wc", Command::Stop).unwrap();
        d.command("wc", Command::Start).unwrap();
        rebalance(&d, "count", 3);
        assert_eq!(secrets(&settle(&d)), first);
        drop(d);
        let d = open(tmp.path());
        assert_eq!(secrets(&settle(&d)), first);

        // Killed and deployed again: a new one.
        d.command("wc", Command::Kill).unwrap();
        let hash = d.packages()[0].hash.clone();
        d.deploy(DeployRequest {
            name: "wc".into(),
            package: hash,
            config: None,
            workers: BTreeMap::new(),
            env: BTreeMap::new(),
        })
        .unwrap();
        let again = secrets(&settle(&d));
        assert_eq!(again.len(), 1);
        assert_ne!(again, first);
    }

    #[test]
    fn heartbeats_with_bad_addresses_are_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let d = open(tmp.path());
        for address in ["a.test", "a.test:7400/x", "evil@a.test:1", "a test:1"] {
            let e = d
                .heartbeat(Heartbeat {
                    agent_id: "a".into(),
                    address: address.into(),
                    node: NodeInfo::default(),
                    processes: vec![],
                })
                .unwrap_err();
            assert!(matches!(e, Error::BadRequest(_)), "{address}: {e}");
        }
        assert!(d.agents().is_empty());
    }

    #[test]
    fn the_process_config_has_no_worker_counts() {
        let pkg = "max_pending = 10\n[tasks.split]\nworkers = 1\n[tasks.count]\nworkers = 2\n";
        let text = process_config("wc", Some(pkg), "[tasks.count]\nworkers = 5\n").unwrap();
        let t: toml::Table = text.parse().unwrap();
        assert_eq!(t["max_pending"].as_integer(), Some(10));
        assert_eq!(t["name"].as_str(), Some("wc"));
        assert!(t.get("tasks").is_none(), "{text}");
        assert_eq!(process_config("wc", Some(pkg), "").unwrap(), text);
        assert!(process_config("wc", None, "max_pendin = 1").is_err());
        // Counts are checked in the effective config, which a deploy and a
        // rebalance validate; the processes' text never has them.
        let zero = "[tasks.count]\nworkers = 0\n";
        assert!(effective_config("wc", Some(pkg), zero, &BTreeMap::new()).is_err());
        assert_eq!(process_config("wc", Some(pkg), zero).unwrap(), text);
    }

    #[test]
    fn the_effective_config_lays_overrides_and_workers_over_the_package() {
        let pkg = "max_pending = 10\n[tasks.split]\nworkers = 1\n[tasks.count]\nworkers = 2\n";
        let workers = [("split".to_owned(), 3), ("count".to_owned(), 2)]
            .into_iter()
            .collect();
        let text = effective_config("wc", Some(pkg), "max_pending = 20\n", &workers).unwrap();
        let t: toml::Table = text.parse().unwrap();
        assert_eq!(t["max_pending"].as_integer(), Some(20));
        assert_eq!(t["name"].as_str(), Some("wc"));
        assert_eq!(t["tasks"]["split"]["workers"].as_integer(), Some(3));
        assert_eq!(declared_workers(pkg).unwrap().len(), 2);
        assert!(effective_config("wc", None, "max_pendin = 1", &workers).is_err());
    }

    #[test]
    fn process_ids_round_trip() {
        assert_eq!(parse_process_id("wc", "wc/server").0, Role::Topology);
        let (role, task, i) = parse_process_id("wc", &worker_id("wc", "count", 3));
        assert_eq!(
            (role, task.as_deref(), i),
            (Role::Task, Some("count"), Some(3))
        );
    }
}
