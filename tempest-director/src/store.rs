//! The director's durable state: one SQLite database, `<data_dir>/director.db`,
//! and the package archives beside it under `<data_dir>/packages/`.
//!
//! This module owns the schema and the row <-> record mapping. It never
//! decides anything: the [`crate::director`] changes its in-memory state and
//! writes the changed records through here, so a restarted director loads
//! exactly what it last decided.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use rusqlite::{params, Connection, OptionalExtension};
use tempest_control::{Manifest, NodeInfo, ProcessStatus, Secret};

use crate::lifecycle::Lifecycle;
use crate::metrics::SamplePoint;

/// An agent as last heard from.
#[derive(Clone, Debug)]
pub struct AgentRecord {
    /// Its stable id.
    pub id: String,
    /// Its API address, `host:port`.
    pub address: String,
    /// When its last heartbeat arrived, Unix milliseconds.
    pub last_heartbeat_ms: u64,
    /// Its node's figures.
    pub node: NodeInfo,
    /// The processes it reported.
    pub processes: Vec<ProcessStatus>,
}

/// A stored package.
#[derive(Clone, Debug)]
pub struct PackageRecord {
    /// The archive's content hash.
    pub hash: String,
    /// Its manifest.
    pub manifest: Manifest,
    /// Its default `Topology.toml`, if packaged.
    pub topology_toml: Option<String>,
    /// The archive's size in bytes.
    pub size: u64,
    /// When it was uploaded, Unix milliseconds.
    pub uploaded_at_ms: u64,
}

/// A deployed topology.
#[derive(Clone, Debug)]
pub struct TopologyRecord {
    /// Its deployed name.
    pub name: String,
    /// The package it runs.
    pub package: String,
    /// The user's `Topology.toml` overrides (may be empty).
    pub config: String,
    /// Where its lifecycle stands.
    pub state: Lifecycle,
    /// Worker instances per task.
    pub workers: BTreeMap<String, u32>,
    /// Environment variables its processes get.
    pub env: BTreeMap<String, String>,
    /// Its data-plane secret, made at deploy (kept across stops, starts and
    /// rebalances; a new deploy makes a new one).
    pub data_secret: Option<Secret>,
    /// Its data-plane certificate and key, issued by the cluster CA at
    /// deploy when the director has the CA's key (kept like the secret).
    pub data_tls: Option<tempest_control::tls::IssuedCert>,
    /// Bumped by every deploy, start and rebalance.
    pub generation: u64,
    /// When it was deployed, Unix milliseconds.
    pub created_at_ms: u64,
}

/// Where one process runs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PlacementRecord {
    /// The process id.
    pub process: String,
    /// Its topology.
    pub topology: String,
    /// The agent running it.
    pub agent: String,
    /// Its generation: older generations are fenced off by the agents.
    pub generation: u64,
}

/// Everything the database holds.
#[derive(Debug, Default)]
pub struct Snapshot {
    /// Agents by id.
    pub agents: BTreeMap<String, AgentRecord>,
    /// Packages by hash.
    pub packages: BTreeMap<String, PackageRecord>,
    /// Topologies by name.
    pub topologies: BTreeMap<String, TopologyRecord>,
    /// Placements by process id.
    pub placements: BTreeMap<String, PlacementRecord>,
    /// The next process generation to hand out.
    pub next_generation: u64,
}

/// The database and the package directory.
pub struct Store {
    db: Connection,
    packages_dir: PathBuf,
}

const SCHEMA: &str = "
PRAGMA journal_mode = WAL;
PRAGMA synchronous = NORMAL;
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS agents (
    id TEXT PRIMARY KEY, address TEXT NOT NULL, last_heartbeat_ms INTEGER NOT NULL,
    node TEXT NOT NULL, processes TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS packages (
    hash TEXT PRIMARY KEY, manifest TEXT NOT NULL, topology_toml TEXT,
    size INTEGER NOT NULL, uploaded_at_ms INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS topologies (
    name TEXT PRIMARY KEY, package TEXT NOT NULL, config TEXT NOT NULL, state TEXT NOT NULL,
    workers TEXT NOT NULL, generation INTEGER NOT NULL, created_at_ms INTEGER NOT NULL,
    env TEXT NOT NULL DEFAULT '{}', data_secret TEXT, data_tls TEXT);
CREATE TABLE IF NOT EXISTS placements (
    process TEXT PRIMARY KEY, topology TEXT NOT NULL, agent TEXT NOT NULL,
    generation INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS samples (
    topology TEXT NOT NULL, ts INTEGER NOT NULL, acked INTEGER NOT NULL, failed INTEGER NOT NULL,
    in_flight INTEGER NOT NULL, rate REAL NOT NULL, p50_ms REAL, p99_ms REAL);
CREATE INDEX IF NOT EXISTS samples_by_topology ON samples (topology, ts);
";

/// Brings a database written by an older director up to [`SCHEMA`]:
/// columns added since are added with their defaults.
fn migrate(db: &Connection) -> rusqlite::Result<()> {
    let mut q = db.prepare("SELECT name FROM pragma_table_info('topologies')")?;
    let columns = q
        .query_map([], |r| r.get::<_, String>(0))?
        .collect::<rusqlite::Result<Vec<_>>>()?;
    if !columns.iter().any(|c| c == "env") {
        db.execute_batch("ALTER TABLE topologies ADD COLUMN env TEXT NOT NULL DEFAULT '{}'")?;
    }
    if !columns.iter().any(|c| c == "data_secret") {
        db.execute_batch("ALTER TABLE topologies ADD COLUMN data_secret TEXT")?;
    }
    if !columns.iter().any(|c| c == "data_tls") {
        db.execute_batch("ALTER TABLE topologies ADD COLUMN data_tls TEXT")?;
    }
    Ok(())
}

fn json_col<T: serde::de::DeserializeOwned>(text: String) -> rusqlite::Result<T> {
    serde_json::from_str(&text).map_err(|e| {
        rusqlite::Error::FromSqlConversionFailure(0, rusqlite::types::Type::Text, Box::new(e))
    })
}

fn to_json<T: serde::Serialize>(v: &T) -> String {
    // Serializing these plain records cannot fail.
    serde_json::to_string(v).unwrap_or_default()
}

/// Creates `dir` (and its parents) if missing, and makes it its owner's
/// alone (0700), whoever created it: it holds the topologies' secrets.
pub fn private_dir(dir: &Path) -> std::io::Result<()> {
    let mut builder = std::fs::DirBuilder::new();
    builder.recursive(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
        builder.mode(0o700);
        builder.create(dir)?;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))?;
    }
    #[cfg(not(unix))]
    builder.create(dir)?;
    Ok(())
}

/// Makes an existing file its owner's alone (0600).
fn private_file(path: &Path) -> std::io::Result<()> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        match std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
            _ => {}
        }
    }
    #[cfg(not(unix))]
    let _ = path;
    Ok(())
}

/// Writes `bytes` to a new file at `path`, its owner's alone (0600).
fn write_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(0o600);
    }
    let mut f = opts.open(path)?;
    f.write_all(bytes)?;
    f.sync_all()
}

impl Store {
    /// Opens (creating if needed) the database in `data_dir`. The data
    /// directory and its `packages/` are made 0700, the database files
    /// 0600, whoever created them.
    pub fn open(data_dir: &Path) -> anyhow::Result<Store> {
        let packages_dir = data_dir.join("packages");
        for dir in [data_dir, &packages_dir] {
            private_dir(dir).map_err(|e| anyhow::anyhow!("creating {}: {e}", dir.display()))?;
        }
        let path = data_dir.join("director.db");
        if !path.exists() {
            // SQLite gives its -wal and -shm files the database's mode.
            write_private(&path, b"")
                .map_err(|e| anyhow::anyhow!("creating {}: {e}", path.display()))?;
        }
        for suffix in ["", "-wal", "-shm"] {
            let file = data_dir.join(format!("director.db{suffix}"));
            private_file(&file)
                .map_err(|e| anyhow::anyhow!("making {} private: {e}", file.display()))?;
        }
        if let Ok(entries) = std::fs::read_dir(&packages_dir) {
            for e in entries.flatten() {
                private_file(&e.path()).map_err(|err| {
                    anyhow::anyhow!("making {} private: {err}", e.path().display())
                })?;
            }
        }
        let db = Connection::open(&path)
            .map_err(|e| anyhow::anyhow!("opening {}: {e}", path.display()))?;
        db.execute_batch(SCHEMA)
            .map_err(|e| anyhow::anyhow!("creating the schema in {}: {e}", path.display()))?;
        migrate(&db)
            .map_err(|e| anyhow::anyhow!("upgrading the schema in {}: {e}", path.display()))?;
        Ok(Store { db, packages_dir })
    }

    /// Where a package's archive is kept.
    pub fn archive_path(&self, hash: &str) -> PathBuf {
        self.packages_dir.join(format!("{hash}.tar.gz"))
    }

    /// Loads everything.
    pub fn load(&self) -> anyhow::Result<Snapshot> {
        let mut snap = Snapshot {
            next_generation: 1,
            ..Snapshot::default()
        };
        if let Some(n) = self
            .db
            .query_row(
                "SELECT value FROM meta WHERE key = 'next_generation'",
                [],
                |r| r.get::<_, i64>(0),
            )
            .optional()?
        {
            snap.next_generation = n.max(1) as u64;
        }
        let mut q = self
            .db
            .prepare("SELECT id, address, last_heartbeat_ms, node, processes FROM agents")?;
        for a in q.query_map([], |r| {
            Ok(AgentRecord {
                id: r.get(0)?,
                address: r.get(1)?,
                last_heartbeat_ms: r.get::<_, i64>(2)? as u64,
                node: json_col(r.get(3)?)?,
                processes: json_col(r.get(4)?)?,
            })
        })? {
            let a = a?;
            snap.agents.insert(a.id.clone(), a);
        }
        let mut q = self
            .db
            .prepare("SELECT hash, manifest, topology_toml, size, uploaded_at_ms FROM packages")?;
        for p in q.query_map([], |r| {
            Ok(PackageRecord {
                hash: r.get(0)?,
                manifest: json_col(r.get(1)?)?,
                topology_toml: r.get(2)?,
                size: r.get::<_, i64>(3)? as u64,
                uploaded_at_ms: r.get::<_, i64>(4)? as u64,
            })
        })? {
            let p = p?;
            snap.packages.insert(p.hash.clone(), p);
        }
        let mut q = self.db.prepare(
            "SELECT name, package, config, state, workers, generation, created_at_ms, env, \
             data_secret, data_tls FROM topologies",
        )?;
        for t in q.query_map([], |r| {
            let state: String = r.get(3)?;
            Ok(TopologyRecord {
                name: r.get(0)?,
                package: r.get(1)?,
                config: r.get(2)?,
                state: Lifecycle::from_db(&state),
                workers: json_col(r.get(4)?)?,
                generation: r.get::<_, i64>(5)? as u64,
                created_at_ms: r.get::<_, i64>(6)? as u64,
                env: json_col(r.get(7)?)?,
                data_secret: r
                    .get::<_, Option<String>>(8)?
                    .and_then(|s| Secret::new(&s, "data_secret").ok()),
                data_tls: r
                    .get::<_, Option<String>>(9)?
                    .and_then(|s| serde_json::from_str(&s).ok()),
            })
        })? {
            let t = t?;
            snap.topologies.insert(t.name.clone(), t);
        }
        let mut q = self
            .db
            .prepare("SELECT process, topology, agent, generation FROM placements")?;
        for p in q.query_map([], |r| {
            Ok(PlacementRecord {
                process: r.get(0)?,
                topology: r.get(1)?,
                agent: r.get(2)?,
                generation: r.get::<_, i64>(3)? as u64,
            })
        })? {
            let p = p?;
            snap.placements.insert(p.process.clone(), p);
        }
        Ok(snap)
    }

    /// Stores one point of a topology's series and deletes the points
    /// older than `keep_ms` before it.
    pub fn put_sample(
        &self,
        topology: &str,
        p: &SamplePoint,
        keep_ms: u64,
    ) -> rusqlite::Result<()> {
        self.db.execute(
            "INSERT INTO samples (topology, ts, acked, failed, in_flight, rate, p50_ms, p99_ms)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
            params![
                topology,
                p.ts as i64,
                p.acked as i64,
                p.failed as i64,
                p.in_flight as i64,
                p.rate,
                p.p50_ms,
                p.p99_ms
            ],
        )?;
        self.db.execute(
            "DELETE FROM samples WHERE ts < ?1",
            params![p.ts.saturating_sub(keep_ms) as i64],
        )?;
        Ok(())
    }

    /// A topology's stored series, oldest first.
    pub fn samples(&self, topology: &str) -> rusqlite::Result<Vec<SamplePoint>> {
        let mut st = self.db.prepare_cached(
            "SELECT ts, acked, failed, in_flight, rate, p50_ms, p99_ms FROM samples
             WHERE topology = ?1 ORDER BY ts",
        )?;
        let rows = st.query_map(params![topology], |r| {
            Ok(SamplePoint {
                ts: r.get::<_, i64>(0)? as u64,
                acked: r.get::<_, i64>(1)? as u64,
                failed: r.get::<_, i64>(2)? as u64,
                in_flight: r.get::<_, i64>(3)? as u64,
                rate: r.get(4)?,
                p50_ms: r.get(5)?,
                p99_ms: r.get(6)?,
            })
        })?;
        rows.collect()
    }

    /// Records an agent's heartbeat.
    pub fn put_agent(&self, a: &AgentRecord) -> rusqlite::Result<()> {
        self.db.execute(
            "INSERT OR REPLACE INTO agents (id, address, last_heartbeat_ms, node, processes)
             VALUES (?1, ?2, ?3, ?4, ?5)",
            params![
                a.id,
                a.address,
                a.last_heartbeat_ms as i64,
                to_json(&a.node),
                to_json(&a.processes)
            ],
        )?;
        Ok(())
    }

    /// Writes a package's archive (atomically, by rename) and its row.
    pub fn put_package(&self, p: &PackageRecord, archive: &[u8]) -> anyhow::Result<()> {
        let path = self.archive_path(&p.hash);
        let tmp = path.with_extension("partial");
        write_private(&tmp, archive)
            .map_err(|e| anyhow::anyhow!("writing {}: {e}", tmp.display()))?;
        std::fs::rename(&tmp, &path)
            .map_err(|e| anyhow::anyhow!("renaming {}: {e}", tmp.display()))?;
        self.db.execute(
            "INSERT OR REPLACE INTO packages (hash, manifest, topology_toml, size, uploaded_at_ms)
             VALUES (?1, ?2, ?3, ?4, ?5)",
            params![
                p.hash,
                to_json(&p.manifest),
                p.topology_toml,
                p.size as i64,
                p.uploaded_at_ms as i64
            ],
        )?;
        Ok(())
    }

    /// Writes a topology's row and replaces all placements, with the next
    /// generation, in one transaction; `removed` topologies are deleted.
    pub fn save(
        &mut self,
        topologies: &[&TopologyRecord],
        removed: &[&str],
        placements: &BTreeMap<String, PlacementRecord>,
        next_generation: u64,
    ) -> rusqlite::Result<()> {
        let tx = self.db.transaction()?;
        for t in topologies {
            tx.execute(
                "INSERT OR REPLACE INTO topologies
                 (name, package, config, state, workers, generation, created_at_ms, env,
                  data_secret, data_tls)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)",
                params![
                    t.name,
                    t.package,
                    t.config,
                    t.state.as_db(),
                    to_json(&t.workers),
                    t.generation as i64,
                    t.created_at_ms as i64,
                    to_json(&t.env),
                    t.data_secret.as_ref().map(Secret::expose),
                    t.data_tls.as_ref().map(to_json)
                ],
            )?;
        }
        for name in removed {
            tx.execute("DELETE FROM topologies WHERE name = ?1", params![name])?;
        }
        tx.execute("DELETE FROM placements", [])?;
        for p in placements.values() {
            tx.execute(
                "INSERT INTO placements (process, topology, agent, generation) VALUES (?1, ?2, ?3, ?4)",
                params![p.process, p.topology, p.agent, p.generation as i64],
            )?;
        }
        tx.execute(
            "INSERT OR REPLACE INTO meta (key, value) VALUES ('next_generation', ?1)",
            params![next_generation as i64],
        )?;
        tx.commit()
    }
}
