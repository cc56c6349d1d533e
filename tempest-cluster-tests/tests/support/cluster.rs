//! The compose cluster's lifetime: Docker checked, the images built (the
//! Debian base with `scripts/docker-base-image` when it is missing, Tempest's
//! from binaries compiled on the host, Redis's with apt), the cluster's CA,
//! certificates and tokens made as `tempest cluster init` makes them (in a
//! directory of the run's own, `TEMPEST_TLS_DIR`), `docker-compose.yml`
//! brought up under a project name of its own with free host ports, TLS on
//! every link, and torn down (volumes included) when the [`Cluster`] is
//! dropped, after printing every container's logs if the test is failing.

use std::collections::{BTreeMap, BTreeSet};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use super::https::Https;
use super::{report_line, wait_for};
use tempest_control::credentials::write_private_file;
use tempest_control::tls::ClusterCa;
use tempest_control::Secret;
use tempest_testkit::cluster::workspace_dir;
use tempest_testkit::http::Response;

/// The services of `docker-compose.yml`.
pub const AGENTS: [&str; 3] = ["agent1", "agent2", "agent3"];

/// The repository's root.
pub fn repo_root() -> PathBuf {
    workspace_dir()
}

/// What a command printed, and whether it succeeded within its bound.
pub struct Output {
    pub ok: bool,
    pub stdout: String,
    pub stderr: String,
}

impl Output {
    pub fn text(&self) -> String {
        format!("{}{}", self.stdout, self.stderr)
    }
}

/// Runs `cmd`, killing it after `bound`.
pub fn run(cmd: &mut Command, bound: Duration) -> Output {
    let what = format!("{cmd:?}");
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = match cmd.spawn() {
        Ok(c) => c,
        Err(e) => {
            return Output {
                ok: false,
                stdout: String::new(),
                stderr: format!("cannot run {what}: {e}"),
            }
        }
    };
    let drain = |pipe: Option<Box<dyn Read + Send>>| {
        std::thread::spawn(move || {
            let mut s = String::new();
            if let Some(mut p) = pipe {
                let _ = p.read_to_string(&mut s);
            }
            s
        })
    };
    let out = drain(
        child
            .stdout
            .take()
            .map(|p| Box::new(p) as Box<dyn Read + Send>),
    );
    let err = drain(
        child
            .stderr
            .take()
            .map(|p| Box::new(p) as Box<dyn Read + Send>),
    );
    let deadline = Instant::now() + bound;
    let status = loop {
        match child.try_wait() {
            Ok(Some(s)) => break Some(s),
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(20)),
            _ => {
                let _ = child.kill();
                let _ = child.wait();
                break None;
            }
        }
    };
    let stdout = out.join().unwrap_or_default();
    let mut stderr = err.join().unwrap_or_default();
    if status.is_none() {
        stderr.push_str(&format!("\n{what} did not finish within {bound:?}"));
    }
    Output {
        ok: status.is_some_and(|s| s.success()),
        stdout,
        stderr,
    }
}

/// `docker ARGS`, bounded by `bound`.
pub fn docker(args: &[&str], bound: Duration) -> Output {
    run(Command::new("docker").args(args), bound)
}

/// `docker ARGS`, which must succeed.
fn docker_ok(args: &[&str], bound: Duration) -> String {
    let out = docker(args, bound);
    assert!(out.ok, "docker {}: {}", args.join(" "), out.text());
    out.stdout
}

/// Fails, never skips, when Docker is not usable: the suite is part of CI.
fn check_docker() {
    let out = docker(
        &["info", "--format", "{{.ServerVersion}}"],
        Duration::from_secs(60),
    );
    if !out.ok || out.stdout.trim().is_empty() {
        let ci = match std::env::var("CI") {
            Ok(v) if !v.is_empty() => " (CI is set: this suite must run in CI)",
            _ => "",
        };
        panic!(
            "the Docker cluster suite needs Docker Engine and Compose, and Docker is not usable \
             here{ci}: `docker info` failed: {}\nInstall them (Debian: apt-get install docker.io \
             docker-compose) and start the daemon; the suite does not skip without them.",
            out.text().trim()
        );
    }
}

/// `docker compose` (v2) when it works, else `docker-compose` (v1).
fn compose_program() -> Vec<String> {
    let bound = Duration::from_secs(30);
    if docker(&["compose", "version"], bound).ok {
        return vec!["docker".into(), "compose".into()];
    }
    if run(Command::new("docker-compose").arg("version"), bound).ok {
        return vec!["docker-compose".into()];
    }
    panic!(
        "the Docker cluster suite needs Docker Compose: neither `docker compose` nor \
         `docker-compose` works (Debian: apt-get install docker-compose)"
    );
}

/// The image the Dockerfile starts FROM.
fn base_image() -> String {
    let path = repo_root().join("Dockerfile");
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
    text.lines()
        .find_map(|l| l.trim().strip_prefix("FROM "))
        .map(|s| s.split_whitespace().next().unwrap_or("").to_owned())
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| panic!("no FROM line in {}", path.display()))
}

/// Builds the base image with `scripts/docker-base-image` when it is
/// missing; returns how long that took.
fn ensure_base_image() -> Option<Duration> {
    let image = base_image();
    if docker(&["image", "inspect", &image], Duration::from_secs(30)).ok {
        return None;
    }
    let started = Instant::now();
    let script = repo_root().join("scripts/docker-base-image");
    let out = run(
        Command::new(&script).arg(&image),
        Duration::from_secs(20 * 60),
    );
    assert!(
        out.ok,
        "{} {image} failed: {}",
        script.display(),
        out.text()
    );
    Some(started.elapsed())
}

/// The binaries the images and the package are made of.
struct Binaries {
    profile: String,
    director: PathBuf,
    agent: PathBuf,
    wordcount: PathBuf,
    /// The `tempest` CLI.
    cli: PathBuf,
}

/// Builds (or finds up to date) the daemons, word count and the CLI in this
/// test binary's own profile and target directory.
fn build_binaries() -> Binaries {
    let exe = std::env::current_exe().expect("the test binary's path");
    // target/<profile>/deps/<this test>
    let profile_dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("the test binary is in target/<profile>/deps")
        .to_path_buf();
    let profile = profile_dir
        .file_name()
        .and_then(|n| n.to_str())
        .expect("a profile directory name")
        .to_owned();
    let root = repo_root();
    let cargo_build = |packages: &[(&str, &str)]| {
        let mut args: Vec<String> = vec!["build".into()];
        for (package, bin) in packages {
            args.extend(["-p", package, "--bin", bin].map(String::from));
        }
        if profile != "debug" {
            args.extend(["--profile".to_owned(), profile.clone()]);
        }
        if let Some(target) = profile_dir.parent() {
            args.extend(["--target-dir".to_owned(), target.display().to_string()]);
        }
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let out = run(
            Command::new(cargo).args(&args).current_dir(&root),
            Duration::from_secs(30 * 60),
        );
        (out, args.join(" "))
    };
    let (out, args) = cargo_build(&[
        ("tempest-director", "tempest-director"),
        ("tempest-agent", "tempest-agent"),
        ("tempest-cli", "tempest"),
        ("wordcount", "wordcount"),
    ]);
    assert!(out.ok, "cargo {args}: {}", out.text());
    let bin = |name: &str| {
        let p = profile_dir.join(name);
        assert!(p.is_file(), "no {}", p.display());
        p
    };
    Binaries {
        director: bin("tempest-director"),
        agent: bin("tempest-agent"),
        wordcount: bin("wordcount"),
        cli: bin("tempest"),
        profile,
    }
}

/// Copies `src` to `dst` without its debug information (a debug build's
/// binaries are mostly that), or as it is when `strip` is not there.
fn copy_stripped(src: &Path, dst: &Path) {
    let stripped = run(
        Command::new("strip")
            .arg("--strip-debug")
            .arg("-o")
            .arg(dst)
            .arg(src),
        Duration::from_secs(120),
    );
    if !stripped.ok {
        std::fs::copy(src, dst)
            .unwrap_or_else(|e| panic!("copying {} to {}: {e}", src.display(), dst.display()));
    }
}

/// The Dockerfile's build context as a user's would be after `cargo build`
/// (`target/<profile>/...`), holding only the binaries, stripped, and the
/// image's entrypoint (what `.dockerignore` lets in).
fn stage_context(bins: &Binaries, dir: &Path) -> PathBuf {
    let target = dir.join("target").join(&bins.profile);
    std::fs::create_dir_all(&target).expect("creating the build context");
    copy_stripped(&bins.director, &target.join("tempest-director"));
    copy_stripped(&bins.agent, &target.join("tempest-agent"));
    copy_stripped(&bins.cli, &target.join("tempest"));
    let entrypoint = repo_root().join("docker/entrypoint.sh");
    std::fs::create_dir_all(dir.join("docker")).expect("creating the build context");
    std::fs::copy(&entrypoint, dir.join("docker/entrypoint.sh"))
        .unwrap_or_else(|e| panic!("copying {}: {e}", entrypoint.display()));
    let wordcount = dir.join("wordcount");
    copy_stripped(&bins.wordcount, &wordcount);
    wordcount
}

/// The names in the director's and the agents' certificates: what
/// `tempest cluster init --host director --host agent1 --host agent2 --host
/// agent3` puts in them (bar this machine's name).
pub const CERT_NAMES: [&str; 7] = [
    "localhost",
    "127.0.0.1",
    "::1",
    "director",
    "agent1",
    "agent2",
    "agent3",
];

/// The files docker-compose.yml mounts from the TLS directory (the director
/// gets all but the agents' certificate and key).
pub const TLS_FILES: [&str; 9] = [
    "ca.crt",
    "ca.key",
    "director.crt",
    "director.key",
    "agent.crt",
    "agent.key",
    "admin.token",
    "viewer.token",
    "agent.token",
];

/// What `tempest cluster init` writes, with its API: a new cluster CA, the
/// director's and the agents' certificates (for [`CERT_NAMES`]) and the
/// three tokens, each file mode 0600, in `dir`. Returns the admin token.
fn make_tls_dir(dir: &Path) -> Secret {
    std::fs::create_dir_all(dir).expect("creating the TLS directory");
    let names: Vec<String> = CERT_NAMES.iter().map(|n| (*n).to_owned()).collect();
    let ca = ClusterCa::generate().expect("a cluster CA");
    let director = ca
        .issue("Tempest director", &names)
        .expect("the director's certificate");
    let agent = ca
        .issue("Tempest agent", &names)
        .expect("the agents' certificate");
    let tokens: Vec<Secret> = (0..3)
        .map(|_| Secret::generate().expect("a token"))
        .collect();
    let ca_key = ca.key_pem();
    let contents: [&str; 9] = [
        ca.cert_pem(),
        ca_key.expose(),
        &director.cert_pem,
        director.key_pem.expose(),
        &agent.cert_pem,
        agent.key_pem.expose(),
        tokens[0].expose(),
        tokens[1].expose(),
        tokens[2].expose(),
    ];
    for (file, text) in TLS_FILES.iter().zip(contents) {
        let path = dir.join(file);
        write_private_file(&path, text.as_bytes())
            .unwrap_or_else(|e| panic!("writing {}: {e}", path.display()));
    }
    tokens.into_iter().next().expect("the admin token")
}

fn free_port() -> u16 {
    tempest_testkit::free_port().expect("a free port")
}

/// The compose cluster; dropping it tears it down.
pub struct Cluster {
    compose: Vec<String>,
    project: String,
    env: Vec<(String, String)>,
    /// A compose file laid over docker-compose.yml: no restart policy.
    override_file: PathBuf,
    /// The director's API from the host, `127.0.0.1:PORT` (https).
    pub director: String,
    /// The director's API over TLS, verified against the cluster CA.
    https: Https,
    /// The run's TLS directory: what `tempest cluster init` writes, which
    /// compose mounts the containers' files from.
    pub tls_dir: PathBuf,
    /// Redis from the host.
    pub redis_url: String,
    /// The director's admin token (the agents hold another, the agent
    /// token; both reach the containers as files, none in an environment).
    pub token: String,
    /// The compose network.
    pub network: String,
    /// The word count binary to package (stripped).
    pub wordcount: PathBuf,
    ids: std::sync::Mutex<BTreeMap<String, String>>,
    _context: tempfile::TempDir,
}

impl Cluster {
    /// Checks Docker, builds the images and brings the cluster up with three
    /// agents heartbeating. Prints how long each step took.
    pub fn up() -> Cluster {
        check_docker();
        let compose = compose_program();
        reap_dead_runs(&compose);
        if let Some(took) = ensure_base_image() {
            report_line(
                &json!({"step": "base-image", "image": base_image(), "ms": took.as_millis() as u64}),
            );
        }

        let started = Instant::now();
        let bins = build_binaries();
        report_line(
            &json!({"step": "cargo-build", "profile": bins.profile, "ms": started.elapsed().as_millis() as u64}),
        );

        let started = Instant::now();
        let context = tempfile::Builder::new()
            .prefix("tempest-image-context")
            .tempdir()
            .expect("a temporary directory");
        let wordcount = stage_context(&bins, context.path());
        let root = repo_root();
        // Unique across machines sharing one Docker daemon (pids repeat in
        // separate pid namespaces), and naming this process so a later run
        // can tell a dead run's leftovers.
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
        let run = format!("{}x{nanos:09}", std::process::id());
        let image = format!("tempest:cluster-test-{run}");
        let redis_image = "tempest-redis:local".to_owned();
        // The suite's containers never come back by themselves (after a
        // daemon restart, say): a run that died cannot leave a cluster up.
        let no_restart = context.path().join("no-restart.yml");
        let services: String = ["redis", "director"]
            .iter()
            .chain(AGENTS.iter())
            .map(|s| format!("  {s}:\n    restart: \"no\"\n"))
            .collect();
        std::fs::write(&no_restart, format!("services:\n{services}"))
            .expect("writing the compose override");
        // The CA, certificates and tokens, as `tempest cluster init` makes
        // them; compose mounts each container's own.
        let tls_dir = context.path().join("tls");
        let token = make_tls_dir(&tls_dir).expose().to_owned();
        let ca = tls_dir.join("ca.crt");
        let tls_dir_env = tls_dir.display().to_string();
        let director_port = free_port();
        let redis_port = free_port();
        let env = vec![
            ("TEMPEST_IMAGE".to_owned(), image.clone()),
            ("TEMPEST_REDIS_IMAGE".to_owned(), redis_image.clone()),
            (
                "TEMPEST_DIRECTOR_PORT".to_owned(),
                director_port.to_string(),
            ),
            ("TEMPEST_REDIS_PORT".to_owned(), redis_port.to_string()),
            ("TEMPEST_TLS_DIR".to_owned(), tls_dir_env),
        ];
        let director = format!("127.0.0.1:{director_port}");
        // From here on, dropping the cluster removes what was made for it
        // (the image included), whatever fails next.
        let mut cluster = Cluster {
            compose,
            project: format!("tempestct{run}"),
            env,
            override_file: no_restart,
            https: Https::new(&director, &ca),
            director,
            tls_dir,
            redis_url: format!("redis://127.0.0.1:{redis_port}/"),
            token,
            network: String::new(),
            wordcount,
            ids: std::sync::Mutex::new(BTreeMap::new()),
            _context: context,
        };
        let dockerfile = root.join("Dockerfile").display().to_string();
        let ctx = cluster._context.path().display().to_string();
        let profile_arg = format!("PROFILE={}", bins.profile);
        let bound = Duration::from_secs(15 * 60);
        docker_ok(
            &[
                "build",
                "-q",
                "-t",
                &image,
                "--build-arg",
                &profile_arg,
                "-f",
                &dockerfile,
                &ctx,
            ],
            bound,
        );
        let redis_dir = root.join("docker/redis").display().to_string();
        docker_ok(&["build", "-q", "-t", &redis_image, &redis_dir], bound);
        report_line(&json!({"step": "image-builds", "ms": started.elapsed().as_millis() as u64}));

        let started = Instant::now();
        let out = cluster.compose(&["up", "-d", "--no-build"], Duration::from_secs(300));
        assert!(out.ok, "compose up: {}", out.text());
        for service in ["redis", "director"].iter().chain(AGENTS.iter()) {
            let out = cluster.compose(&["ps", "-q", service], Duration::from_secs(60));
            let id = out.stdout.trim().to_owned();
            assert!(
                out.ok && !id.is_empty(),
                "no container for {service}: {}",
                out.text()
            );
            cluster.ids().insert((*service).to_owned(), id);
        }
        let networks = docker_ok(
            &[
                "inspect",
                "-f",
                "{{range $k, $v := .NetworkSettings.Networks}}{{$k}}\n{{end}}",
                &cluster.container("director"),
            ],
            Duration::from_secs(30),
        );
        cluster.network = networks
            .lines()
            .next()
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .expect("the director's compose network")
            .to_owned();
        wait_for(
            "three agents up at the director",
            Duration::from_secs(120),
            || (cluster.agents_up()?.len() == 3).then_some(()),
        );
        report_line(&json!({"step": "compose-up", "ms": started.elapsed().as_millis() as u64}));
        cluster
    }

    fn compose(&self, args: &[&str], bound: Duration) -> Output {
        let mut cmd = Command::new(&self.compose[0]);
        cmd.args(&self.compose[1..])
            .arg("-p")
            .arg(&self.project)
            .arg("-f")
            .arg(repo_root().join("docker-compose.yml"))
            .arg("-f")
            .arg(&self.override_file)
            .args(args)
            .current_dir(repo_root());
        for (k, v) in &self.env {
            cmd.env(k, v);
        }
        run(&mut cmd, bound)
    }

    fn ids(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, String>> {
        self.ids.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The container id of `service`.
    pub fn container(&self, service: &str) -> String {
        self.ids()
            .get(service)
            .cloned()
            .unwrap_or_else(|| panic!("no service {service}"))
    }

    /// `docker VERB [ARGS] CONTAINER` for `service`, which must succeed.
    pub fn docker_on(&self, verb: &[&str], service: &str) {
        let id = self.container(service);
        let mut args = verb.to_vec();
        args.push(&id);
        docker_ok(&args, Duration::from_secs(120));
    }

    /// Removes `service`'s container and creates it anew from the compose
    /// file (its named volumes stay): what survives is what is on them.
    pub fn recreate(&self, service: &str) {
        self.docker_on(&["rm", "-f"], service);
        let out = self.compose(
            &["up", "-d", "--no-deps", "--no-build", service],
            Duration::from_secs(120),
        );
        assert!(out.ok, "compose up {service}: {}", out.text());
        let out = self.compose(&["ps", "-q", service], Duration::from_secs(60));
        let id = out.stdout.trim().to_owned();
        assert!(
            out.ok && !id.is_empty(),
            "no container for {service}: {}",
            out.text()
        );
        assert_ne!(self.container(service), id, "{service} was not recreated");
        self.ids().insert(service.to_owned(), id);
    }

    /// Cuts `service` off the compose network.
    pub fn disconnect(&self, service: &str) {
        docker_ok(
            &[
                "network",
                "disconnect",
                &self.network,
                &self.container(service),
            ],
            Duration::from_secs(60),
        );
    }

    /// Connects `service` back, under its service name.
    pub fn connect(&self, service: &str) {
        docker_ok(
            &[
                "network",
                "connect",
                "--alias",
                service,
                &self.network,
                &self.container(service),
            ],
            Duration::from_secs(60),
        );
    }

    /// The topology processes running in `service`'s container, read from
    /// its `/proc`: `server`, `TASK/INSTANCE`. None when it cannot be read
    /// (the container is not running).
    pub fn processes_in(&self, service: &str) -> Option<Vec<String>> {
        let out = self.exec(
            service,
            "for f in /proc/[0-9]*/cmdline; do tr '\\000' ' ' < \"$f\"; echo; done 2>/dev/null",
        );
        if !out.ok && out.stdout.is_empty() {
            return None;
        }
        Some(out.stdout.lines().filter_map(process_identity).collect())
    }

    /// The established TCP connections of the topology processes in
    /// `service`'s container, read from its `/proc` (`net/tcp`, `net/tcp6`
    /// and each process's socket descriptors). None when it cannot be read
    /// (the container is not running).
    pub fn connections_in(&self, service: &str) -> Option<Vec<Connection>> {
        let script = r#"
for t in /proc/net/tcp /proc/net/tcp6; do [ -r "$t" ] && sed 's/^/T /' "$t"; done
for p in /proc/[0-9]*; do
  pid=${p#/proc/}
  c=$(tr '\000' ' ' < "$p/cmdline" 2>/dev/null) || continue
  case "$c" in *"/packages/"*) ;; *) continue ;; esac
  echo "P $pid $c"
  ls -l "$p/fd" 2>/dev/null | sed -n "s/.*socket:\[\([0-9]*\)\].*/S $pid \1/p"
done
"#;
        let out = self.exec(service, script);
        if !out.ok && out.stdout.is_empty() {
            return None;
        }
        Some(parse_connections(&out.stdout))
    }

    /// Every topology process in every running agent container, with the
    /// services it runs in.
    pub fn processes(&self) -> BTreeMap<String, Vec<String>> {
        let mut all: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for service in AGENTS {
            for p in self.processes_in(service).unwrap_or_default() {
                all.entry(p).or_default().push(service.to_owned());
            }
        }
        all
    }

    /// GET on the director over TLS with the admin token; None when it
    /// does not answer.
    pub fn get(&self, path: &str) -> Option<Response> {
        self.try_get(path).ok()
    }

    /// GET on the director over TLS with the admin token.
    pub fn try_get(&self, path: &str) -> std::io::Result<Response> {
        let auth = format!("Bearer {}", self.token);
        self.https.request(
            "GET",
            path,
            &[("Authorization", auth.as_str())],
            b"",
            Duration::from_secs(10),
        )
    }

    /// `method path` on the director over TLS with `token` (none: no
    /// Authorization header), presenting no client certificate.
    pub fn request_as(
        &self,
        method: &str,
        path: &str,
        token: Option<&str>,
        body: &[u8],
    ) -> std::io::Result<Response> {
        let auth = token.map(|t| format!("Bearer {t}"));
        let mut headers = Vec::new();
        if let Some(a) = &auth {
            headers.push(("Authorization", a.as_str()));
        }
        if body.first() == Some(&b'{') {
            headers.push(("Content-Type", "application/json"));
        }
        self.https
            .request(method, path, &headers, body, Duration::from_secs(30))
    }

    /// POST on the director over TLS with the admin token.
    pub fn post(&self, path: &str, body: &[u8]) -> Response {
        let auth = format!("Bearer {}", self.token);
        let mut headers = vec![("Authorization", auth.as_str())];
        if body.first() == Some(&b'{') {
            headers.push(("Content-Type", "application/json"));
        }
        self.https
            .request("POST", path, &headers, body, Duration::from_secs(120))
            .unwrap_or_else(|e| panic!("POST {path}: {e}"))
    }

    /// Runs `script` with `sh -c` in `service`'s container as the tempest
    /// user, the daemons' (`docker exec` would be root, which may not read
    /// another user's `/proc/PID/fd` or `environ` without CAP_SYS_PTRACE).
    pub fn exec(&self, service: &str, script: &str) -> Output {
        docker(
            &[
                "exec",
                "-u",
                "tempest",
                &self.container(service),
                "sh",
                "-c",
                script,
            ],
            Duration::from_secs(30),
        )
    }

    /// GET returning JSON from a 200; None otherwise.
    pub fn get_json(&self, path: &str) -> Option<Value> {
        let r = self.get(path)?;
        (r.status == 200).then(|| serde_json::from_str(&r.body).ok())?
    }

    /// The agents the director counts up: id -> compose service.
    pub fn agents_up(&self) -> Option<BTreeMap<String, String>> {
        let agents = self.get_json("/api/v1/agents")?;
        Some(
            agents
                .as_array()?
                .iter()
                .filter(|a| a["up"] == json!(true))
                .filter_map(|a| {
                    let id = a["id"].as_str()?.to_owned();
                    Some((id, service_of(a["address"].as_str()?)))
                })
                .collect(),
        )
    }

    /// The compose service of the agent `id`.
    pub fn service_of_agent(&self, id: &str) -> Option<String> {
        let agents = self.get_json("/api/v1/agents")?;
        agents
            .as_array()?
            .iter()
            .find(|a| a["id"] == json!(id))
            .and_then(|a| a["address"].as_str())
            .map(service_of)
    }

    fn dump_logs(&self) {
        let mut text = String::new();
        let ids = self.ids().clone();
        for (service, id) in &ids {
            let out = docker(&["logs", "--tail", "150", id], Duration::from_secs(30));
            text.push_str(&format!("--- {service} ---\n{}\n", out.text()));
            if service.starts_with("agent") {
                let out = docker(
                    &[
                        "exec",
                        "-u",
                        "tempest",
                        id,
                        "sh",
                        "-c",
                        "for f in /var/lib/tempest-agent/logs/*/std*.log; do echo \"== $f\"; tail -n 30 \"$f\"; done",
                    ],
                    Duration::from_secs(30),
                );
                text.push_str(&format!("--- {service}'s processes ---\n{}\n", out.text()));
            }
        }
        super::report_raw(&text);
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.dump_logs();
        }
        if std::env::var_os("TEMPEST_KEEP_CLUSTER").is_some() {
            super::report_raw(&format!(
                "TEMPEST_KEEP_CLUSTER is set: the cluster stays up; remove it with \
                 `docker-compose -p {} down -v`\n",
                self.project
            ));
            return;
        }
        let out = self.compose(
            &["down", "-v", "--remove-orphans", "-t", "5"],
            Duration::from_secs(300),
        );
        if !out.ok {
            super::report_raw(&format!("compose down failed: {}\n", out.text()));
        }
        if let Some((_, image)) = self.env.iter().find(|(k, _)| k == "TEMPEST_IMAGE") {
            let _ = docker(&["image", "rm", image], Duration::from_secs(60));
        }
    }
}

/// Removes what earlier runs left when they were killed before their
/// teardown (SIGKILL, a CI timeout): compose projects `tempestct<pid>x...`
/// and images `tempest:cluster-test-<pid>x...` whose process is gone.
fn reap_dead_runs(compose: &[String]) {
    let dead = |run: &str| {
        run.split('x')
            .next()
            .and_then(|pid| pid.parse::<u32>().ok())
            .is_some_and(|pid| !Path::new(&format!("/proc/{pid}")).exists())
    };
    let listed = docker(
        &[
            "ps",
            "-a",
            "--format",
            "{{.Label \"com.docker.compose.project\"}}",
        ],
        Duration::from_secs(60),
    );
    let projects: BTreeSet<String> = listed
        .stdout
        .lines()
        .filter_map(|l| l.trim().strip_prefix("tempestct"))
        .filter(|run| dead(run))
        .map(|run| format!("tempestct{run}"))
        .collect();
    for project in projects {
        report_line(&json!({"note": format!("removing {project}, left by a run that died")}));
        let mut cmd = Command::new(&compose[0]);
        cmd.args(&compose[1..])
            .args(["-p", &project, "-f"])
            .arg(repo_root().join("docker-compose.yml"))
            .args(["down", "-v", "--remove-orphans", "-t", "1"])
            .current_dir(repo_root());
        run(&mut cmd, Duration::from_secs(300));
    }
    let images = docker(
        &["images", "tempest", "--format", "{{.Tag}}"],
        Duration::from_secs(60),
    );
    for tag in images.stdout.lines().map(str::trim) {
        if tag.strip_prefix("cluster-test-").is_some_and(dead) {
            let _ = docker(
                &["image", "rm", "-f", &format!("tempest:{tag}")],
                Duration::from_secs(60),
            );
        }
    }
}

/// An established TCP connection of a topology process.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Connection {
    /// Its own end, `ip:port`.
    pub local: String,
    /// The other end, `ip:port`.
    pub remote: String,
    /// The process holding it: `server`, `TASK/INSTANCE`.
    pub process: String,
}

/// `0100007F:1F90` (IPv4) or a 32-digit IPv6 address of `/proc/net/tcp6`
/// -> `127.0.0.1:8080`; an IPv4-mapped IPv6 address reads as IPv4.
fn proc_address(field: &str) -> Option<String> {
    let (ip, port) = field.split_once(':')?;
    let port = u16::from_str_radix(port, 16).ok()?;
    // Each 32-bit word is in the kernel's (little-endian) byte order.
    let word = |hex: &str| u32::from_str_radix(hex, 16).ok().map(u32::to_le_bytes);
    let ip = match ip.len() {
        8 => std::net::IpAddr::from(word(ip)?),
        32 => {
            let mut bytes = [0u8; 16];
            for (i, chunk) in bytes.chunks_mut(4).enumerate() {
                chunk.copy_from_slice(&word(ip.get(i * 8..i * 8 + 8)?)?);
            }
            let v6 = std::net::Ipv6Addr::from(bytes);
            v6.to_ipv4_mapped()
                .map_or(std::net::IpAddr::V6(v6), std::net::IpAddr::V4)
        }
        _ => return None,
    };
    Some(std::net::SocketAddr::new(ip, port).to_string())
}

/// The output of [`Cluster::connections_in`]'s script: `T` lines of
/// `/proc/net/tcp*`, `P PID CMDLINE` and `S PID INODE` lines.
fn parse_connections(text: &str) -> Vec<Connection> {
    // inode -> (local, remote) of the established sockets.
    let mut sockets: BTreeMap<u64, (String, String)> = BTreeMap::new();
    let mut identity: BTreeMap<u64, String> = BTreeMap::new();
    let mut owned: Vec<(u64, u64)> = Vec::new();
    for line in text.lines() {
        let mut words = line.split_whitespace();
        match words.next() {
            Some("T") => {
                let f: Vec<&str> = words.collect();
                // sl local rem st tx:rx tr:when retrnsmt uid timeout inode
                if f.len() < 10 || f[3] != "01" {
                    continue;
                }
                if let (Some(local), Some(remote), Ok(inode)) =
                    (proc_address(f[1]), proc_address(f[2]), f[9].parse())
                {
                    sockets.insert(inode, (local, remote));
                }
            }
            Some("P") => {
                let Some(pid) = words.next().and_then(|p| p.parse().ok()) else {
                    continue;
                };
                let cmdline = words.collect::<Vec<_>>().join(" ");
                if let Some(id) = process_identity(&cmdline) {
                    identity.insert(pid, id);
                }
            }
            Some("S") => {
                if let (Some(Ok(pid)), Some(Ok(inode))) =
                    (words.next().map(str::parse), words.next().map(str::parse))
                {
                    owned.push((pid, inode));
                }
            }
            _ => {}
        }
    }
    owned
        .into_iter()
        .filter_map(|(pid, inode)| {
            let (local, remote) = sockets.get(&inode)?.clone();
            Some(Connection {
                local,
                remote,
                process: identity.get(&pid)?.clone(),
            })
        })
        .collect()
}

/// `agent2:7400` -> `agent2`.
fn service_of(address: &str) -> String {
    address
        .rsplit_once(':')
        .map_or(address, |(host, _)| host)
        .to_owned()
}

/// `.../packages/<hash>/wordcount topology --host ...` -> `server`;
/// `... task --name count --topology-addr A --instance 1 ...` -> `count/1`.
pub fn process_identity(cmdline: &str) -> Option<String> {
    let words: Vec<&str> = cmdline.split_whitespace().collect();
    if !words.first()?.contains("/packages/") {
        return None;
    }
    match *words.get(1)? {
        "topology" => Some("server".to_owned()),
        "task" => {
            let flag = |name: &str| {
                words
                    .iter()
                    .position(|w| *w == name)
                    .and_then(|i| words.get(i + 1))
                    .copied()
            };
            Some(format!(
                "{}/{}",
                flag("--name")?,
                flag("--instance").unwrap_or("0")
            ))
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_proc_net_tcp_addresses() {
        assert_eq!(
            proc_address("0100007F:1F90").as_deref(),
            Some("127.0.0.1:8080")
        );
        assert_eq!(
            proc_address("040012AC:1D4F").as_deref(),
            Some("172.18.0.4:7503")
        );
        assert_eq!(
            proc_address("0000000000000000FFFF0000040012AC:1D4F").as_deref(),
            Some("172.18.0.4:7503")
        );
        assert_eq!(
            proc_address("00000000000000000000000001000000:0050").as_deref(),
            Some("[::1]:80")
        );
        assert_eq!(proc_address("zz:1"), None);
    }

    #[test]
    fn joins_sockets_to_the_processes_holding_them() {
        let text = "\
T   sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
T    0: 00000000:1D4F 00000000:0000 0A 00000000:00000000 00:00000000 00000000   999        0 100 1 0 100 0 0 10 0
T    1: 040012AC:1D4F 030012AC:AF74 01 00000000:00000000 00:00000000 00000000   999        0 101 1 0 20 4 16 18 -1
T    2: 040012AC:BE16 020012AC:1D4D 01 00000000:00000000 00:00000000 00000000   999        0 102 1 0 20 4 16 18 -1
T    3: 040012AC:1CE8 020012AC:AD7E 06 00000000:00000000 03:00001346 00000000     0        0 0 3 0
P 7 /var/lib/tempest-agent/packages/abc/wordcount task --name count --topology-addr agent1:7501 --instance 2 --instances 3
S 7 100
S 7 101
P 9 /var/lib/tempest-agent/packages/abc/wordcount topology --host 0.0.0.0 --port 7501
S 9 102
P 11 tempest-agent --config /etc/tempest/agent1.toml
S 11 103
";
        assert_eq!(
            parse_connections(text),
            vec![
                Connection {
                    local: "172.18.0.4:7503".into(),
                    remote: "172.18.0.3:44916".into(),
                    process: "count/2".into(),
                },
                Connection {
                    local: "172.18.0.4:48662".into(),
                    remote: "172.18.0.2:7501".into(),
                    process: "server".into(),
                },
            ]
        );
    }
}
