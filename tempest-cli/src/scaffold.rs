//! `tempest new` and `tempest generate`: topology crates that build and
//! pass their tests as written, and skeletons added to them.
//!
//! The new crate depends on `tempest` by path when it can: `--tempest-path`,
//! else the checkout this CLI was built from (known at compile time) if it
//! is still there; otherwise on the crates.io version of this CLI. With a
//! checkout, its `Cargo.lock` is copied too, so the new crate resolves the
//! versions the checkout was tested with (and builds offline when the
//! checkout did).
//!
//! `generate` edits `src/main.rs` only at marker comments the template
//! writes (`@tempest:modules`, `@tempest:tasks`, `@tempest:sources`); a
//! crate whose markers were removed gets the new file and the lines to add
//! by hand. No existing file is ever overwritten.

use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};

const CARGO_TOML: &str = include_str!("../templates/Cargo.toml.tpl");
const MAIN_RS: &str = include_str!("../templates/main.rs.tpl");
const TOPOLOGY_TOML: &str = include_str!("../templates/Topology.toml.tpl");
const README: &str = include_str!("../templates/README.md.tpl");
const TASK_RS: &str = include_str!("../templates/task.rs.tpl");
const SOURCE_RS: &str = include_str!("../templates/source.rs.tpl");

const MODULES_MARK: &str = "@tempest:modules";
const TASKS_MARK: &str = "@tempest:tasks";
const SOURCES_MARK: &str = "@tempest:sources";

/// The checkout this CLI was built from.
const BUILT_FROM: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/..");

/// The source a new topology reads.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum SourceKind {
    /// Sample lines in memory (no broker; a start to replace).
    Memory,
    /// Lines of a file or directory, with a durable checkpoint.
    File,
    /// A Redis stream through a consumer group.
    Redis,
    /// A NATS JetStream durable consumer.
    Nats,
    /// A Kafka topic through a consumer group.
    Kafka,
}

/// What `tempest new` was asked.
pub struct NewOptions {
    /// The crate's name.
    pub name: String,
    /// Its source.
    pub source: SourceKind,
    /// Its directory (default `./NAME`).
    pub path: Option<PathBuf>,
    /// The Tempest checkout to depend on.
    pub tempest_path: Option<PathBuf>,
}

const KEYWORDS: &[&str] = &[
    "abstract", "as", "async", "await", "become", "box", "break", "const", "continue", "crate",
    "do", "dyn", "else", "enum", "extern", "false", "final", "fn", "for", "gen", "if", "impl",
    "in", "let", "loop", "macro", "match", "mod", "move", "mut", "override", "priv", "pub", "ref",
    "return", "self", "static", "struct", "super", "trait", "true", "try", "type", "typeof",
    "unsafe", "unsized", "use", "virtual", "where", "while", "yield",
];

/// Names the new crate cannot take: the standard crates and its own
/// dependencies.
const TAKEN: &[&str] = &[
    "std",
    "core",
    "alloc",
    "proc_macro",
    "test",
    "tempest",
    "tempest-core",
    "tempest-task",
    "tempest-topology",
    "tempest-connectors",
    "toml",
];

fn check_crate_name(name: &str) -> Result<()> {
    let mut chars = name.chars();
    let ok = chars.next().is_some_and(|c| c.is_ascii_alphabetic())
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        && name.len() <= 64;
    if !ok {
        bail!(
            "`{name}` is not a topology name: start with a letter, then letters, digits, `-` or `_`"
        );
    }
    let lower = name.to_ascii_lowercase().replace('-', "_");
    if KEYWORDS.contains(&lower.as_str()) || TAKEN.iter().any(|t| t.replace('-', "_") == lower) {
        bail!("`{name}` is a Rust keyword or a crate the topology depends on: choose another name");
    }
    Ok(())
}

fn check_item_name(what: &str, name: &str) -> Result<()> {
    let mut chars = name.chars();
    let ok = chars.next().is_some_and(|c| c.is_ascii_lowercase())
        && chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
        && name.len() <= 64;
    if !ok {
        bail!(
            "`{name}` is not a {what} name: lowercase letters, digits and `_`, starting with a letter \
             (it is also the module's name)"
        );
    }
    if KEYWORDS.contains(&name) || matches!(name, "main" | "tests" | "tempest" | "toml" | "std") {
        bail!("`{name}` is a Rust keyword or taken: choose another {what} name");
    }
    Ok(())
}

/// `snake_case` to `CamelCase`.
fn camel(name: &str) -> String {
    name.split('_')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let mut c = p.chars();
            c.next()
                .map(|f| f.to_ascii_uppercase().to_string() + c.as_str())
                .unwrap_or_default()
        })
        .collect()
}

fn fill(template: &str, vars: &[(&str, &str)]) -> String {
    let mut out = template.to_owned();
    for (k, v) in vars {
        out = out.replace(&format!("{{{{{k}}}}}"), v);
    }
    out
}

/// Where `tempest` comes from for a new crate.
enum TempestDep {
    /// A checkout (its root).
    Path(PathBuf),
    /// crates.io.
    Version(String),
}

fn tempest_dep(explicit: Option<&Path>) -> Result<TempestDep> {
    let is_checkout = |p: &Path| p.join("tempest").join("Cargo.toml").is_file();
    if let Some(p) = explicit {
        let p = p
            .canonicalize()
            .with_context(|| format!("--tempest-path {}", p.display()))?;
        // The checkout's root, or its `tempest` crate.
        if is_checkout(&p) {
            return Ok(TempestDep::Path(p));
        }
        if p.join("Cargo.toml").is_file() && p.file_name().is_some_and(|n| n == "tempest") {
            if let Some(root) = p.parent().filter(|r| is_checkout(r)) {
                return Ok(TempestDep::Path(root.to_path_buf()));
            }
        }
        bail!(
            "--tempest-path {}: not a Tempest checkout (no tempest/Cargo.toml in it)",
            p.display()
        );
    }
    let built = Path::new(BUILT_FROM);
    if is_checkout(built) {
        if let Ok(p) = built.canonicalize() {
            return Ok(TempestDep::Path(p));
        }
    }
    let v = env!("CARGO_PKG_VERSION");
    let req = v.rsplit_once('.').map(|(mm, _)| mm).unwrap_or(v);
    Ok(TempestDep::Version(req.to_owned()))
}

fn toml_str(s: &str) -> String {
    toml::Value::String(s.to_owned()).to_string()
}

/// `tempest new`.
pub fn new_crate(opts: &NewOptions) -> Result<()> {
    check_crate_name(&opts.name)?;
    let dir = opts
        .path
        .clone()
        .unwrap_or_else(|| PathBuf::from(&opts.name));
    if dir.exists() {
        let empty = dir
            .read_dir()
            .map(|mut d| d.next().is_none())
            .unwrap_or(false);
        if !empty {
            bail!(
                "{} exists and is not empty: nothing was written (choose another name or --path)",
                dir.display()
            );
        }
    }
    let dep = tempest_dep(opts.tempest_path.as_deref())?;
    let files = render_crate(&opts.name, opts.source, &dep);
    std::fs::create_dir_all(dir.join("src"))
        .with_context(|| format!("creating {}", dir.join("src").display()))?;
    for (rel, text) in &files {
        write_new(&dir.join(rel), text)?;
    }
    if let TempestDep::Path(root) = &dep {
        let lock = root.join("Cargo.lock");
        if lock.is_file() {
            std::fs::copy(&lock, dir.join("Cargo.lock"))
                .with_context(|| format!("copying {}", lock.display()))?;
        }
    }
    let from = match &dep {
        TempestDep::Path(p) => format!("Tempest at {}", p.display()),
        TempestDep::Version(v) => format!("tempest {v} from crates.io"),
    };
    outln!(
        "created {} ({} source) in {}, depending on {from}",
        opts.name,
        format!("{:?}", opts.source).to_lowercase(),
        dir.display()
    );
    outln!("next:");
    outln!("  cd {}", dir.display());
    outln!("  cargo test                # its tests, on Tempest's test runtime");
    outln!("  cargo run -- standalone   # run it here");
    outln!("  tempest deploy            # package, upload and start it on a cluster");
    Ok(())
}

fn write_new(path: &Path, text: &str) -> Result<()> {
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent)
            .with_context(|| format!("creating {}", parent.display()))?;
    }
    use std::io::Write;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(path)
        .map_err(|e| {
            if e.kind() == std::io::ErrorKind::AlreadyExists {
                anyhow!("{} exists: it is not overwritten", path.display())
            } else {
                anyhow!("writing {}: {e}", path.display())
            }
        })?;
    f.write_all(text.as_bytes())
        .with_context(|| format!("writing {}", path.display()))
}

/// The sample input of the memory and file sources.
const SAMPLE: [&str; 4] = [
    "the cow jumped over the moon",
    "an apple a day keeps the doctor away",
    "four score and seven years ago",
    "snow white and the seven dwarfs",
];

/// Every file of a new crate, by relative path.
fn render_crate(name: &str, source: SourceKind, dep: &TempestDep) -> Vec<(String, String)> {
    let path_of = |krate: &str| match dep {
        TempestDep::Path(root) => format!(
            "{{ path = {} }}",
            toml_str(&root.join(krate).display().to_string())
        ),
        TempestDep::Version(v) => toml_str(v),
    };
    let mut deps = format!("tempest = {}\n", path_of("tempest"));
    let connector = |feature: &str| {
        match dep {
        TempestDep::Path(root) => format!(
            "tempest-connectors = {{ path = {}, default-features = false, features = [\"{feature}\"] }}\n",
            toml_str(&root.join("tempest-connectors").display().to_string())
        ),
        TempestDep::Version(v) => format!(
            "tempest-connectors = {{ version = {}, default-features = false, features = [\"{feature}\"] }}\n",
            toml_str(v)
        ),
    }
    };
    match source {
        SourceKind::Redis => deps.push_str(&connector("redis")),
        SourceKind::Nats => deps.push_str(&connector("nats")),
        SourceKind::Kafka => deps.push_str(&connector("kafka")),
        SourceKind::Memory | SourceKind::File => {}
    }
    let sample_rs: String = SAMPLE.iter().map(|l| format!("    {l:?},\n")).collect();
    let deploy_example = match source {
        SourceKind::File => {
            "\n# A file source on a cluster reads an absolute path on the agents' machines.\n\
             tempest deploy --set source.config.path=/data/input --set source.config.follow=true"
        }
        SourceKind::Redis => "\n# Another Redis server.\ntempest deploy --set source.config.url=redis://10.0.0.5:6379",
        SourceKind::Nats => "\n# Another NATS server.\ntempest deploy --set source.config.url=nats://10.0.0.5:4222",
        SourceKind::Kafka => "\n# Other Kafka brokers.\ntempest deploy --set source.config.brokers=10.0.0.5:9092",
        SourceKind::Memory => "",
    };
    let (short, long, use_line, source_fn, kinds, toml, notes) = match source {
        SourceKind::Memory => (
            "sample lines".to_owned(),
            "sample lines held in memory (a start: replace them with a broker's source)".to_owned(),
            "use tempest::sources::MemorySource;\nuse tempest::{Grouping, Msg, Pipeline, Task, TaskResult, Topology};".to_owned(),
            format!(
                "/// Sample lines to run on. `tempest new --source file|redis|nats|kafka` starts from\n\
                 /// a real source; Topology.toml's [source] can select one too.\n\
                 const SAMPLE: [&str; {}] = [\n{sample_rs}];\n\n\
                 /// The source given in code: the sample lines.\n\
                 fn source() -> MemorySource {{\n    MemorySource::new(SAMPLE)\n}}",
                SAMPLE.len()
            ),
            String::new(),
            format!(
                "# The source. Without a [source] table the one in src/main.rs runs (the\n\
                 # sample lines). To read the lines of a file or a directory of files\n\
                 # instead, resumed after a restart from a durable checkpoint:\n\
                 # [source]\n# kind = \"file\"\n#\n# [source.config]\n\
                 # path = \"/var/lib/{name}/input\"   # a file or a directory\n\
                 # follow = true                    # keep reading appended lines and new files\n"
            ),
            String::new(),
        ),
        SourceKind::File => (
            "data/input.txt".to_owned(),
            "the lines of `data/input.txt`, resumed after a restart from a durable checkpoint".to_owned(),
            "use tempest::sources::FileSource;\nuse tempest::{Grouping, Msg, Pipeline, Task, TaskResult, Topology};".to_owned(),
            "/// The source given in code: the lines of `data/input.txt` (relative to the\n\
             /// working directory), checkpointed in `data/input.txt.checkpoint` so that a\n\
             /// restarted topology resumes where it stopped.\n\
             fn source() -> FileSource {\n    FileSource::new(\"data/input.txt\")\n}"
                .to_owned(),
            String::new(),
            "# The source: the lines of a file, or of every file in a directory (in name\n\
             # order), with a durable checkpoint of what was acked. A relative path is\n\
             # relative to the process's working directory: on a cluster, give an\n\
             # absolute path (or deploy with --set source.config.path=/data/input).\n\
             [source]\nkind = \"file\"\n\n[source.config]\npath = \"data/input.txt\"\n\
             # Keep reading appended lines and new files (a long-running topology).\n\
             follow = false\n"
                .to_owned(),
            "\nIt reads `data/input.txt` and records what was acked in\n\
             `data/input.txt.checkpoint`: a second run goes on from there (delete the\n\
             checkpoint to read the file again). Append lines to the file and, with\n\
             `follow = true` in Topology.toml, a running topology reads them.\n"
                .to_owned(),
        ),
        SourceKind::Redis => (
            "Redis stream".to_owned(),
            format!("the entries of the Redis stream `{name}:input` (their field `payload`) through the consumer group `{name}`"),
            "use tempest::{Grouping, Msg, Pipeline, Task, TaskResult, Topology};\nuse tempest_connectors::redis::{RedisSourceConfig, RedisStreamSource};".to_owned(),
            format!(
                "/// The source given in code: the Redis stream `{name}:input` on REDIS_URL\n\
                 /// (default redis://127.0.0.1:6379), through the consumer group `{name}`.\n\
                 /// Topology.toml's [source] replaces it on a cluster.\n\
                 fn source() -> RedisStreamSource {{\n\
                 \x20   let url = std::env::var(\"REDIS_URL\").unwrap_or_else(|_| \"redis://127.0.0.1:6379\".into());\n\
                 \x20   RedisStreamSource::new(RedisSourceConfig {{\n\
                 \x20       group: \"{name}\".into(),\n\
                 \x20       ..RedisSourceConfig::new(url, \"{name}:input\")\n\
                 \x20   }})\n}}"
            ),
            "\n        // Lets Topology.toml select `kind = \"redis\"`.\n        .source_kinds(tempest_connectors::register)".to_owned(),
            format!(
                "# The source: a Redis stream through a consumer group. Entries stay pending\n\
                 # in the group until their whole tree of work is done, so a crash loses\n\
                 # nothing.\n\
                 [source]\nkind = \"redis\"\n\n[source.config]\n\
                 url = \"redis://127.0.0.1:6379\"\nstream = \"{name}:input\"\ngroup = \"{name}\"\n\
                 # Where roots the retry policy gives up on go.\ndead_letter = \"{name}:dead\"\n"
            ),
            format!(
                "\n`cargo run -- standalone` reads the stream `{name}:input` on\n\
                 `REDIS_URL` (default `redis://127.0.0.1:6379`); feed it with\n\n\
                 ```sh\nredis-cli XADD {name}:input '*' payload \"the cow jumped over the moon\"\n```\n"
            ),
        ),
        SourceKind::Nats => (
            "NATS JetStream".to_owned(),
            format!("the messages of the NATS JetStream stream `{name}` (subjects `{name}.>`) through the durable consumer `{name}`"),
            "use tempest::{Grouping, Msg, Pipeline, Task, TaskResult, Topology};\nuse tempest_connectors::nats::{JetStreamConfig, JetStreamSource};".to_owned(),
            format!(
                "/// The source given in code: the JetStream stream `{name}` (subjects\n\
                 /// `{name}.>`) on NATS_URL (default nats://127.0.0.1:4222), through the\n\
                 /// durable consumer `{name}`. Topology.toml's [source] replaces it on a\n\
                 /// cluster.\n\
                 fn source() -> JetStreamSource {{\n\
                 \x20   let url = std::env::var(\"NATS_URL\").unwrap_or_else(|_| \"nats://127.0.0.1:4222\".into());\n\
                 \x20   JetStreamSource::new(JetStreamConfig {{\n\
                 \x20       consumer: \"{name}\".into(),\n\
                 \x20       ..JetStreamConfig::new(url, \"{name}\")\n\
                 \x20   }})\n\
                 \x20   .expect(\"a valid JetStream configuration\")\n}}"
            ),
            "\n        // Lets Topology.toml select `kind = \"nats\"`.\n        .source_kinds(tempest_connectors::register)".to_owned(),
            format!(
                "# The source: a NATS JetStream stream through a durable pull consumer.\n\
                 # Messages are acked only once their whole tree of work is done.\n\
                 [source]\nkind = \"nats\"\n\n[source.config]\n\
                 url = \"nats://127.0.0.1:4222\"\nstream = \"{name}\"\nsubjects = [\"{name}.>\"]\nconsumer = \"{name}\"\n"
            ),
            format!(
                "\n`cargo run -- standalone` reads the JetStream stream `{name}` on\n\
                 `NATS_URL` (default `nats://127.0.0.1:4222`); feed it with\n\n\
                 ```sh\nnats pub {name}.input \"the cow jumped over the moon\"\n```\n"
            ),
        ),
        SourceKind::Kafka => (
            "Kafka topic".to_owned(),
            format!("the records of the Kafka topic `{name}` through the consumer group `{name}`"),
            "use tempest::{Grouping, Msg, Pipeline, Task, TaskResult, Topology};\nuse tempest_connectors::kafka::{KafkaSource, KafkaSourceConfig};".to_owned(),
            format!(
                "/// The source given in code: the Kafka topic `{name}` on KAFKA_BROKERS\n\
                 /// (default 127.0.0.1:9092), through the consumer group `{name}`.\n\
                 /// Topology.toml's [source] replaces it on a cluster.\n\
                 fn source() -> KafkaSource {{\n\
                 \x20   let brokers = std::env::var(\"KAFKA_BROKERS\").unwrap_or_else(|_| \"127.0.0.1:9092\".into());\n\
                 \x20   KafkaSource::new(KafkaSourceConfig {{\n\
                 \x20       group: \"{name}\".into(),\n\
                 \x20       ..KafkaSourceConfig::new(brokers, [\"{name}\"])\n\
                 \x20   }})\n}}"
            ),
            "\n        // Lets Topology.toml select `kind = \"kafka\"`.\n        .source_kinds(tempest_connectors::register)".to_owned(),
            format!(
                "# The source: a Kafka topic through a consumer group. Each partition's\n\
                 # offset is committed only up to the first record still in flight, so a\n\
                 # crash loses nothing.\n\
                 [source]\nkind = \"kafka\"\n\n[source.config]\n\
                 brokers = \"127.0.0.1:9092\"\ngroup = \"{name}\"\ntopics = [\"{name}\"]\n\
                 # Where roots the retry policy gives up on go.\ndead_letter_topic = \"{name}.dead\"\n"
            ),
            format!(
                "\n`cargo run -- standalone` reads the Kafka topic `{name}` on\n\
                 `KAFKA_BROKERS` (default `127.0.0.1:9092`); feed it with any Kafka\n\
                 producer, e.g.\n\n\
                 ```sh\necho \"the cow jumped over the moon\" | kcat -P -b 127.0.0.1:9092 -t {name}\n```\n"
            ),
        ),
    };
    let dependency_note = match dep {
        TempestDep::Path(root) => format!(
            "`tempest` by path to the checkout at `{}` (its `Cargo.lock` was copied\n  \
             here); change it to a version requirement once Tempest is published.",
            root.display()
        ),
        TempestDep::Version(v) => format!("`tempest = \"{v}\"` from crates.io."),
    };
    let vars: Vec<(&str, &str)> = vec![
        ("name", name),
        ("dependencies", &deps),
        ("source_short", &short),
        ("source_long", &long),
        ("source_use", &use_line),
        ("source_fn", &source_fn),
        ("source_kinds", &kinds),
        ("source_toml", &toml),
        ("run_notes", &notes),
        ("dependency_note", &dependency_note),
        ("deploy_example", deploy_example),
    ];
    let mut files = vec![
        ("Cargo.toml".to_owned(), fill(CARGO_TOML, &vars)),
        ("src/main.rs".to_owned(), fill(MAIN_RS, &vars)),
        ("Topology.toml".to_owned(), fill(TOPOLOGY_TOML, &vars)),
        ("README.md".to_owned(), fill(README, &vars)),
        (".gitignore".to_owned(), "/target\n".to_owned()),
    ];
    if source == SourceKind::File {
        let mut lines = SAMPLE.join("\n");
        lines.push('\n');
        files.push(("data/input.txt".to_owned(), lines));
    }
    files
}

// ---------------------------------------------------------------------------
// generate

/// A topology crate's files that `generate` edits.
struct CrateFiles {
    dir: PathBuf,
    main_rs: String,
    topology_toml: Option<String>,
    cargo_toml: String,
}

fn read_crate(dir: &Path) -> Result<CrateFiles> {
    let cargo = dir.join("Cargo.toml");
    let main = dir.join("src").join("main.rs");
    if !cargo.is_file() || !main.is_file() {
        bail!(
            "{} is not a topology crate (no Cargo.toml and src/main.rs): run this in one, or pass --path",
            if dir == Path::new(".") {
                "the current directory".to_owned()
            } else {
                dir.display().to_string()
            }
        );
    }
    let read =
        |p: &Path| std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()));
    let toml_path = dir.join("Topology.toml");
    Ok(CrateFiles {
        dir: dir.to_path_buf(),
        main_rs: read(&main)?,
        topology_toml: if toml_path.is_file() {
            Some(read(&toml_path)?)
        } else {
            None
        },
        cargo_toml: read(&cargo)?,
    })
}

/// Inserts `lines` before the line holding `mark`, indented like the
/// method call before it when the mark ends a chain of calls, else like
/// the mark. `None` when there is no such line.
fn insert_before_mark(text: &str, mark: &str, lines: &[String]) -> Option<String> {
    let mut out = String::with_capacity(text.len() + 128);
    let mut done = false;
    let mut last_code: Option<&str> = None;
    for line in text.split_inclusive('\n') {
        if !done && line.contains(mark) {
            let indent_of =
                |l: &str| -> String { l.chars().take_while(|c| c.is_whitespace()).collect() };
            let indent = match last_code {
                Some(l) if l.trim_start().starts_with('.') => indent_of(l),
                _ => indent_of(line),
            };
            for l in lines {
                out.push_str(&indent);
                out.push_str(l);
                out.push('\n');
            }
            done = true;
        }
        let t = line.trim();
        if !t.is_empty() && !t.starts_with("//") {
            last_code = Some(line);
        }
        out.push_str(line);
    }
    done.then_some(out)
}

/// The task names `.task("X"` / `.task_with_workers("X"` in `main.rs`, in
/// order.
fn declared_tasks(main_rs: &str) -> Vec<String> {
    let mut names = Vec::new();
    for pat in [".task(\"", ".task_with_workers(\""] {
        let mut from = 0;
        while let Some(i) = main_rs[from..].find(pat) {
            let start = from + i + pat.len();
            if let Some(len) = main_rs[start..].find('"') {
                names.push((start, main_rs[start..start + len].to_owned()));
            }
            from = start;
        }
    }
    names.sort();
    names.into_iter().map(|(_, n)| n).collect()
}

/// Writes the new module file first (refusing to overwrite), then the
/// edited files.
fn apply(files: &CrateFiles, module: &str, text: &str, edits: &[(&str, &str)]) -> Result<()> {
    let path = files.dir.join("src").join(format!("{module}.rs"));
    write_new(&path, text)?;
    for (rel, content) in edits {
        let p = files.dir.join(rel);
        std::fs::write(&p, content).with_context(|| format!("writing {}", p.display()))?;
    }
    Ok(())
}

/// `tempest generate task NAME`.
pub fn generate_task(dir: &Path, name: &str, after: Option<&str>) -> Result<()> {
    check_item_name("task", name)?;
    let files = read_crate(dir)?;
    let module_path = files.dir.join("src").join(format!("{name}.rs"));
    if module_path.exists() {
        bail!("{} exists: it is not overwritten", module_path.display());
    }
    let tasks = declared_tasks(&files.main_rs);
    if tasks.iter().any(|t| t == name) {
        bail!("the pipeline in src/main.rs already has a task `{name}`");
    }
    let after = match after {
        Some(a) if !tasks.is_empty() && !tasks.iter().any(|t| t == a) => bail!(
            "the pipeline in src/main.rs has no task `{a}`; its tasks: {}",
            tasks.join(", ")
        ),
        Some(a) => Some(a.to_owned()),
        None => tasks.last().cloned(),
    };
    let ty = camel(name);
    let from = match &after {
        Some(a) => format!("from `{a}`"),
        None => "it receives".to_owned(),
    };
    let text = fill(TASK_RS, &[("task", name), ("type", &ty), ("from", &from)]);
    let mut wiring = vec![format!(".task(\"{name}\", {name}::{ty}::default)")];
    if let Some(a) = &after {
        wiring.push(format!(".edge(\"{a}\", \"{name}\")"));
    }
    let modules = insert_before_mark(&files.main_rs, MODULES_MARK, &[format!("mod {name};")]);
    let main = modules.and_then(|m| insert_before_mark(&m, TASKS_MARK, &wiring));
    let tasks_toml = format!("\n[tasks.{name}]\nworkers = 1\n");
    let toml = match &files.topology_toml {
        Some(t) if t.contains(&format!("[tasks.{name}]")) => None,
        Some(t) => Some(format!("{}{tasks_toml}", with_newline(t))),
        None => None,
    };
    let mut edits: Vec<(&str, &str)> = Vec::new();
    if let Some(m) = &main {
        edits.push(("src/main.rs", m));
    }
    if let Some(t) = &toml {
        edits.push(("Topology.toml", t));
    }
    apply(&files, name, &text, &edits)?;
    outln!("created src/{name}.rs (task `{name}`, type {name}::{ty})");
    if main.is_some() {
        match &after {
            Some(a) => outln!("added it to the pipeline in src/main.rs after `{a}`"),
            None => outln!("added it to the pipeline in src/main.rs"),
        }
    } else {
        eprintln!(
            "note: src/main.rs has no `{MODULES_MARK}` / `{TASKS_MARK}` markers; wire the task in yourself:\n  \
             mod {name};\n  {}",
            wiring.join("\n  ")
        );
    }
    if toml.is_some() {
        outln!("added [tasks.{name}] workers = 1 to Topology.toml");
    } else if files.topology_toml.is_none() {
        eprintln!("note: there is no Topology.toml; a cluster deploy needs --workers {name}=N");
    }
    Ok(())
}

fn with_newline(s: &str) -> String {
    if s.ends_with('\n') || s.is_empty() {
        s.to_owned()
    } else {
        format!("{s}\n")
    }
}

/// `tempest generate source NAME`.
pub fn generate_source(dir: &Path, name: &str) -> Result<()> {
    check_item_name("source", name)?;
    let files = read_crate(dir)?;
    let module_path = files.dir.join("src").join(format!("{name}.rs"));
    if module_path.exists() {
        bail!("{} exists: it is not overwritten", module_path.display());
    }
    if files.main_rs.contains(&format!("(\"{name}\")")) && files.main_rs.contains(".source_kind") {
        bail!("src/main.rs already registers a source kind `{name}`");
    }
    let ty = camel(name);
    let text = fill(SOURCE_RS, &[("source", name), ("type", &ty)]);
    let registration = vec![format!(".source_kind::<{name}::{ty}>(\"{name}\")")];
    let modules = insert_before_mark(&files.main_rs, MODULES_MARK, &[format!("mod {name};")]);
    let main = modules.and_then(|m| insert_before_mark(&m, SOURCES_MARK, &registration));
    // The skeleton reads its [source.config] table with the toml crate.
    let cargo = add_dependency(&files.cargo_toml, "toml", "\"1\"");
    let toml = files.topology_toml.as_ref().map(|t| {
        format!(
            "{}\n# The `{name}` source (src/{name}.rs) is selected with:\n# [source]\n# kind = \"{name}\"\n#\n# [source.config]\n# count = 100\n",
            with_newline(t)
        )
    });
    let mut edits: Vec<(&str, &str)> = Vec::new();
    if let Some(m) = &main {
        edits.push(("src/main.rs", m));
    }
    if let Some(c) = &cargo {
        edits.push(("Cargo.toml", c));
    }
    if let Some(t) = &toml {
        edits.push(("Topology.toml", t));
    }
    apply(&files, name, &text, &edits)?;
    outln!("created src/{name}.rs (source kind `{name}`, type {name}::{ty})");
    if main.is_some() {
        outln!(
            "registered it in src/main.rs: Topology.toml selects it with [source] kind = \"{name}\""
        );
    } else {
        eprintln!(
            "note: src/main.rs has no `{MODULES_MARK}` / `{SOURCES_MARK}` markers; register the source yourself:\n  \
             mod {name};\n  {}  (on the Topology::builder)",
            registration[0]
        );
    }
    if cargo.is_some() {
        outln!("added toml = \"1\" to Cargo.toml's [dependencies]");
    }
    Ok(())
}

/// Adds `name = req` under `[dependencies]` unless it is there already.
fn add_dependency(cargo_toml: &str, name: &str, req: &str) -> Option<String> {
    let table: toml::Table = cargo_toml.parse().ok()?;
    if table
        .get("dependencies")
        .and_then(|d| d.as_table())
        .is_some_and(|d| d.contains_key(name))
    {
        return None;
    }
    let line = format!("{name} = {req}");
    if let Some(out) = insert_after_line(cargo_toml, "[dependencies]", &line) {
        return Some(out);
    }
    Some(format!(
        "{}\n[dependencies]\n{line}\n",
        with_newline(cargo_toml)
    ))
}

fn insert_after_line(text: &str, exact: &str, line: &str) -> Option<String> {
    let mut out = String::with_capacity(text.len() + line.len() + 1);
    let mut done = false;
    for l in text.split_inclusive('\n') {
        out.push_str(l);
        if !done && l.trim() == exact {
            if !l.ends_with('\n') {
                out.push('\n');
            }
            out.push_str(line);
            out.push('\n');
            done = true;
        }
    }
    done.then_some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_checked() {
        assert!(check_crate_name("word-count_2").is_ok());
        for bad in [
            "",
            "2x",
            "a b",
            "tempest",
            "tempest-core",
            "fn",
            "Self",
            "x/y",
        ] {
            assert!(check_crate_name(bad).is_err(), "{bad}");
        }
        assert!(check_item_name("task", "enrich_2").is_ok());
        for bad in ["Enrich", "en-rich", "_x", "type", "main", ""] {
            assert!(check_item_name("task", bad).is_err(), "{bad}");
        }
        assert_eq!(camel("enrich_user_2"), "EnrichUser2");
    }

    #[test]
    fn every_kind_renders_without_leftover_placeholders() {
        let dep = TempestDep::Path(PathBuf::from("/src/tempest"));
        for kind in [
            SourceKind::Memory,
            SourceKind::File,
            SourceKind::Redis,
            SourceKind::Nats,
            SourceKind::Kafka,
        ] {
            let files = render_crate("demo", kind, &dep);
            for (path, text) in &files {
                assert!(!text.contains("{{"), "{kind:?} {path}: {text}");
            }
            let cargo: toml::Table = files[0].1.parse().unwrap();
            assert_eq!(cargo["package"]["name"].as_str(), Some("demo"));
            assert_eq!(
                cargo["dependencies"]["tempest"]["path"].as_str(),
                Some("/src/tempest/tempest")
            );
            let topology = &files[2].1;
            tempest_core::config::TopologyFile::parse(topology, None)
                .unwrap_or_else(|e| panic!("{kind:?}: {e}\n{topology}"));
            let main = &files[1].1;
            for mark in [MODULES_MARK, TASKS_MARK, SOURCES_MARK] {
                assert!(main.contains(mark), "{kind:?}: no {mark}");
            }
            assert_eq!(declared_tasks(main), ["split", "count"]);
        }
        let files = render_crate(
            "demo",
            SourceKind::Redis,
            &TempestDep::Version("0.1".into()),
        );
        let cargo: toml::Table = files[0].1.parse().unwrap();
        assert_eq!(cargo["dependencies"]["tempest"].as_str(), Some("0.1"));
        assert_eq!(
            cargo["dependencies"]["tempest-connectors"]["features"][0].as_str(),
            Some("redis")
        );
    }

    #[test]
    fn insertions_land_before_their_mark_with_its_indent() {
        let text = "a\n    // x @tempest:tasks\nb\n";
        let out = insert_before_mark(text, TASKS_MARK, &[".task(1)".into(), ".edge(2)".into()]);
        assert_eq!(
            out.unwrap(),
            "a\n    .task(1)\n    .edge(2)\n    // x @tempest:tasks\nb\n"
        );
        // A mark ending a chain: the calls get the chain's indent.
        let text = "    P::new()\n        .task(0)\n    // @tempest:tasks\n}\n";
        let out = insert_before_mark(text, TASKS_MARK, &[".task(1)".into()]);
        assert_eq!(
            out.unwrap(),
            "    P::new()\n        .task(0)\n        .task(1)\n    // @tempest:tasks\n}\n"
        );
        assert!(insert_before_mark(text, SOURCES_MARK, &[]).is_none());
    }

    #[test]
    fn dependencies_are_added_once() {
        let c = "[package]\nname = \"x\"\n\n[dependencies]\ntempest = \"0.1\"\n";
        let out = add_dependency(c, "toml", "\"1\"").unwrap();
        let t: toml::Table = out.parse().unwrap();
        assert_eq!(t["dependencies"]["toml"].as_str(), Some("1"));
        assert!(add_dependency(&out, "toml", "\"1\"").is_none());
        let bare = add_dependency("[package]\nname = \"x\"\n", "toml", "\"1\"").unwrap();
        assert!(bare.parse::<toml::Table>().unwrap()["dependencies"]["toml"].is_str());
    }
}
