//! The director's REST API as the CLI uses it: where the director is, which
//! token to send, and every failure turned into one line that names the
//! problem (unreachable, refused token, unknown topology, ...).
//!
//! The director and the admin token are resolved in this order: the
//! `--director` / `--token-file` flags, the `TEMPEST_DIRECTOR` /
//! `TEMPEST_ADMIN_TOKEN` environment variables (and the old
//! `TEMPEST_TOKEN`), `./Cluster.toml` (or the file `--cluster` names: its
//! `[director] admin_token_file`, or the old `token`), the
//! `.tempest/Cluster.toml` a running `tempest dev` writes, and for the
//! director the default `http://127.0.0.1:7300`. A file's token is only
//! taken with that same file's URL, so it never reaches another director.
//! Every call carries the token, reads included.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use reqwest::blocking::{Body, Client as Http, RequestBuilder};
use reqwest::StatusCode;
use serde_json::Value;
use tempest_control::credentials::{ADMIN_TOKEN_ENV, LEGACY_TOKEN_ENV};
use tempest_control::Secret;

/// The director's default URL.
pub const DEFAULT_DIRECTOR: &str = "http://127.0.0.1:7300";
/// The director's default listen address.
const DEFAULT_LISTEN: &str = "127.0.0.1:7300";

/// Where a setting came from, for error messages.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Origin {
    /// A command-line flag.
    Flag,
    /// An environment variable.
    Env(&'static str),
    /// A Cluster.toml.
    File(PathBuf),
    /// The built-in default.
    Default,
}

impl std::fmt::Display for Origin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Origin::Flag => write!(f, "from the command line"),
            Origin::Env(var) => write!(f, "from {var}"),
            Origin::File(p) => write!(f, "from {}", p.display()),
            Origin::Default => write!(
                f,
                "the default; set --director, TEMPEST_DIRECTOR or Cluster.toml"
            ),
        }
    }
}

/// What the command line says about the director.
#[derive(Clone, Debug, Default)]
pub struct ConnArgs {
    /// `--director`.
    pub director: Option<String>,
    /// `--token-file`.
    pub token_file: Option<PathBuf>,
    /// `--token` (deprecated: a command line is readable by every user).
    pub token: Option<String>,
    /// `--cluster`.
    pub cluster: Option<PathBuf>,
    /// `--ca`.
    pub ca: Option<PathBuf>,
}

/// The director and token, resolved.
#[derive(Clone, Debug)]
pub struct Target {
    /// The base URL, `http://HOST:PORT`, without a trailing slash.
    pub url: String,
    /// Where the URL came from.
    pub url_origin: Origin,
    /// The admin token.
    pub token: Option<Secret>,
    /// Where the token came from.
    pub token_origin: Option<Origin>,
    /// The cluster CA an https:// director is checked against.
    pub ca: Option<PathBuf>,
}

/// The director's URL and the admin token a `Cluster.toml` gives.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct FromFile {
    /// `[agent] director`, else `[director] listen` made reachable (the
    /// director's default address for a `[director]` without `listen`).
    pub url: Option<String>,
    /// The admin token: `[director] admin_token_file`'s (relative to the
    /// file's directory), else the old `[director] token`. (The agent's
    /// token is not an admin's.)
    pub token: Option<Secret>,
    /// The cluster CA: `[director] tls_ca_file`, else `[agent]`'s.
    pub ca: Option<PathBuf>,
}

/// Reads what the CLI needs from a `Cluster.toml`. The daemons validate
/// the whole file; this only needs its syntax and a few keys.
pub fn read_cluster_toml(path: &Path) -> Result<FromFile> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("{}: cannot read the file", path.display()))?;
    let base = path.parent().unwrap_or(Path::new("."));
    parse_cluster_toml(&text, base).map_err(|e| anyhow!("{}: {e}", path.display()))
}

fn parse_cluster_toml(text: &str, base: &Path) -> std::result::Result<FromFile, String> {
    let table: toml::Table = text
        .parse()
        .map_err(|e: toml::de::Error| e.message().trim().to_owned())?;
    let section = |name: &str| table.get(name).and_then(toml::Value::as_table);
    let string = |section: Option<&toml::Table>, key: &str| {
        section
            .and_then(|s| s.get(key))
            .and_then(toml::Value::as_str)
            .map(str::to_owned)
    };
    let agent = section("agent");
    let director = section("director");
    let ca = string(director, "tls_ca_file")
        .or_else(|| string(agent, "tls_ca_file"))
        .map(|f| base.join(f));
    // A director with its own certificate serves https.
    let scheme = if string(director, "tls_cert_file").is_some() {
        "https"
    } else {
        "http"
    };
    let url = match string(agent, "director") {
        Some(url) => Some(url),
        None => match string(director, "listen") {
            Some(listen) => Some(format!("{scheme}://{}", reachable(&listen)?)),
            // A director configured here listens on its default address.
            None => director.map(|_| format!("{scheme}://{DEFAULT_LISTEN}")),
        },
    };
    let token = match string(director, "admin_token_file") {
        Some(file) => Some(
            Secret::from_file(&base.join(file))
                .map_err(|e| format!("key `director.admin_token_file`: {e}"))?,
        ),
        None => string(director, "token")
            .map(|t| Secret::new(&t, "key `director.token`").map_err(|e| e.to_string()))
            .transpose()?,
    };
    Ok(FromFile { url, token, ca })
}

/// A listen address as a client reaches it: every interface becomes
/// loopback.
fn reachable(listen: &str) -> std::result::Result<String, String> {
    let addr: std::net::SocketAddr = listen
        .parse()
        .map_err(|e| format!("key `director.listen`: `{listen}` is not IP:PORT: {e}"))?;
    let ip = match addr.ip() {
        std::net::IpAddr::V4(ip) if ip.is_unspecified() => {
            std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST)
        }
        std::net::IpAddr::V6(ip) if ip.is_unspecified() => {
            std::net::IpAddr::V6(std::net::Ipv6Addr::LOCALHOST)
        }
        ip => ip,
    };
    Ok(std::net::SocketAddr::new(ip, addr.port()).to_string())
}

/// The Cluster.toml files to look at, in order, that exist: `--cluster`'s,
/// else `./Cluster.toml` and the one a running `tempest dev` wrote.
fn cluster_files(explicit: Option<&Path>) -> Result<Vec<PathBuf>> {
    if let Some(p) = explicit {
        if !p.is_file() {
            bail!("{}: no such file (given with --cluster)", p.display());
        }
        return Ok(vec![p.to_path_buf()]);
    }
    Ok([
        PathBuf::from("Cluster.toml"),
        PathBuf::from(crate::dev::STATE_DIR).join("Cluster.toml"),
    ]
    .into_iter()
    .filter(|p| p.is_file())
    .collect())
}

fn env(var: &'static str) -> Option<String> {
    std::env::var(var).ok().filter(|v| !v.is_empty())
}

/// Normalises a director URL: `HOST:PORT` gets `http://`, a trailing `/`
/// goes; `http://` and `https://` are supported.
pub fn normalise_url(url: &str) -> Result<String> {
    let url = url.trim();
    let url = if url.contains("://") {
        url.to_owned()
    } else {
        format!("http://{url}")
    };
    let Some((scheme, rest)) = url
        .strip_prefix("http://")
        .map(|r| ("http", r))
        .or_else(|| url.strip_prefix("https://").map(|r| ("https", r)))
    else {
        bail!("`{url}`: a director URL is http:// or https://");
    };
    let rest = rest.trim_end_matches('/');
    if rest.is_empty() {
        bail!("`{url}` has no host");
    }
    Ok(format!("{scheme}://{rest}"))
}

impl Target {
    /// The token the command line gives: `--token-file`'s, else `--token`.
    pub fn flag_token(args: &ConnArgs) -> Result<Option<Secret>> {
        Ok(match (&args.token_file, &args.token) {
            (Some(file), _) => {
                Some(Secret::from_file(file).map_err(|e| anyhow!("--token-file: {e}"))?)
            }
            (None, Some(t)) if !t.is_empty() => {
                Some(Secret::new(t, "--token").map_err(|e| anyhow!("{e}"))?)
            }
            _ => None,
        })
    }

    /// Resolves the director and token from the flags, the environment and
    /// the Cluster.toml files.
    pub fn resolve(args: &ConnArgs) -> Result<Target> {
        let mut url = args
            .director
            .clone()
            .map(|u| (u, Origin::Flag))
            .or_else(|| env("TEMPEST_DIRECTOR").map(|u| (u, Origin::Env("TEMPEST_DIRECTOR"))));
        let mut token = Target::flag_token(args)?.map(|t| (t, Origin::Flag));
        for var in [ADMIN_TOKEN_ENV, LEGACY_TOKEN_ENV] {
            if token.is_none() {
                token = Secret::from_env(var)
                    .map_err(|e| anyhow!("{e}"))?
                    .map(|t| (t, Origin::Env(var)));
            }
        }
        // A file's token goes only with that same file's URL: a token
        // belongs to its cluster, and must not reach a director named
        // elsewhere. No file is read once a flag or the environment named
        // the director; the `tempest dev` file comes after ./Cluster.toml.
        let files = cluster_files(args.cluster.as_deref())?;
        let mut ca = args
            .ca
            .clone()
            .or_else(|| env("TEMPEST_CA").map(PathBuf::from));
        if url.is_none() {
            for file in files {
                let from = read_cluster_toml(&file)?;
                if let Some(u) = from.url {
                    url = Some((u, Origin::File(file.clone())));
                    if token.is_none() {
                        token = from.token.map(|t| (t, Origin::File(file)));
                    }
                    if ca.is_none() {
                        ca = from.ca;
                    }
                    break;
                }
            }
        }
        let (url, url_origin) = url.unwrap_or_else(|| (DEFAULT_DIRECTOR.into(), Origin::Default));
        let url =
            normalise_url(&url).with_context(|| format!("the director's URL ({url_origin})"))?;
        let (token, token_origin) = match token {
            Some((t, o)) => (Some(t), Some(o)),
            None => (None, None),
        };
        Ok(Target {
            url,
            url_origin,
            token,
            token_origin,
            ca,
        })
    }
}

/// A client of one director.
pub struct Client {
    http: Http,
    target: Target,
}

/// How long a call may take, uploads aside.
const CALL_TIMEOUT: Duration = Duration::from_secs(30);

impl Client {
    /// A client of `target`.
    pub fn new(target: Target) -> Result<Client> {
        // An https director is checked against the cluster CA, and nothing
        // else: the system's authorities do not vouch for a cluster.
        let tls = match &target.ca {
            Some(ca) => tempest_control::tls::client_verifying(ca)
                .with_context(|| format!("the cluster CA {}", ca.display()))?,
            None => tempest_control::tls::client_trusting_nothing()?,
        };
        if target.url.starts_with("https://") && target.ca.is_none() {
            bail!(
                "the director {} is https: give the cluster CA's certificate with --ca, \
                 TEMPEST_CA or tls_ca_file in Cluster.toml",
                target.url
            );
        }
        let http = Http::builder()
            .use_preconfigured_tls(tls)
            .connect_timeout(Duration::from_secs(5))
            .timeout(None)
            .user_agent(concat!("tempest-cli/", env!("CARGO_PKG_VERSION")))
            .build()
            .context("creating the HTTP client")?;
        Ok(Client { http, target })
    }

    /// The director and token this client uses.
    pub fn target(&self) -> &Target {
        &self.target
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.target.url)
    }

    fn auth(&self, req: RequestBuilder) -> RequestBuilder {
        match &self.target.token {
            Some(t) => req.bearer_auth(t.expose()),
            None => req,
        }
    }

    /// `GET path`, as JSON.
    pub fn get(&self, path: &str) -> Result<Value> {
        self.call(self.auth(self.http.get(self.url(path)).timeout(CALL_TIMEOUT)))
    }

    /// `POST path` with a JSON body (or none), as JSON.
    pub fn post(&self, path: &str, body: Option<&Value>) -> Result<Value> {
        let mut req = self.http.post(self.url(path)).timeout(CALL_TIMEOUT);
        req = match body {
            Some(b) => req.json(b),
            None => req.header("content-length", "0"),
        };
        self.call(self.auth(req))
    }

    /// Uploads a package archive of `len` bytes read from `body`.
    pub fn upload(&self, body: impl Read + Send + 'static, len: u64) -> Result<Value> {
        let req = self
            .http
            .post(self.url("/api/v1/packages"))
            .header("content-type", "application/gzip")
            .body(Body::sized(body, len));
        self.call(self.auth(req))
    }

    /// Sends a request and turns every failure into one line.
    fn call(&self, req: RequestBuilder) -> Result<Value> {
        let resp = req.send().map_err(|e| self.transport_error(&e))?;
        let status = resp.status();
        let text = resp.text().map_err(|e| self.transport_error(&e))?;
        let json: Option<Value> = serde_json::from_str(&text).ok();
        if status.is_success() {
            return json.ok_or_else(|| {
                anyhow!(
                    "the director at {} answered {status} with something that is not JSON: {}",
                    self.target.url,
                    excerpt(&text)
                )
            });
        }
        let error = json
            .as_ref()
            .and_then(|v| v.get("error"))
            .and_then(Value::as_str)
            .map(str::to_owned);
        Err(ApiError {
            status,
            director: error.is_some(),
            message: error.unwrap_or_else(|| excerpt(&text)),
            target: self.target.clone(),
        }
        .into())
    }

    fn transport_error(&self, e: &reqwest::Error) -> anyhow::Error {
        let t = &self.target;
        if e.is_timeout() {
            return anyhow!(
                "the director at {} ({}) did not answer in time",
                t.url,
                t.url_origin
            );
        }
        let cause = root_cause(e);
        if e.is_connect() {
            return anyhow!(
                "cannot reach the director at {} ({}): {cause}",
                t.url,
                t.url_origin
            );
        }
        anyhow!("talking to the director at {}: {cause}", t.url)
    }
}

/// An error answer of the director.
#[derive(Debug)]
pub struct ApiError {
    /// The HTTP status.
    pub status: StatusCode,
    /// The director's `error` message (or the start of the body).
    pub message: String,
    /// Whether the answer was a director's error (`{"error": ...}`).
    pub director: bool,
    target: Target,
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let t = &self.target;
        if !self.director {
            return write!(
                f,
                "{} ({}) answered {} without a director's error: is it a Tempest director? {}",
                t.url, t.url_origin, self.status, self.message
            );
        }
        match self.status {
            StatusCode::UNAUTHORIZED => match &t.token_origin {
                None => write!(
                    f,
                    "the director at {} needs the admin token: set TEMPEST_ADMIN_TOKEN, pass \
                     --token-file FILE, or put `admin_token_file` in Cluster.toml",
                    t.url
                ),
                Some(origin) => write!(
                    f,
                    "the director at {} refused the token ({origin}): wrong token",
                    t.url
                ),
            },
            StatusCode::FORBIDDEN if t.token.is_some() => write!(
                f,
                "the director at {} refused this with the token given ({}): {}",
                t.url,
                t.token_origin
                    .as_ref()
                    .map_or_else(String::new, ToString::to_string),
                self.message
            ),
            StatusCode::TOO_MANY_REQUESTS => write!(
                f,
                "the director at {} refuses this address for now: {}",
                t.url, self.message
            ),
            _ => write!(f, "{} (director {}, {})", self.message, t.url, self.status),
        }
    }
}

impl std::error::Error for ApiError {}

/// Whether `e` is the director's answer with `status`.
pub fn is_status(e: &anyhow::Error, status: StatusCode) -> bool {
    e.downcast_ref::<ApiError>()
        .is_some_and(|a| a.director && a.status == status)
}

/// The innermost cause of an error, which is the one that says what
/// happened ("Connection refused (os error 111)").
fn root_cause(e: &(dyn std::error::Error + 'static)) -> String {
    let mut cur = e;
    while let Some(next) = cur.source() {
        cur = next;
    }
    cur.to_string()
}

/// The start of a body, on one line.
fn excerpt(text: &str) -> String {
    let one: String = text.split_whitespace().collect::<Vec<_>>().join(" ");
    if one.is_empty() {
        return "(an empty body)".into();
    }
    let mut s: String = one.chars().take(200).collect();
    if one.chars().count() > 200 {
        s.push('…');
    }
    s
}

/// A path segment, percent-encoded (topology names and process ids).
pub fn encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cluster_toml_gives_the_agents_director_url_first_and_the_admin_token() {
        let dir = tempfile::tempdir().unwrap();
        let base = dir.path();
        let parse = |text: &str| parse_cluster_toml(text, base);
        let token = |f: &FromFile| f.token.as_ref().map(|t| t.expose().to_owned());
        let f = parse(
            "[agent]\ndirector = \"http://10.0.0.1:7300\"\ntoken = \"a\"\n[director]\nlisten = \"0.0.0.0:7301\"\ntoken = \"d\"\n",
        )
        .unwrap();
        assert_eq!(f.url.as_deref(), Some("http://10.0.0.1:7300"));
        assert_eq!(token(&f).as_deref(), Some("d"));
        let f = parse("[director]\nlisten = \"0.0.0.0:7301\"\n").unwrap();
        assert_eq!(f.url.as_deref(), Some("http://127.0.0.1:7301"));
        let f = parse("[director]\nlisten = \"[::]:7301\"\n").unwrap();
        assert_eq!(f.url.as_deref(), Some("http://[::1]:7301"));
        // The agent's token is no admin's.
        let f = parse("[agent]\ntoken = \"a\"\n").unwrap();
        assert_eq!(f, FromFile::default());
        // A director without `listen` listens on its default address.
        let f = parse("[director]\ntoken = \"d\"\n").unwrap();
        assert_eq!(f.url.as_deref(), Some(DEFAULT_DIRECTOR));
        assert_eq!(token(&f).as_deref(), Some("d"));
        // The admin token file, relative to the Cluster.toml.
        std::fs::write(base.join("admin.token"), "from-the-file\n").unwrap();
        let f = parse("[director]\nadmin_token_file = \"admin.token\"\n").unwrap();
        assert_eq!(token(&f).as_deref(), Some("from-the-file"));
        assert!(parse("[director]\nadmin_token_file = \"none.token\"\n")
            .unwrap_err()
            .contains("admin_token_file"));
        assert!(parse("[director]\nlisten = \"nope\"\n")
            .unwrap_err()
            .contains("director.listen"));
        assert!(parse("[director\n").is_err());
    }

    #[test]
    fn urls_are_normalised() {
        assert_eq!(
            normalise_url("127.0.0.1:7300").unwrap(),
            "http://127.0.0.1:7300"
        );
        assert_eq!(normalise_url("http://h:1/").unwrap(), "http://h:1");
        assert_eq!(normalise_url("https://h:1/").unwrap(), "https://h:1");
        assert!(normalise_url("ftp://h:1").is_err());
        assert!(normalise_url("https://").is_err());
        assert!(normalise_url("http://").is_err());
    }

    #[test]
    fn path_segments_are_encoded() {
        assert_eq!(encode("count/0"), "count%2F0");
        assert_eq!(encode("word-count_1.2"), "word-count_1.2");
    }
}
