//! `Topology.toml`: the run-time overrides of a topology's settings.
//!
//! Every key is optional and overrides one field of
//! [`Settings`](crate::Settings) (see `Topology.toml.example` at the root of
//! the repository for every key, commented):
//!
//! ```toml
//! version = 1                   # the schema version; only 1 exists
//! name = "wordcount"
//! message_timeout = "30s"       # durations are humantime strings: "100ms", "30s", "5m"
//! max_pending = 10000
//! grace_period = "10s"
//! batch_size = 256
//!
//! [failure]
//! policy = "retry"              # "best_effort" | "retry" | "none"
//! max_attempts = 3              # retry only
//! backoff = "100ms"             # retry only
//! max_backoff = "10s"           # retry only
//!
//! [source]
//! kind = "file"                 # a kind registered with TopologyBuilder::source_kind
//! max_pending = 5000            # this source's own cap (default: max_pending)
//! [source.config]               # handed to that kind's FromConfig
//! path = "input.txt"
//!
//! # Several named sources instead: one table each, the names the
//! # pipeline's edge_from_source edges use.
//! # [sources.orders]
//! # kind = "redis"
//! # config = { url = "redis://127.0.0.1/", stream = "orders" }
//!
//! [tasks.count]
//! workers = 4
//!
//! [metric]
//! flush_interval = "10s"
//! targets = [{ kind = "console" }, { kind = "log", level = "info" }]
//! ```
//!
//! Errors name the file, the line, the column and the dotted key, and as
//! many problems as can be found are reported together: every syntax error
//! (one per line), every unknown key or misplaced table value, and every bad
//! value (a duration that does not parse, a count out of range, a retry-only
//! key under another policy, ...). [`TopologyFile::parse`] checks everything
//! that the file alone decides; [`TopologyFile::apply`] adds what depends on
//! the topology (the registered source kinds, the policy given in code).
//!
//! ```
//! use tempest_core::config::TopologyFile;
//!
//! let file = TopologyFile::parse("max_pending = 0\n[failure]\nbackoff = \"soon\"\n", None);
//! let errors = file.unwrap_err();
//! assert_eq!(errors.0.len(), 2);
//! assert_eq!(errors.0[0].to_string(), "<config>:1:15: key `max_pending`: must be at least 1, not 0");
//! ```

use std::collections::BTreeMap;
use std::fmt;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::de::DeserializeOwned;
use serde::Deserialize;
use toml::de::{DeTable, DeValue};
use toml::Spanned;

use crate::metrics::TargetSpec;
use crate::pipeline::MAX_WORKERS;
use crate::source::DEFAULT_SOURCE;
use crate::topology::{FailurePolicy, Topology};

/// The `Topology.toml` schema version this build reads (`version = 1`).
pub const CONFIG_VERSION: i64 = 1;

/// `failure.max_attempts` when `policy = "retry"` is chosen in the file over
/// a topology whose policy in code is not retry.
pub const DEFAULT_MAX_ATTEMPTS: u32 = 3;

/// The largest `batch_size`.
pub const MAX_BATCH_SIZE: usize = 65_536;

/// The shortest `metric.flush_interval`.
pub const MIN_FLUSH_INTERVAL: Duration = Duration::from_millis(10);

/// The most errors reported for one file; past it the rest are dropped.
const MAX_ERRORS: usize = 50;

/// One problem in a configuration file, with where it is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConfigError {
    /// The file, when read from one.
    pub file: Option<PathBuf>,
    /// 1-based line.
    pub line: Option<usize>,
    /// 1-based column.
    pub column: Option<usize>,
    /// The dotted key at fault, such as `failure.max_attempts`.
    pub key: Option<String>,
    /// What is wrong.
    pub message: String,
}

impl ConfigError {
    /// An error with only a message (no file, position or key).
    pub fn new(message: impl Into<String>) -> Self {
        ConfigError {
            file: None,
            line: None,
            column: None,
            key: None,
            message: message.into(),
        }
    }

    /// An error about one key. In a source's [`FromConfig`](crate::FromConfig)
    /// the key is relative to `[source.config]` (`"path"`, not
    /// `"source.config.path"`); the topology locates it in the file.
    pub fn at_key(key: impl Into<String>, message: impl Into<String>) -> Self {
        ConfigError {
            key: Some(key.into()),
            ..ConfigError::new(message)
        }
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(file) = &self.file {
            write!(f, "{}", file.display())?;
        } else {
            f.write_str("<config>")?;
        }
        if let Some(line) = self.line {
            write!(f, ":{line}")?;
            if let Some(col) = self.column {
                write!(f, ":{col}")?;
            }
        }
        if let Some(key) = &self.key {
            write!(f, ": key `{key}`")?;
        }
        write!(f, ": {}", self.message)
    }
}

impl std::error::Error for ConfigError {}

/// Every problem found in a configuration file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConfigErrors(pub Vec<ConfigError>);

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str("\n")?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigErrors {}

impl From<ConfigError> for ConfigErrors {
    fn from(e: ConfigError) -> Self {
        ConfigErrors(vec![e])
    }
}

/// A value from the file with the byte range it was written at.
#[derive(Clone, Debug)]
struct Item<T> {
    value: T,
    span: Range<usize>,
}

/// `failure.policy`.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
enum PolicyName {
    BestEffort,
    Retry,
    None,
}

#[derive(Clone, Debug, Default)]
struct FailureOverride {
    policy: Option<Item<PolicyName>>,
    max_attempts: Option<Item<u32>>,
    backoff: Option<Item<Duration>>,
    max_backoff: Option<Item<Duration>>,
}

impl FailureOverride {
    fn is_empty(&self) -> bool {
        self.policy.is_none()
            && self.max_attempts.is_none()
            && self.backoff.is_none()
            && self.max_backoff.is_none()
    }
}

#[derive(Clone, Debug)]
struct SourceOverride {
    /// The source's name ([`DEFAULT_SOURCE`] for `[source]`).
    name: String,
    /// Where its table is: `[source]` or `[sources.NAME]`.
    at: Vec<Seg>,
    /// The kind, when the file builds the source.
    kind: Option<Item<String>>,
    config: toml::Table,
    /// Where its `config` table is, when given.
    config_span: Option<Range<usize>>,
    max_pending: Option<usize>,
}

/// A parsed and checked `Topology.toml`: overrides for a topology's settings
/// (and optionally its source), applied with [`TopologyFile::apply`].
///
/// The default is the empty file, which overrides nothing.
#[derive(Clone, Debug, Default)]
pub struct TopologyFile {
    path: Option<PathBuf>,
    text: String,
    name: Option<String>,
    message_timeout: Option<Duration>,
    max_pending: Option<usize>,
    grace_period: Option<Duration>,
    batch_size: Option<usize>,
    failure: FailureOverride,
    sources: Vec<SourceOverride>,
    workers: BTreeMap<String, u32>,
    flush_interval: Option<Duration>,
    targets: Option<Vec<TargetSpec>>,
}

impl TopologyFile {
    /// Reads and parses a `Topology.toml`. A file that cannot be read is one
    /// error naming it.
    pub fn load(path: &Path) -> Result<TopologyFile, ConfigErrors> {
        match std::fs::read_to_string(path) {
            Ok(text) => TopologyFile::parse(&text, Some(path)),
            Err(e) => Err(ConfigError {
                file: Some(path.to_path_buf()),
                message: format!("cannot read the file: {e}"),
                ..ConfigError::new("")
            }
            .into()),
        }
    }

    /// Parses and checks the text of a `Topology.toml`; `path` names it in
    /// errors. Reports every problem found, not just the first.
    pub fn parse(text: &str, path: Option<&Path>) -> Result<TopologyFile, ConfigErrors> {
        let mut doc = Doc {
            text,
            path,
            tree: None,
        };

        // 1. Syntax: every error the parser can recover from, one per line.
        let (tree, syntax) = DeTable::parse_recoverable(text);
        if !syntax.is_empty() {
            return Err(ConfigErrors(doc.syntax_errors(syntax)));
        }
        doc.tree = Some(tree);

        // 2. Shape: unknown keys and values where tables belong.
        let (raw, errors) = doc.deserialize_raw();

        // 3. Values, of the keys that have the right shape.
        let mut check = Check { doc: &doc, errors };
        let file = match raw {
            Some(raw) => check.file(raw),
            None => TopologyFile::default(),
        };
        sort_by_position(&mut check.errors);
        if check.errors.is_empty() {
            Ok(TopologyFile {
                path: path.map(Path::to_path_buf),
                text: text.to_owned(),
                ..file
            })
        } else {
            Err(ConfigErrors(check.errors))
        }
    }

    /// The file this was read from, if any.
    pub fn path(&self) -> Option<&Path> {
        self.path.as_deref()
    }

    /// The topology name the file sets, if any.
    pub fn name(&self) -> Option<&str> {
        self.name.as_deref()
    }

    /// The source kind the file selects (`[source] kind`), if any.
    pub fn source_kind(&self) -> Option<&str> {
        self.source_kind_of(DEFAULT_SOURCE)
    }

    /// The kind the file selects for the source called `name`
    /// (`[sources.NAME] kind`; `[source]` is the unnamed one), if any.
    pub fn source_kind_of(&self, name: &str) -> Option<&str> {
        self.sources
            .iter()
            .find(|s| s.name == name)
            .and_then(|s| s.kind.as_ref())
            .map(|k| k.value.as_str())
    }

    /// Applies the file over a topology's settings (and, with `[source]
    /// kind` or `[sources.NAME] kind`, replaces or adds those sources). On
    /// error the topology is left unchanged.
    pub fn apply(&self, topology: &mut Topology) -> Result<(), ConfigErrors> {
        let tree = DeTable::parse(&self.text).ok();
        let doc = Doc {
            text: &self.text,
            path: self.path.as_deref(),
            tree,
        };
        let mut errors = Vec::new();
        let mut settings = topology.settings.clone();

        if let Some(name) = &self.name {
            settings.name = name.clone();
        }
        if let Some(t) = self.message_timeout {
            settings.message_timeout = t;
        }
        if let Some(n) = self.max_pending {
            settings.max_pending = n;
        }
        if let Some(g) = self.grace_period {
            settings.grace_period = g;
        }
        if let Some(n) = self.batch_size {
            settings.batch_size = n;
        }
        for (task, &n) in &self.workers {
            settings.workers.insert(task.clone(), n);
        }
        if let Some(every) = self.flush_interval {
            settings.metrics.flush_interval = every;
        }
        if let Some(targets) = &self.targets {
            settings.metrics.targets = targets.clone();
        }
        if !self.failure.is_empty() {
            match self.merge_failure(&doc, &settings.failure) {
                Ok(policy) => settings.failure = policy,
                Err(errs) => errors.extend(errs),
            }
        }

        let mut sources = Vec::new();
        for s in &self.sources {
            if let Some(n) = s.max_pending {
                settings.source_max_pending.insert(s.name.clone(), n);
            }
            let Some(kind) = &s.kind else { continue };
            match topology.source_kinds.build(&kind.value, &s.config) {
                Some(Ok(built)) => sources.push((s.name.clone(), built)),
                Some(Err(e)) => {
                    errors.push(doc.locate_source_error(e, &s.at, s.config_span.clone()))
                }
                None => {
                    let known: Vec<&str> = topology.source_kinds.names().collect();
                    let message = if known.is_empty() {
                        format!(
                            "unknown source kind {:?}: this topology registers no source kinds",
                            kind.value
                        )
                    } else {
                        format!(
                            "unknown source kind {:?}; the registered kinds are: {}",
                            kind.value,
                            known.join(", ")
                        )
                    };
                    let mut key = s.at.clone();
                    key.push(Seg::Key("kind".into()));
                    errors.push(doc.error(Some(kind.span.clone()), &fmt_path(&key), message));
                }
            }
        }

        if !errors.is_empty() {
            return Err(ConfigErrors(errors));
        }
        topology.settings = settings;
        for (name, source) in sources {
            topology.set_source(name, source);
        }
        Ok(())
    }

    /// The failure policy of the file over the one given in code.
    fn merge_failure(
        &self,
        doc: &Doc<'_>,
        current: &FailurePolicy,
    ) -> Result<FailurePolicy, Vec<ConfigError>> {
        let f = &self.failure;
        let retry_base = |current: &FailurePolicy| match current {
            FailurePolicy::Retry { .. } => current.clone(),
            _ => FailurePolicy::retry(DEFAULT_MAX_ATTEMPTS),
        };
        let base = match f.policy.as_ref().map(|p| p.value) {
            Some(PolicyName::BestEffort) => return Ok(FailurePolicy::BestEffort),
            Some(PolicyName::None) => return Ok(FailurePolicy::None),
            Some(PolicyName::Retry) => retry_base(current),
            None => {
                if !matches!(current, FailurePolicy::Retry { .. }) {
                    // Retry-only keys over a policy in code that does not retry.
                    let mut errors = Vec::new();
                    let keys = [
                        ("max_attempts", f.max_attempts.as_ref().map(|i| &i.span)),
                        ("backoff", f.backoff.as_ref().map(|i| &i.span)),
                        ("max_backoff", f.max_backoff.as_ref().map(|i| &i.span)),
                    ];
                    for (key, span) in keys {
                        if let Some(span) = span {
                            errors.push(doc.error(
                                Some(span.clone()),
                                &format!("failure.{key}"),
                                format!(
                                    "applies only to the retry policy, and the topology's \
                                     policy is {current}; add policy = \"retry\" to [failure]"
                                ),
                            ));
                        }
                    }
                    return Err(errors);
                }
                current.clone()
            }
        };
        let FailurePolicy::Retry {
            mut max_attempts,
            mut backoff,
            mut max_backoff,
        } = base
        else {
            return Ok(base);
        };
        if let Some(n) = &f.max_attempts {
            max_attempts = n.value;
        }
        if let Some(b) = &f.backoff {
            backoff = b.value;
        }
        if let Some(m) = &f.max_backoff {
            max_backoff = m.value;
        }
        if backoff > max_backoff {
            // Both from the file was reported by `parse`; here one of them
            // comes from code (or the default).
            let (key, span) = match (&f.backoff, &f.max_backoff) {
                (Some(b), _) => ("failure.backoff", Some(b.span.clone())),
                (None, Some(m)) => ("failure.max_backoff", Some(m.span.clone())),
                (None, None) => ("failure", f.policy.as_ref().map(|p| p.span.clone())),
            };
            return Err(vec![doc.error(
                span,
                key,
                format!(
                    "failure.backoff ({}) is longer than failure.max_backoff ({})",
                    humantime::format_duration(backoff),
                    humantime::format_duration(max_backoff)
                ),
            )]);
        }
        Ok(FailurePolicy::Retry {
            max_attempts,
            backoff,
            max_backoff,
        })
    }
}

/// Deserializes a source's `[source.config]` table.
///
/// An error names the key at fault relative to the table (`path`, `tls.cert`),
/// which [`TopologyFile::apply`] turns into `source.config.path` with its line.
pub fn from_table<T: DeserializeOwned>(table: &toml::Table) -> Result<T, ConfigError> {
    deserialize_table(table).map_err(|(key, message)| ConfigError {
        key,
        ..ConfigError::new(message)
    })
}

/// Deserializes `T` from a table; an error is the dotted key (relative to the
/// table) and the message.
///
/// The table is written out as TOML and read back, so that the reader's spans
/// can be turned into the key at fault.
fn deserialize_table<T: DeserializeOwned>(
    table: &toml::Table,
) -> Result<T, (Option<String>, String)> {
    let Ok(text) = toml::to_string(table) else {
        return T::deserialize(toml::Value::Table(table.clone())).map_err(|e| {
            let message = e.to_string();
            (None, message.lines().next().unwrap_or_default().to_owned())
        });
    };
    toml::from_str::<T>(&text).map_err(|e| {
        let message = e.message().trim().to_owned();
        let Ok(tree) = DeTable::parse(&text) else {
            return (None, message);
        };
        let mut path = e
            .span()
            .and_then(|span| find_entry(&tree, &span))
            .unwrap_or_default();
        if let Some(field) = unknown_field(&message) {
            let mut deeper = path.clone();
            deeper.push(Seg::Key(field.to_owned()));
            if path.last() != Some(&Seg::Key(field.to_owned()))
                && lookup(tree.get_ref(), &deeper).is_some()
            {
                path = deeper;
            }
        }
        let key = (!path.is_empty()).then(|| fmt_path(&path));
        (key, message)
    })
}

/// The field named by serde's "unknown field `x`, expected ..." message.
fn unknown_field(message: &str) -> Option<&str> {
    let rest = message.strip_prefix("unknown field `")?;
    rest.find('`').map(|end| &rest[..end])
}

// ---------------------------------------------------------------------------
// The shape of the file, as serde reads it. Leaves are kept as spanned TOML
// values so that every wrong value is reported by `Check`, not just the first.

type Val = Spanned<toml::Value>;

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields, expecting = "a Topology.toml document")]
struct RawFile {
    version: Option<Val>,
    name: Option<Val>,
    message_timeout: Option<Val>,
    max_pending: Option<Val>,
    grace_period: Option<Val>,
    batch_size: Option<Val>,
    failure: Option<RawFailure>,
    source: Option<RawSource>,
    sources: Option<BTreeMap<String, RawSource>>,
    tasks: Option<BTreeMap<String, RawTask>>,
    metric: Option<RawMetric>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, expecting = "a [failure] table")]
struct RawFailure {
    policy: Option<Val>,
    max_attempts: Option<Val>,
    backoff: Option<Val>,
    max_backoff: Option<Val>,
}

#[derive(Deserialize)]
#[serde(
    deny_unknown_fields,
    expecting = "a source table ([source] or [sources.NAME])"
)]
struct RawSource {
    kind: Option<Val>,
    config: Option<Spanned<toml::Table>>,
    max_pending: Option<Val>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, expecting = "a [tasks.<name>] table")]
struct RawTask {
    workers: Option<Val>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, expecting = "a [metric] table")]
struct RawMetric {
    flush_interval: Option<Val>,
    targets: Option<Vec<Val>>,
}

// ---------------------------------------------------------------------------
// The text, its parse tree, and errors located in it.

struct Doc<'a> {
    text: &'a str,
    path: Option<&'a Path>,
    tree: Option<Spanned<DeTable<'a>>>,
}

impl Doc<'_> {
    fn error(
        &self,
        span: Option<Range<usize>>,
        key: &str,
        message: impl Into<String>,
    ) -> ConfigError {
        let (line, column) = match span {
            Some(span) => {
                let (l, c) = line_col(self.text, span.start);
                (Some(l), Some(c))
            }
            None => (None, None),
        };
        ConfigError {
            file: self.path.map(Path::to_path_buf),
            line,
            column,
            key: (!key.is_empty()).then(|| key.to_owned()),
            message: message.into(),
        }
    }

    /// The parser's errors, in file order, one per line.
    fn syntax_errors(&self, mut errors: Vec<toml::de::Error>) -> Vec<ConfigError> {
        errors.sort_by_key(|e| e.span().map_or(usize::MAX, |s| s.start));
        let mut out: Vec<ConfigError> = Vec::new();
        for e in errors {
            let span = e.span();
            let key = span
                .as_ref()
                .and_then(|s| guess_key(self.text, s.start))
                .unwrap_or_default();
            let err = self.error(span, &key, e.message().trim());
            if err.line.is_some() && out.iter().any(|o| o.line == err.line) {
                continue;
            }
            out.push(err);
            if out.len() == MAX_ERRORS {
                break;
            }
        }
        out
    }

    /// Reads the file's shape. serde stops at the first error, so after each
    /// one the entry at fault is removed from the parse tree and the tree is
    /// read again, to report the others too. (Every field of the shape is
    /// optional, so a removal cannot cause a new error.) Returns the shape of
    /// what is left, if anything, and the errors.
    fn deserialize_raw(&self) -> (Option<RawFile>, Vec<ConfigError>) {
        let Some(tree) = &self.tree else {
            return match toml::from_str(self.text) {
                Ok(raw) => (Some(raw), Vec::new()),
                Err(e) => (None, vec![self.error(e.span(), "", e.message().trim())]),
            };
        };
        let mut work = tree.clone();
        let mut errors: Vec<ConfigError> = Vec::new();
        while errors.len() < MAX_ERRORS {
            let e = match RawFile::deserialize(toml::de::Deserializer::from(work.clone())) {
                Ok(raw) => return (Some(raw), errors),
                Err(e) => e,
            };
            let span = e.span();
            let path = span.as_ref().and_then(|span| find_entry(tree, span));
            let key = match (&path, &span) {
                (Some(path), _) => fmt_path(path),
                (None, Some(span)) => guess_key(self.text, span.start).unwrap_or_default(),
                (None, None) => String::new(),
            };
            errors.push(self.error(span, &key, e.message().trim()));
            match path {
                Some(path) if remove(work.get_mut(), &path) => {}
                _ => break,
            }
        }
        (None, errors)
    }

    /// Places an error from a source's `FromConfig`: its key is relative to
    /// the `config` table of the source's table `at` (`[source]`,
    /// `[sources.NAME]`).
    fn locate_source_error(
        &self,
        e: ConfigError,
        at: &[Seg],
        config_span: Option<Range<usize>>,
    ) -> ConfigError {
        if e.file.is_some() {
            // The source read a file of its own and says where.
            return e;
        }
        let mut path = at.to_vec();
        path.push(Seg::Key("config".into()));
        let base = path.len();
        if let Some(key) = &e.key {
            let rel = parse_path(key);
            let rel = match rel.as_slice() {
                [Seg::Key(a), Seg::Key(b), rest @ ..] if a == "source" && b == "config" => {
                    rest.to_vec()
                }
                _ => rel,
            };
            path.extend(rel);
        }
        // The deepest part of the path that is in the file.
        let mut span = None;
        if let Some(tree) = &self.tree {
            for len in (base..=path.len()).rev() {
                if let Some(s) = lookup(tree.get_ref(), &path[..len]) {
                    span = Some(s);
                    break;
                }
            }
        }
        let span = span.or(config_span);
        let mut located = self.error(span, &fmt_path(&path), e.message);
        if located.line.is_none() {
            located.line = e.line;
            located.column = e.column;
        }
        located
    }
}

/// Checks the values, collecting every problem.
struct Check<'d, 'a> {
    doc: &'d Doc<'a>,
    errors: Vec<ConfigError>,
}

impl Check<'_, '_> {
    fn push(&mut self, span: Range<usize>, key: &str, message: impl Into<String>) {
        if self.errors.len() < MAX_ERRORS {
            self.errors.push(self.doc.error(Some(span), key, message));
        }
    }

    fn file(&mut self, raw: RawFile) -> TopologyFile {
        let mut file = TopologyFile::default();
        if let Some(v) = &raw.version {
            if let Some(n) = self.int(v, "version", i64::MIN, i64::MAX) {
                if n != CONFIG_VERSION {
                    self.push(
                        v.span(),
                        "version",
                        format!(
                            "unsupported version {n}: this Tempest reads Topology.toml \
                             version {CONFIG_VERSION}"
                        ),
                    );
                }
            }
        }
        if let Some(v) = &raw.name {
            if let Some(name) = self.string(v, "name") {
                if name.trim().is_empty() {
                    self.push(v.span(), "name", "the topology name is empty");
                } else {
                    file.name = Some(name);
                }
            }
        }
        if let Some(v) = &raw.message_timeout {
            let max = crate::ledger::MAX_TIMEOUT;
            file.message_timeout =
                self.duration_in(v, "message_timeout", Duration::from_millis(1), Some(max));
        }
        if let Some(v) = &raw.max_pending {
            file.max_pending = self
                .int(v, "max_pending", 1, i64::MAX)
                .and_then(|n| usize::try_from(n).ok());
        }
        if let Some(v) = &raw.grace_period {
            file.grace_period = self.duration_in(v, "grace_period", Duration::ZERO, None);
        }
        if let Some(v) = &raw.batch_size {
            file.batch_size = self
                .int(v, "batch_size", 1, MAX_BATCH_SIZE as i64)
                .and_then(|n| usize::try_from(n).ok());
        }
        if let Some(f) = &raw.failure {
            file.failure = self.failure(f);
        }
        let both = raw.source.is_some()
            && raw
                .sources
                .as_ref()
                .is_some_and(|m| m.contains_key(DEFAULT_SOURCE));
        if let Some(s) = raw.source {
            let at = vec![Seg::Key("source".into())];
            file.sources
                .extend(self.source(DEFAULT_SOURCE.to_owned(), at, s));
        }
        for (name, s) in raw.sources.into_iter().flatten() {
            let at = vec![Seg::Key("sources".into()), Seg::Key(name.clone())];
            if !crate::pipeline::valid_source_name(&name) {
                let span = self
                    .doc
                    .tree
                    .as_ref()
                    .and_then(|t| lookup(t.get_ref(), &at));
                if let Some(span) = span {
                    self.push(
                        span,
                        &fmt_path(&at),
                        "not a valid source name: use 1 to 64 letters, digits, `_` or `-`",
                    );
                } else if self.errors.len() < MAX_ERRORS {
                    self.errors.push(self.doc.error(
                        None,
                        &fmt_path(&at),
                        "not a valid source name: use 1 to 64 letters, digits, `_` or `-`",
                    ));
                }
                continue;
            }
            if both && name == DEFAULT_SOURCE {
                let span = self
                    .doc
                    .tree
                    .as_ref()
                    .and_then(|t| lookup(t.get_ref(), &at));
                if self.errors.len() < MAX_ERRORS {
                    self.errors.push(self.doc.error(
                        span,
                        &fmt_path(&at),
                        "[sources.default] is the unnamed [source]: give one of the two",
                    ));
                }
                continue;
            }
            file.sources.extend(self.source(name, at, s));
        }
        for (task, t) in raw.tasks.iter().flatten() {
            if let Some(v) = &t.workers {
                let key = fmt_path(&[
                    Seg::Key("tasks".into()),
                    Seg::Key(task.clone()),
                    Seg::Key("workers".into()),
                ]);
                if let Some(n) = self.int(v, &key, 1, i64::from(MAX_WORKERS)) {
                    // In range, so it fits.
                    file.workers.insert(task.clone(), n as u32);
                }
            }
        }
        if let Some(m) = &raw.metric {
            if let Some(v) = &m.flush_interval {
                file.flush_interval =
                    self.duration_in(v, "metric.flush_interval", MIN_FLUSH_INTERVAL, None);
            }
            if let Some(targets) = &m.targets {
                file.targets = Some(self.targets(targets));
            }
        }
        file
    }

    fn failure(&mut self, f: &RawFailure) -> FailureOverride {
        let mut out = FailureOverride::default();
        if let Some(v) = &f.policy {
            if let Some(s) = self.string(v, "failure.policy") {
                let policy = match s.as_str() {
                    "best_effort" => Some(PolicyName::BestEffort),
                    "retry" => Some(PolicyName::Retry),
                    "none" => Some(PolicyName::None),
                    other => {
                        self.push(
                            v.span(),
                            "failure.policy",
                            format!(
                                "unknown failure policy {other:?}; expected \"best_effort\", \
                                 \"retry\" or \"none\""
                            ),
                        );
                        None
                    }
                };
                out.policy = policy.map(|value| Item {
                    value,
                    span: v.span(),
                });
            }
        }
        if let Some(v) = &f.max_attempts {
            out.max_attempts = self
                .int(v, "failure.max_attempts", 1, i64::from(u32::MAX))
                .map(|n| Item {
                    value: n as u32,
                    span: v.span(),
                });
        }
        if let Some(v) = &f.backoff {
            out.backoff = self
                .duration_in(v, "failure.backoff", Duration::ZERO, None)
                .map(|value| Item {
                    value,
                    span: v.span(),
                });
        }
        if let Some(v) = &f.max_backoff {
            out.max_backoff = self
                .duration_in(v, "failure.max_backoff", Duration::ZERO, None)
                .map(|value| Item {
                    value,
                    span: v.span(),
                });
        }
        // Retry-only keys under a policy that does not retry.
        let policy_name = f.policy.as_ref().and_then(|v| v.get_ref().as_str());
        if let Some(name) = policy_name.filter(|&p| p != "retry") {
            for (key, v) in [
                ("max_attempts", &f.max_attempts),
                ("backoff", &f.backoff),
                ("max_backoff", &f.max_backoff),
            ] {
                if let Some(v) = v {
                    self.push(
                        v.span(),
                        &format!("failure.{key}"),
                        format!("applies only to policy = \"retry\", not policy = {name:?}"),
                    );
                }
            }
        }
        if let (Some(b), Some(m)) = (&out.backoff, &out.max_backoff) {
            if b.value > m.value {
                self.push(
                    b.span.clone(),
                    "failure.backoff",
                    format!(
                        "failure.backoff ({}) is longer than failure.max_backoff ({})",
                        humantime::format_duration(b.value),
                        humantime::format_duration(m.value)
                    ),
                );
            }
        }
        out
    }

    fn source(&mut self, name: String, at: Vec<Seg>, s: RawSource) -> Option<SourceOverride> {
        let key = |last: &str| {
            let mut k = at.clone();
            k.push(Seg::Key(last.into()));
            fmt_path(&k)
        };
        let max_pending = match &s.max_pending {
            Some(v) => Some(
                self.int(v, &key("max_pending"), 1, i64::MAX)
                    .and_then(|n| usize::try_from(n).ok())?,
            ),
            None => None,
        };
        let kind = match &s.kind {
            Some(v) => match self.string(v, &key("kind")) {
                Some(k) if k.trim().is_empty() => {
                    self.push(v.span(), &key("kind"), "the source kind is empty");
                    return None;
                }
                Some(k) => Some(Item {
                    value: k,
                    span: v.span(),
                }),
                None => return None,
            },
            None => None,
        };
        let config_span = s.config.as_ref().map(Spanned::span);
        if let (None, Some(span)) = (&kind, &config_span) {
            let message = format!(
                "{} needs {}: name the kind of source it configures",
                key("config"),
                key("kind")
            );
            self.push(span.clone(), &key("config"), message);
            return None;
        }
        Some(SourceOverride {
            name,
            at,
            kind,
            config: s.config.map(Spanned::into_inner).unwrap_or_default(),
            config_span,
            max_pending,
        })
    }

    fn targets(&mut self, targets: &[Val]) -> Vec<TargetSpec> {
        let mut out = Vec::new();
        for (i, v) in targets.iter().enumerate() {
            let base = vec![
                Seg::Key("metric".into()),
                Seg::Key("targets".into()),
                Seg::Index(i),
            ];
            let toml::Value::Table(table) = v.get_ref() else {
                self.push(
                    v.span(),
                    &fmt_path(&base),
                    format!(
                        "expected a table such as {{ kind = \"console\" }}, found {}",
                        describe(v.get_ref())
                    ),
                );
                continue;
            };
            match deserialize_table::<TargetSpec>(table) {
                Ok(t) => match t.validate() {
                    Ok(()) => out.push(t),
                    Err(problem) => {
                        let mut path = base;
                        path.push(Seg::Key(problem.field.into()));
                        let span = self
                            .doc
                            .tree
                            .as_ref()
                            .and_then(|tree| lookup(tree.get_ref(), &path))
                            .unwrap_or_else(|| v.span());
                        self.push(span, &fmt_path(&path), problem.message);
                    }
                },
                Err((key, message)) => {
                    let mut path = base;
                    if let Some(key) = key {
                        path.extend(parse_path(&key));
                    }
                    let span = self
                        .doc
                        .tree
                        .as_ref()
                        .and_then(|tree| lookup(tree.get_ref(), &path))
                        .unwrap_or_else(|| v.span());
                    self.push(span, &fmt_path(&path), message);
                }
            }
        }
        out
    }

    fn string(&mut self, v: &Val, key: &str) -> Option<String> {
        match v.get_ref() {
            toml::Value::String(s) => Some(s.clone()),
            other => {
                self.push(
                    v.span(),
                    key,
                    format!("expected a string, found {}", describe(other)),
                );
                None
            }
        }
    }

    /// An integer in `lo..=hi`.
    fn int(&mut self, v: &Val, key: &str, lo: i64, hi: i64) -> Option<i64> {
        let n = match v.get_ref() {
            toml::Value::Integer(n) => *n,
            other => {
                self.push(
                    v.span(),
                    key,
                    format!("expected an integer, found {}", describe(other)),
                );
                return None;
            }
        };
        if n < lo || n > hi {
            let message = if hi == i64::MAX {
                format!("must be at least {lo}, not {n}")
            } else {
                format!("must be between {lo} and {hi}, not {n}")
            };
            self.push(v.span(), key, message);
            return None;
        }
        Some(n)
    }

    /// A humantime duration in `min..=max`.
    fn duration_in(
        &mut self,
        v: &Val,
        key: &str,
        min: Duration,
        max: Option<Duration>,
    ) -> Option<Duration> {
        let s = match v.get_ref() {
            toml::Value::String(s) => s,
            other => {
                self.push(
                    v.span(),
                    key,
                    format!(
                        "expected a duration such as \"100ms\", \"30s\" or \"5m\", found {}",
                        describe(other)
                    ),
                );
                return None;
            }
        };
        let d = match humantime::parse_duration(s.trim()) {
            Ok(d) => d,
            Err(e) => {
                self.push(
                    v.span(),
                    key,
                    format!(
                        "{s:?} is not a duration ({e}); write a number and a unit, \
                         such as \"100ms\", \"30s\" or \"5m\""
                    ),
                );
                return None;
            }
        };
        let fmt = |d: Duration| humantime::format_duration(d).to_string();
        let bad = d < min || max.is_some_and(|m| d > m);
        if bad {
            let message = match max {
                Some(max) => format!("must be between {} and {}, not {s:?}", fmt(min), fmt(max)),
                None => format!("must be at least {}, not {s:?}", fmt(min)),
            };
            self.push(v.span(), key, message);
            return None;
        }
        Some(d)
    }
}

/// "a string \"many\"", "an integer 3", "a table", ...
fn describe(v: &toml::Value) -> String {
    match v {
        toml::Value::String(s) => format!("a string {s:?}"),
        toml::Value::Integer(n) => format!("an integer {n}"),
        toml::Value::Float(x) => format!("a float {x}"),
        toml::Value::Boolean(b) => format!("a boolean {b}"),
        toml::Value::Datetime(d) => format!("a datetime {d}"),
        toml::Value::Array(_) => "an array".to_owned(),
        toml::Value::Table(_) => "a table".to_owned(),
    }
}

// ---------------------------------------------------------------------------
// Dotted key paths and where they are in the text.

/// One step of a key path: a key, or an index into an array.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Seg {
    Key(String),
    Index(usize),
}

/// `a.b[2].c`, quoting keys that are not bare (`tasks."my task".workers`).
fn fmt_path(path: &[Seg]) -> String {
    let mut out = String::new();
    for seg in path {
        match seg {
            Seg::Key(k) => {
                if !out.is_empty() {
                    out.push('.');
                }
                let bare = !k.is_empty()
                    && k.chars()
                        .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
                if bare {
                    out.push_str(k);
                } else {
                    out.push_str(&format!("{k:?}"));
                }
            }
            Seg::Index(i) => out.push_str(&format!("[{i}]")),
        }
    }
    out
}

/// The inverse of [`fmt_path`], lenient: anything odd becomes part of a key.
fn parse_path(s: &str) -> Vec<Seg> {
    let mut out = Vec::new();
    let mut chars = s.chars().peekable();
    let mut key = String::new();
    let mut have_key = false;
    while let Some(c) = chars.next() {
        match c {
            '"' if key.is_empty() => {
                // A quoted key, with `\"` and `\\` escapes.
                while let Some(c) = chars.next() {
                    match c {
                        '"' => break,
                        '\\' => {
                            if let Some(e) = chars.next() {
                                key.push(e);
                            }
                        }
                        c => key.push(c),
                    }
                }
                have_key = true;
            }
            '.' => {
                if have_key || !key.is_empty() {
                    out.push(Seg::Key(std::mem::take(&mut key)));
                }
                have_key = false;
            }
            '[' => {
                let mut digits = String::new();
                let mut closed = false;
                for c in chars.by_ref() {
                    if c == ']' {
                        closed = true;
                        break;
                    }
                    digits.push(c);
                }
                match digits.parse::<usize>() {
                    Ok(i) if closed => {
                        if have_key || !key.is_empty() {
                            out.push(Seg::Key(std::mem::take(&mut key)));
                        }
                        have_key = false;
                        out.push(Seg::Index(i));
                    }
                    _ => {
                        key.push('[');
                        key.push_str(&digits);
                        if closed {
                            key.push(']');
                        }
                    }
                }
            }
            c => key.push(c),
        }
    }
    if have_key || !key.is_empty() {
        out.push(Seg::Key(key));
    }
    out
}

/// Whether the span of an error falls in the span of a key or value.
fn contains(outer: &Range<usize>, inner: &Range<usize>) -> bool {
    outer.start <= inner.start
        && inner.end <= outer.end
        && (outer.start < outer.end || outer == inner)
}

/// The path of the innermost key or value of the tree that the span (of an
/// error) falls in. The span of the whole document (an error about the top
/// level, such as a missing field) is the empty path.
fn find_entry(root: &Spanned<DeTable<'_>>, target: &Range<usize>) -> Option<Vec<Seg>> {
    type Best = Option<(usize, Vec<Seg>)>;
    fn consider(span: &Range<usize>, target: &Range<usize>, path: &[Seg], best: &mut Best) {
        if contains(span, target) && best.as_ref().is_none_or(|b| span.len() < b.0) {
            *best = Some((span.len(), path.to_vec()));
        }
    }
    fn table(t: &DeTable<'_>, target: &Range<usize>, path: &mut Vec<Seg>, best: &mut Best) {
        for (k, v) in t.iter() {
            path.push(Seg::Key(k.get_ref().to_string()));
            consider(&k.span(), target, path, best);
            consider(&v.span(), target, path, best);
            value(v.get_ref(), target, path, best);
            path.pop();
        }
    }
    fn value(v: &DeValue<'_>, target: &Range<usize>, path: &mut Vec<Seg>, best: &mut Best) {
        match v {
            DeValue::Table(t) => table(t, target, path, best),
            DeValue::Array(a) => {
                for (i, item) in a.iter().enumerate() {
                    path.push(Seg::Index(i));
                    consider(&item.span(), target, path, best);
                    value(item.get_ref(), target, path, best);
                    path.pop();
                }
            }
            _ => {}
        }
    }
    if *target == root.span() {
        return Some(Vec::new());
    }
    let mut best = None;
    table(root.get_ref(), target, &mut Vec::new(), &mut best);
    best.map(|(_, path)| path)
}

/// Removes the entry at `path` (which must end with a key) from the tree.
fn remove(table: &mut DeTable<'_>, path: &[Seg]) -> bool {
    match path {
        [Seg::Key(last)] => table.remove(last.as_str()).is_some(),
        [Seg::Key(k), rest @ ..] => match table.get_mut(k.as_str()) {
            Some(v) => remove_in(v.get_mut(), rest),
            None => false,
        },
        _ => false,
    }
}

fn remove_in(v: &mut DeValue<'_>, path: &[Seg]) -> bool {
    match (v, path.first()) {
        (DeValue::Table(t), Some(Seg::Key(_))) => remove(t, path),
        (DeValue::Array(a), Some(Seg::Index(i))) => match a.get_mut(*i) {
            Some(item) => remove_in(item.get_mut(), &path[1..]),
            None => false,
        },
        _ => false,
    }
}

/// Orders errors by where they are in the file (serde reads keys sorted).
fn sort_by_position(errors: &mut [ConfigError]) {
    errors.sort_by_key(|e| (e.line.unwrap_or(usize::MAX), e.column.unwrap_or(usize::MAX)));
}

/// The span of the key (or array item) at `path`, if it is in the tree.
fn lookup(root: &DeTable<'_>, path: &[Seg]) -> Option<Range<usize>> {
    let (first, rest) = path.split_first()?;
    let Seg::Key(name) = first else { return None };
    let (k, v) = root
        .iter()
        .find(|(k, _)| k.get_ref().as_ref() == name.as_str())?;
    let mut span = k.span();
    let mut cur = v;
    for seg in rest {
        match (seg, cur.get_ref()) {
            (Seg::Key(name), DeValue::Table(t)) => {
                let (k, v) = t
                    .iter()
                    .find(|(k, _)| k.get_ref().as_ref() == name.as_str())?;
                span = k.span();
                cur = v;
            }
            (Seg::Index(i), DeValue::Array(a)) => {
                let item = a.get(*i)?;
                span = item.span();
                cur = item;
            }
            _ => return None,
        }
    }
    Some(span)
}

/// 1-based line and column (in characters) of a byte offset.
fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let mut offset = offset.min(text.len());
    while !text.is_char_boundary(offset) {
        offset -= 1;
    }
    let before = &text[..offset];
    let line = before.bytes().filter(|&b| b == b'\n').count() + 1;
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    (line, before[line_start..].chars().count() + 1)
}

/// A best guess at the dotted key on the line of `offset`, for text that
/// does not parse: the key before `=`, under the nearest `[table]` above;
/// or the table of a header line.
fn guess_key(text: &str, offset: usize) -> Option<String> {
    let (line_no, _) = line_col(text, offset);
    let lines: Vec<&str> = text.lines().collect();
    let line = lines.get(line_no.checked_sub(1)?)?.trim();
    if line.starts_with('[') {
        return header_name(line);
    }
    let (key, _) = line.split_once('=')?;
    let key = key.trim();
    if key.is_empty() || key.starts_with('#') {
        return None;
    }
    let table = lines[..line_no - 1]
        .iter()
        .rev()
        .map(|l| l.trim())
        .find(|l| l.starts_with('['))
        .and_then(header_name);
    Some(match table {
        Some(t) => format!("{t}.{key}"),
        None => key.to_owned(),
    })
}

/// `[a.b]` or `[[a.b]]` (with a trailing comment) -> `a.b`.
fn header_name(line: &str) -> Option<String> {
    let inner = line.trim_start_matches('[');
    let end = inner.find(']')?;
    let name = inner[..end].trim();
    (!name.is_empty()).then(|| name.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::targets::LogLevel;
    use crate::pipeline::Pipeline;
    use crate::source::{FromConfig, Polled, Source, SourceError, SourceId};
    use crate::topology::{Settings, SourceKinds};

    fn topology() -> Topology {
        Topology {
            settings: Settings::new("from-code"),
            sources: Vec::new(),
            source_kinds: SourceKinds::default(),
            pipeline: Pipeline::new(),
        }
    }

    fn errors(text: &str) -> Vec<ConfigError> {
        match TopologyFile::parse(text, Some(Path::new("Topology.toml"))) {
            Ok(_) => panic!("expected errors for:\n{text}"),
            Err(ConfigErrors(errs)) => {
                assert!(!errs.is_empty());
                errs
            }
        }
    }

    fn one_error(text: &str) -> ConfigError {
        let errs = errors(text);
        assert_eq!(errs.len(), 1, "expected one error, got {errs:#?}");
        errs.into_iter().next().unwrap()
    }

    fn apply_errors(text: &str, topology: &mut Topology) -> Vec<ConfigError> {
        let file = TopologyFile::parse(text, None).expect("parses");
        file.apply(topology).expect_err("apply fails").0
    }

    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    struct TestConfig {
        path: String,
        #[serde(default)]
        limit: u32,
    }

    struct TestSource {
        config: TestConfig,
    }

    impl FromConfig for TestSource {
        fn from_config(table: &toml::Table) -> Result<Self, ConfigError> {
            let config: TestConfig = from_table(table)?;
            if config.path.is_empty() {
                return Err(ConfigError::at_key("path", "the path is empty"));
            }
            Ok(TestSource { config })
        }
    }

    #[crate::async_trait]
    impl Source for TestSource {
        async fn poll(&mut self, _max: usize) -> Result<Polled, SourceError> {
            let _ = (&self.config.path, self.config.limit);
            Ok(Polled::Exhausted)
        }
        async fn ack(&mut self, _ids: &[SourceId]) -> Result<(), SourceError> {
            Ok(())
        }
    }

    /// Takes any `[source.config]`.
    struct AnySource;

    impl FromConfig for AnySource {
        fn from_config(_table: &toml::Table) -> Result<Self, ConfigError> {
            Ok(AnySource)
        }
    }

    #[crate::async_trait]
    impl Source for AnySource {
        async fn poll(&mut self, _max: usize) -> Result<Polled, SourceError> {
            Ok(Polled::Exhausted)
        }
        async fn ack(&mut self, _ids: &[SourceId]) -> Result<(), SourceError> {
            Ok(())
        }
    }

    const FULL: &str = r#"
version = 1
name = "wordcount"
message_timeout = "45s"
max_pending = 500
grace_period = "3s"
batch_size = 64

[failure]
policy = "retry"
max_attempts = 5
backoff = "200ms"
max_backoff = "2s"

[source]
kind = "test"

[source.config]
path = "input.txt"
limit = 7

[tasks.split]
workers = 2

[tasks.count]
workers = 4

[metric]
flush_interval = "1s"
targets = [{ kind = "console" }, { kind = "log", level = "debug" }]
"#;

    #[test]
    fn full_file_applies_every_field() {
        let file = TopologyFile::parse(FULL, None).unwrap();
        assert_eq!(file.name(), Some("wordcount"));
        assert_eq!(file.source_kind(), Some("test"));
        let mut t = topology();
        t.source_kinds.register::<TestSource>("test");
        file.apply(&mut t).unwrap();
        let s = &t.settings;
        assert_eq!(s.name, "wordcount");
        assert_eq!(s.message_timeout, Duration::from_secs(45));
        assert_eq!(s.max_pending, 500);
        assert_eq!(s.grace_period, Duration::from_secs(3));
        assert_eq!(s.batch_size, 64);
        assert_eq!(
            s.failure,
            FailurePolicy::Retry {
                max_attempts: 5,
                backoff: Duration::from_millis(200),
                max_backoff: Duration::from_secs(2),
            }
        );
        assert_eq!(s.workers.get("split"), Some(&2));
        assert_eq!(s.workers.get("count"), Some(&4));
        assert_eq!(s.metrics.flush_interval, Duration::from_secs(1));
        assert_eq!(
            s.metrics.targets,
            vec![
                TargetSpec::Console,
                TargetSpec::Log {
                    level: LogLevel::Debug
                }
            ]
        );
        assert!(t.has_source(DEFAULT_SOURCE));
        assert!(s.problems().is_empty(), "{:?}", s.problems());
    }

    #[test]
    fn empty_file_changes_nothing() {
        let mut t = topology();
        TopologyFile::parse("", None)
            .unwrap()
            .apply(&mut t)
            .unwrap();
        assert_eq!(t.settings, Settings::new("from-code"));
        TopologyFile::default().apply(&mut t).unwrap();
        assert_eq!(t.settings, Settings::new("from-code"));
    }

    #[test]
    fn array_of_tables_targets() {
        let text = "[[metric.targets]]\nkind = \"console\"\n\n[[metric.targets]]\nkind = \"log\"\n";
        let mut t = topology();
        TopologyFile::parse(text, None)
            .unwrap()
            .apply(&mut t)
            .unwrap();
        assert_eq!(
            t.settings.metrics.targets,
            vec![
                TargetSpec::Console,
                TargetSpec::Log {
                    level: LogLevel::Info
                }
            ]
        );
    }

    #[test]
    fn bad_target_names_its_key() {
        let text = "[metric]\ntargets = [\n  { kind = \"console\" },\n  { kind = \"log\", levle = \"info\" },\n  { kind = \"graphite\" },\n  3,\n]\n";
        let errs = errors(text);
        assert_eq!(errs.len(), 3, "{errs:#?}");
        assert_eq!(errs[0].key.as_deref(), Some("metric.targets[1].levle"));
        assert_eq!(errs[0].line, Some(4));
        assert!(errs[0].message.contains("unknown field"), "{}", errs[0]);
        assert_eq!(errs[1].key.as_deref(), Some("metric.targets[2].kind"));
        assert_eq!(errs[1].line, Some(5));
        assert!(errs[1].message.contains("graphite"), "{}", errs[1]);
        assert_eq!(errs[2].key.as_deref(), Some("metric.targets[3]"));
        assert_eq!(errs[2].line, Some(6));
    }

    #[test]
    fn every_target_kind_parses() {
        let text = "[metric]\ntargets = [\n  { kind = \"statsd\", address = \"127.0.0.1:8125\", prefix = \"app\" },\n  { kind = \"prometheus\" },\n  { kind = \"prometheus\", listen = \"0.0.0.0:0\" },\n  { kind = \"file\", path = \"/tmp/m.jsonl\" },\n]\n";
        let t = TopologyFile::parse(text, None).unwrap_or_else(|e| panic!("{e}"));
        let mut topology = topology();
        t.apply(&mut topology).unwrap();
        assert_eq!(
            topology.settings.metrics.targets,
            vec![
                TargetSpec::Statsd {
                    address: "127.0.0.1:8125".into(),
                    prefix: Some("app".into())
                },
                TargetSpec::Prometheus {
                    listen: "127.0.0.1:9464".into()
                },
                TargetSpec::Prometheus {
                    listen: "0.0.0.0:0".into()
                },
                TargetSpec::File {
                    path: "/tmp/m.jsonl".into()
                },
            ]
        );
    }

    #[test]
    fn bad_target_values_name_their_key() {
        let text = "[metric]\ntargets = [\n  { kind = \"statsd\", address = \"localhost\" },\n  { kind = \"statsd\", address = \"h:1\", prefix = \"a b\" },\n  { kind = \"prometheus\", listen = \"127.0.0.1:99999\" },\n  { kind = \"file\", path = \"\" },\n  { kind = \"statsd\" },\n]\n";
        let errs = errors(text);
        let keys: Vec<_> = errs
            .iter()
            .map(|e| (e.line, e.key.as_deref().unwrap_or("")))
            .collect();
        assert_eq!(
            keys,
            vec![
                (Some(3), "metric.targets[0].address"),
                (Some(4), "metric.targets[1].prefix"),
                (Some(5), "metric.targets[2].listen"),
                (Some(6), "metric.targets[3].path"),
                (Some(7), "metric.targets[4]"),
            ],
            "{errs:#?}"
        );
        assert!(
            errs[0]
                .message
                .contains("\"localhost\" is not a statsd address"),
            "{}",
            errs[0]
        );
        assert!(errs[2].message.contains("99999"), "{}", errs[2]);
        assert!(errs[4].message.contains("address"), "{}", errs[4]);
    }

    #[test]
    fn unknown_top_level_key() {
        let e = one_error("name = \"x\"\nmax_pendin = 3\n");
        assert_eq!(e.key.as_deref(), Some("max_pendin"));
        assert_eq!((e.line, e.column), (Some(2), Some(1)));
        assert_eq!(e.file.as_deref(), Some(Path::new("Topology.toml")));
        assert!(e.message.contains("unknown field `max_pendin`"), "{e}");
        assert!(
            e.to_string()
                .starts_with("Topology.toml:2:1: key `max_pendin`: unknown field"),
            "{e}"
        );
    }

    #[test]
    fn unknown_key_in_failure() {
        let e = one_error("[failure]\npolicy = \"retry\"\nmax_atempts = 3\n");
        assert_eq!(e.key.as_deref(), Some("failure.max_atempts"));
        assert_eq!((e.line, e.column), (Some(3), Some(1)));
    }

    #[test]
    fn unknown_key_in_task() {
        let e = one_error("[tasks.count]\nworkers = 2\n  worker = 3\n");
        assert_eq!(e.key.as_deref(), Some("tasks.count.worker"));
        assert_eq!((e.line, e.column), (Some(3), Some(3)));
    }

    #[test]
    fn unknown_table() {
        let e = one_error("name = \"x\"\n[failuer]\npolicy = \"retry\"\n");
        assert_eq!(e.key.as_deref(), Some("failuer"));
        assert_eq!(e.line, Some(2));
    }

    #[test]
    fn several_unknown_keys_reported_together() {
        let errs = errors(
            "nmae = \"x\"\n[failure]\nplicy = \"retry\"\nfailure.x = 1\n[tasks.a]\nwokers = 1\n[metric]\nflush = \"1s\"\n",
        );
        let keys: Vec<_> = errs.iter().map(|e| e.key.as_deref().unwrap()).collect();
        assert_eq!(
            keys,
            [
                "nmae",
                "failure.plicy",
                "failure.failure",
                "tasks.a.wokers",
                "metric.flush"
            ]
        );
        let lines: Vec<_> = errs.iter().map(|e| e.line.unwrap()).collect();
        assert_eq!(lines, [1, 3, 4, 6, 8]);
    }

    #[test]
    fn shape_and_value_errors_together() {
        let text = "nmae = \"x\"\nmax_pending = 0\n[failure]\npolicy = \"best_effort\"\nmax_attempts = 3\n\
                    [metric]\nflush = 1\ntargets = [{ kind = \"prom\" }]\n[tasks.count]\nworkers = 0\n";
        let errs = errors(text);
        let found: Vec<_> = errs
            .iter()
            .map(|e| (e.line.unwrap(), e.key.as_deref().unwrap()))
            .collect();
        assert_eq!(
            found,
            [
                (1, "nmae"),
                (2, "max_pending"),
                (5, "failure.max_attempts"),
                (7, "metric.flush"),
                (8, "metric.targets[0].kind"),
                (10, "tasks.count.workers"),
            ],
            "{errs:#?}"
        );
    }

    #[test]
    fn wrong_type() {
        let e = one_error("\n\nmax_pending = \"many\"\n");
        assert_eq!(e.key.as_deref(), Some("max_pending"));
        assert_eq!((e.line, e.column), (Some(3), Some(15)));
        assert!(e.message.contains("expected an integer"), "{e}");
        let e = one_error("failure = 3\n");
        assert_eq!(e.key.as_deref(), Some("failure"));
        assert_eq!(e.line, Some(1));
        let e = one_error("[tasks]\ncount = 4\n");
        assert_eq!(e.key.as_deref(), Some("tasks.count"));
        assert_eq!(e.line, Some(2));
    }

    #[test]
    fn bad_duration() {
        let e = one_error("[failure]\npolicy = \"retry\"\nbackoff = \"10 parsecs\"\n");
        assert_eq!(e.key.as_deref(), Some("failure.backoff"));
        assert_eq!((e.line, e.column), (Some(3), Some(11)));
        assert!(e.message.contains("10 parsecs"), "{e}");
        let e = one_error("message_timeout = 30\n");
        assert_eq!(e.key.as_deref(), Some("message_timeout"));
        assert!(e.message.contains("expected a duration"), "{e}");
    }

    #[test]
    fn value_errors_are_reported_together() {
        let text = r#"name = ""
message_timeout = "0s"
max_pending = 0
grace_period = "soon"
batch_size = 70000

[failure]
policy = "retry"
max_attempts = 0
backoff = "20s"
max_backoff = "10s"

[tasks.count]
workers = 0

[tasks.split]
workers = 1025

[metric]
flush_interval = "5ms"
"#;
        let errs = errors(text);
        let keys: Vec<_> = errs.iter().map(|e| e.key.as_deref().unwrap()).collect();
        assert_eq!(
            keys,
            [
                "name",
                "message_timeout",
                "max_pending",
                "grace_period",
                "batch_size",
                "failure.max_attempts",
                "failure.backoff",
                "tasks.count.workers",
                "tasks.split.workers",
                "metric.flush_interval",
            ],
            "{errs:#?}"
        );
        assert!(errs.len() >= 3);
        let lines: Vec<_> = errs.iter().map(|e| e.line.unwrap()).collect();
        assert_eq!(lines, [1, 2, 3, 4, 5, 9, 10, 14, 17, 20]);
    }

    #[test]
    fn message_timeout_above_the_ledger_limit() {
        let e = one_error("message_timeout = \"2h\"\n");
        assert_eq!(e.key.as_deref(), Some("message_timeout"));
        assert!(e.message.contains("between 1ms and 1h"), "{e}");
    }

    #[test]
    fn retry_keys_with_another_policy() {
        let errs =
            errors("[failure]\npolicy = \"best_effort\"\nmax_attempts = 3\nbackoff = \"1s\"\n");
        assert_eq!(errs.len(), 2, "{errs:#?}");
        assert_eq!(errs[0].key.as_deref(), Some("failure.max_attempts"));
        assert_eq!(errs[0].line, Some(3));
        assert!(errs[0].message.contains("best_effort"), "{}", errs[0]);
        assert_eq!(errs[1].key.as_deref(), Some("failure.backoff"));
        let e = one_error("[failure]\npolicy = \"sometimes\"\n");
        assert_eq!(e.key.as_deref(), Some("failure.policy"));
    }

    #[test]
    fn retry_keys_merge_with_the_policy_in_code() {
        // No policy in the file: a retry policy in code keeps its other values.
        let mut t = topology();
        t.settings.failure = FailurePolicy::retry(7);
        let file = TopologyFile::parse("[failure]\nmax_backoff = \"1m\"\n", None).unwrap();
        file.apply(&mut t).unwrap();
        assert_eq!(
            t.settings.failure,
            FailurePolicy::Retry {
                max_attempts: 7,
                backoff: Duration::from_millis(100),
                max_backoff: Duration::from_secs(60),
            }
        );

        // ... but over best effort they are an error naming the key.
        let mut t = topology();
        let errs = apply_errors("[failure]\n\nmax_attempts = 4\n", &mut t);
        assert_eq!(errs.len(), 1);
        assert_eq!(errs[0].key.as_deref(), Some("failure.max_attempts"));
        assert_eq!(errs[0].line, Some(3));
        assert_eq!(t.settings, Settings::new("from-code"), "unchanged on error");

        // policy = "retry" over best effort starts from the default back-off.
        let mut t = topology();
        let file = TopologyFile::parse("[failure]\npolicy = \"retry\"\n", None).unwrap();
        file.apply(&mut t).unwrap();
        assert_eq!(
            t.settings.failure,
            FailurePolicy::retry(DEFAULT_MAX_ATTEMPTS)
        );

        // backoff over the default max_backoff.
        let mut t = topology();
        let errs = apply_errors("[failure]\npolicy = \"retry\"\nbackoff = \"1m\"\n", &mut t);
        assert_eq!(errs[0].key.as_deref(), Some("failure.backoff"));
        assert_eq!(errs[0].line, Some(3));
    }

    #[test]
    fn source_kind_builds_the_source() {
        let mut t = topology();
        t.source_kinds.register::<TestSource>("test");
        let file = TopologyFile::parse(
            "[source]\nkind = \"test\"\nconfig = { path = \"a\" }\n",
            None,
        )
        .unwrap();
        file.apply(&mut t).unwrap();
        assert!(t.has_source(DEFAULT_SOURCE));
    }

    #[test]
    fn unknown_source_kind_lists_the_known_ones() {
        let mut t = topology();
        t.source_kinds.register::<TestSource>("test");
        t.source_kinds.register::<TestSource>("other");
        let errs = apply_errors("[source]\nkind = \"kafka\"\n", &mut t);
        assert_eq!(errs.len(), 1);
        let e = &errs[0];
        assert_eq!(e.key.as_deref(), Some("source.kind"));
        assert_eq!((e.line, e.column), (Some(2), Some(8)));
        assert!(e.message.contains("\"kafka\""), "{e}");
        assert!(e.message.contains("other, test"), "{e}");
        assert!(t.sources.is_empty());

        let errs = apply_errors("[source]\nkind = \"kafka\"\n", &mut topology());
        assert!(
            errs[0].message.contains("registers no source kinds"),
            "{}",
            errs[0]
        );
    }

    #[test]
    fn source_config_errors_name_the_key_and_line() {
        let mut t = topology();
        t.source_kinds.register::<TestSource>("test");
        let text = "[source]\nkind = \"test\"\n\n[source.config]\npath = \"in.txt\"\nlimt = 3\n";
        let errs = apply_errors(text, &mut t);
        assert_eq!(errs.len(), 1);
        assert_eq!(errs[0].key.as_deref(), Some("source.config.limt"));
        assert_eq!((errs[0].line, errs[0].column), (Some(6), Some(1)));

        let text =
            "[source]\nkind = \"test\"\n[source.config]\npath = \"in.txt\"\nlimit = \"many\"\n";
        let errs = apply_errors(text, &mut t);
        assert_eq!(errs[0].key.as_deref(), Some("source.config.limit"));
        assert_eq!(errs[0].line, Some(5));

        // Missing field: the key is the table, at its header.
        let text = "[source]\nkind = \"test\"\n[source.config]\nlimit = 1\n";
        let errs = apply_errors(text, &mut t);
        assert_eq!(errs[0].key.as_deref(), Some("source.config"));
        assert_eq!(errs[0].line, Some(3));
        assert!(errs[0].message.contains("path"), "{}", errs[0]);

        // A key from the source's own check.
        let text = "[source]\nkind = \"test\"\n[source.config]\n\npath = \"\"\n";
        let errs = apply_errors(text, &mut t);
        assert_eq!(errs[0].key.as_deref(), Some("source.config.path"));
        assert_eq!(errs[0].line, Some(5));
        assert_eq!(errs[0].message, "the path is empty");

        // No [source.config] at all.
        let errs = apply_errors("[source]\nkind = \"test\"\n", &mut t);
        assert_eq!(errs[0].key.as_deref(), Some("source.config"));
    }

    #[test]
    fn named_sources_are_built_and_capped() {
        let mut t = topology();
        t.source_kinds.register::<TestSource>("test");
        let text = "max_pending = 50\n[source]\nmax_pending = 7\n\n[sources.orders]\nkind = \"test\"\nmax_pending = 5\n[sources.orders.config]\npath = \"o.txt\"\n\n[sources.refunds]\nkind = \"test\"\nconfig = { path = \"r.txt\" }\n";
        let file = TopologyFile::parse(text, None).unwrap();
        assert_eq!(file.source_kind_of("orders"), Some("test"));
        assert_eq!(file.source_kind(), None);
        file.apply(&mut t).unwrap();
        assert!(t.has_source("orders") && t.has_source("refunds"));
        assert!(!t.has_source(DEFAULT_SOURCE));
        assert_eq!(t.settings.max_pending_of("orders"), 5);
        assert_eq!(t.settings.max_pending_of("refunds"), 50);
        assert_eq!(t.settings.max_pending_of(DEFAULT_SOURCE), 7);
    }

    #[test]
    fn named_source_errors_name_the_table() {
        let mut t = topology();
        t.source_kinds.register::<TestSource>("test");
        let text =
            "[sources.orders]\nkind = \"test\"\n[sources.orders.config]\npath = \"o\"\nlimt = 3\n";
        let errs = apply_errors(text, &mut t);
        assert_eq!(errs[0].key.as_deref(), Some("sources.orders.config.limt"));
        assert_eq!(errs[0].line, Some(5));
        let errs = apply_errors("[sources.x]\nkind = \"kafka\"\n", &mut t);
        assert_eq!(errs[0].key.as_deref(), Some("sources.x.kind"));
        assert_eq!(errs[0].line, Some(2));

        let e = one_error("[sources.orders]\nmax_pending = 0\n");
        assert_eq!(e.key.as_deref(), Some("sources.orders.max_pending"));
        assert_eq!(e.line, Some(2));
        let e = one_error("[sources.orders]\nkind = \"x\"\nmax_pendin = 3\n");
        assert_eq!(e.line, Some(3), "{e}");
        let e = one_error("[sources.orders]\nconfig = { a = 1 }\n");
        assert_eq!(e.key.as_deref(), Some("sources.orders.config"));
        assert!(e.message.contains("needs sources.orders.kind"), "{e}");
        let e = one_error("[sources.\"bad name\"]\nkind = \"x\"\n");
        assert!(e.message.contains("not a valid source name"), "{e}");
        assert_eq!(e.line, Some(1));
        let e = one_error("[source]\nkind = \"x\"\n[sources.default]\nkind = \"y\"\n");
        assert!(e.message.contains("unnamed [source]"), "{e}");
    }

    #[test]
    fn source_config_needs_kind() {
        let e = one_error("[source]\n[source.config]\npath = \"x\"\n");
        assert_eq!(e.key.as_deref(), Some("source.config"));
        assert_eq!(e.line, Some(2));
        assert!(e.message.contains("needs source.kind"), "{e}");
    }

    #[test]
    fn version() {
        TopologyFile::parse("version = 1\n", None).unwrap();
        let e = one_error("version = 2\n");
        assert_eq!(e.key.as_deref(), Some("version"));
        assert_eq!(e.line, Some(1));
        assert!(e.message.contains("version 2"), "{e}");
        let e = one_error("version = \"1\"\n");
        assert_eq!(e.key.as_deref(), Some("version"));
    }

    #[test]
    fn syntax_errors_have_lines_and_keys() {
        let e = one_error("name = \"x\"\n[failure]\npolicy = retry\n");
        assert_eq!(e.line, Some(3));
        assert_eq!(e.key.as_deref(), Some("failure.policy"));
        let e = one_error("max_pending = 1\nmax_pending = 2\n");
        assert_eq!(e.line, Some(2));
        assert!(e.message.contains("duplicate"), "{e}");
    }

    #[test]
    fn from_table_names_the_key() {
        let table: toml::Table = toml::from_str("path = \"x\"\nlimit = -1\n").unwrap();
        let e = from_table::<TestConfig>(&table).err().unwrap();
        assert_eq!(e.key.as_deref(), Some("limit"));
        let table: toml::Table = toml::from_str("path = \"x\"\n[nested]\na = 1\n").unwrap();
        let e = from_table::<TestConfig>(&table).err().unwrap();
        assert_eq!(e.key.as_deref(), Some("nested"));
    }

    #[test]
    fn paths_round_trip() {
        for p in [
            vec![Seg::Key("a".into()), Seg::Key("b".into())],
            vec![
                Seg::Key("tasks".into()),
                Seg::Key("my task.x".into()),
                Seg::Key("workers".into()),
            ],
            vec![
                Seg::Key("metric".into()),
                Seg::Key("targets".into()),
                Seg::Index(2),
                Seg::Key("level".into()),
            ],
            vec![Seg::Key("q\"uote".into())],
        ] {
            assert_eq!(parse_path(&fmt_path(&p)), p, "{}", fmt_path(&p));
        }
    }

    #[test]
    fn load_names_an_unreadable_file() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("Topology.toml");
        let errs = TopologyFile::load(&missing).unwrap_err().0;
        assert_eq!(errs.len(), 1);
        assert_eq!(errs[0].file.as_deref(), Some(missing.as_path()));
        assert!(errs[0].to_string().contains("cannot read"), "{}", errs[0]);

        std::fs::write(&missing, "max_pending = 0\n").unwrap();
        let errs = TopologyFile::load(&missing).unwrap_err().0;
        assert_eq!(errs[0].file.as_deref(), Some(missing.as_path()));
        std::fs::write(&missing, "max_pending = 9\n").unwrap();
        let file = TopologyFile::load(&missing).unwrap();
        assert_eq!(file.path(), Some(missing.as_path()));
    }

    #[test]
    fn example_file_parses() {
        let text = include_str!("../../Topology.toml.example");
        let file = TopologyFile::parse(text, Some(Path::new("Topology.toml.example")))
            .unwrap_or_else(|e| panic!("{e}"));
        let mut t = topology();
        t.source_kinds.register::<AnySource>("file");
        file.apply(&mut t).unwrap_or_else(|e| panic!("{e}"));
        assert!(t.has_source(DEFAULT_SOURCE));
    }

    #[test]
    fn garbage_never_panics() {
        let deep_array = format!("a = {}{}", "[".repeat(5000), "]".repeat(5000));
        let deep_key = format!("{} = 1", vec!["a"; 5000].join("."));
        let deep_source = format!(
            "[source]\nkind = \"test\"\n[source.config]\nx = {}1{}",
            "[".repeat(100),
            "]".repeat(100)
        );
        let garbage = [
            "",
            "\0",
            "\u{feff}name = \"bom\"",
            "=",
            "[",
            "[[",
            "]]]]",
            "[]",
            "[a.]",
            "name = ",
            "name = \"unterminated",
            "name = '''\nmulti\nline",
            "x = { a = 1, b = ",
            "failure = []",
            "failure = { policy = 3 }",
            "failure.policy = 3\nfailure.x = 1\nfailure.y = 2",
            "[failure]\n[failure]",
            "[tasks.\"\"]\nworkers = 1",
            "[tasks.\"é\"]\nworkers = 0\nwörkers = 1",
            "tasks = 3",
            "[[tasks]]\nworkers = 1",
            "[metric]\ntargets = [[], {}, { kind = 3 }]",
            "[[metric.targets]]\n[[metric.targets]]\nkind = \"log\"\nlevel = \"loud\"",
            "metric.targets = { kind = \"console\" }",
            "[source]\nconfig = 3",
            "[source]\nkind = \"\"\n[source.config]",
            "source = { kind = \"test\", config = { path = \"é\", \"limit\" = 1e400 } }",
            "max_pending = 99999999999999999999999",
            "max_pending = -1\nbatch_size = -0\nmessage_timeout = \"-1s\"",
            "message_timeout = \"99999999999999999999999999h\"",
            "grace_period = \"18446744073709551615s 999ms\"",
            "é = 1\n\"ü\" = 2\n[ñ]\nx = 1",
            "\r\n\r\nname = 1\r\n",
            "name = 1\rname = 2",
            "a = 1979-05-27T07:32:00Z\nname = 1979-05-27",
            &deep_array,
            &deep_key,
            &deep_source,
        ];
        for text in garbage {
            let parsed = std::panic::catch_unwind(|| {
                let parsed = TopologyFile::parse(text, None);
                if let Err(e) = &parsed {
                    let _ = e.to_string();
                }
                if let Ok(file) = &parsed {
                    let mut t = topology();
                    t.source_kinds.register::<TestSource>("test");
                    if let Err(e) = file.apply(&mut t) {
                        let _ = e.to_string();
                    }
                }
            });
            assert!(parsed.is_ok(), "panicked on {text:?}");
        }
        // Every byte prefix of a valid file, cut at char boundaries.
        for end in (0..=FULL.len()).filter(|&i| FULL.is_char_boundary(i)) {
            let text = &FULL[..end];
            let r = std::panic::catch_unwind(|| {
                let _ = TopologyFile::parse(text, None);
            });
            assert!(r.is_ok(), "panicked on prefix {text:?}");
        }
    }
}
