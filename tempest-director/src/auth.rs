//! Who may do what: the director's credentials, the web UI's sessions,
//! the `Host` check and the rate limit on failed authentication.
//!
//! Every request goes through [`Auth::gate`] before its handler:
//!
//! 1. its `Host`, when it has one, must be one the director answers to
//!    ([`Hosts`]): an IP address, `localhost`, or a configured name. A page
//!    on another site whose name was re-bound to the director's address
//!    (DNS rebinding) sends its own name, and is refused with 421;
//! 2. a change (not GET/HEAD/OPTIONS) must not come from another site's
//!    page (`Origin`, `Sec-Fetch-Site`), whatever it carries: 403;
//! 3. when the director has credentials, the request must carry one whose
//!    [`Role`] allows what it asks ([`Need`]): a Bearer token or the web
//!    UI's session cookie. None: 401. The wrong one: 403.
//!
//! A wrong Bearer token (or a wrong token typed at `/login`) counts against
//! the client's address ([`FailureLimiter`]): after
//! [`MAX_FAILURES`] within [`FAILURE_WINDOW`], every request of that address
//! that carries a token is answered 429 with `Retry-After`, until the
//! window lets it try again. A session id is not counted: it is a random
//! 256-bit value nobody can guess, and a browser keeps sending an expired
//! one.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use actix_web::dev::ServiceRequest;
use actix_web::http::{header, Method, StatusCode};
use actix_web::{HttpResponse, ResponseError};
use parking_lot::Mutex;
use serde::Serialize;
use tempest_control::credentials::{CredentialError, Secret};

use crate::error::Error;

/// How long a web UI session lasts after logging in.
pub const SESSION_TTL: Duration = Duration::from_secs(12 * 3600);
/// The most sessions kept; past it the oldest go first.
pub const MAX_SESSIONS: usize = 10_000;
pub use tempest_control::failures::{FailureLimiter, FAILURE_WINDOW, MAX_FAILURES, MAX_TRACKED};
/// The web UI's session cookie.
pub const SESSION_COOKIE: &str = "tempest_session";
/// How long a login link ([`Sessions::ticket`]) may wait to be opened.
pub const TICKET_TTL: Duration = Duration::from_secs(600);
/// The most login links waiting at once.
pub const MAX_TICKETS: usize = 1000;

/// What a credential lets its holder do.
#[derive(Copy, Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// Everything: people and the CLI.
    Admin,
    /// Reads: the API's GETs and the web UI's pages.
    Viewer,
    /// Heartbeats and package downloads: the agents.
    Agent,
}

impl Role {
    /// Whether this role may do what `need` asks.
    pub fn allows(self, need: Need) -> bool {
        match need {
            Need::Nothing => true,
            Need::Read => matches!(self, Role::Admin | Role::Viewer),
            Need::AgentOrAdmin => matches!(self, Role::Admin | Role::Agent),
            Need::Admin => self == Role::Admin,
        }
    }

    /// Its name, for messages.
    pub fn name(self) -> &'static str {
        match self {
            Role::Admin => "admin",
            Role::Viewer => "viewer",
            Role::Agent => "agent",
        }
    }
}

/// What a request needs.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum Need {
    /// Nothing: the health check, and logging in and out (the login form
    /// checks the token itself).
    Nothing,
    /// A reader: admin or viewer.
    Read,
    /// An agent or an admin: heartbeats and package archives.
    AgentOrAdmin,
    /// The admin: every change.
    Admin,
}

/// What a request to `method path` needs.
pub fn need(method: &Method, path: &str) -> Need {
    let reading = matches!(*method, Method::GET | Method::HEAD | Method::OPTIONS);
    if path == "/api/v1/health" && reading {
        return Need::Nothing;
    }
    if path == "/login" || path == "/logout" {
        return Need::Nothing;
    }
    if *method == Method::POST && path == "/api/v1/agents/heartbeat" {
        return Need::AgentOrAdmin;
    }
    if reading && is_archive(path) {
        return Need::AgentOrAdmin;
    }
    if reading {
        Need::Read
    } else {
        Need::Admin
    }
}

fn is_archive(path: &str) -> bool {
    path.strip_prefix("/api/v1/packages/")
        .and_then(|rest| rest.strip_suffix("/archive"))
        .is_some_and(|hash| !hash.contains('/'))
}

/// The director's credentials.
#[derive(Clone, Debug, Default)]
pub struct Credentials {
    /// The admin token.
    pub admin: Option<Secret>,
    /// The viewer token.
    pub viewer: Option<Secret>,
    /// The agent token.
    pub agent: Option<Secret>,
}

impl Credentials {
    /// Whether the director has any (then every call but the health check
    /// needs one).
    pub fn any(&self) -> bool {
        self.admin.is_some() || self.viewer.is_some() || self.agent.is_some()
    }

    /// The role of the token `given`, if it is one of them. Every token is
    /// compared, whichever matches.
    pub fn role_of(&self, given: &str) -> Option<Role> {
        let mut role = None;
        for (secret, r) in [
            (&self.agent, Role::Agent),
            (&self.viewer, Role::Viewer),
            (&self.admin, Role::Admin),
        ] {
            if secret.as_ref().is_some_and(|s| s.matches(given)) {
                role = Some(r);
            }
        }
        role
    }

    /// The token the director calls the agents' APIs with: the agent
    /// token, else (a cluster of the old single token, which the agents
    /// hold too) the admin token.
    pub fn for_agents(&self) -> Option<&Secret> {
        self.agent.as_ref().or(self.admin.as_ref())
    }
}

/// The host names the director answers to.
#[derive(Clone, Debug, Default)]
pub struct Hosts {
    names: Vec<String>,
}

impl Hosts {
    /// `localhost` and `names` (lower case, without ports). IP addresses
    /// are always accepted: a browser sends an address as `Host` only when
    /// it was asked for that address, so no name re-bound by another site
    /// can hide behind one.
    pub fn new(names: impl IntoIterator<Item = String>) -> Hosts {
        let mut all = vec!["localhost".to_owned()];
        all.extend(names.into_iter().map(|n| n.to_ascii_lowercase()));
        all.sort();
        all.dedup();
        Hosts { names: all }
    }

    /// Whether a `Host` header's value is one of them (its port aside).
    pub fn allows(&self, host: &str) -> bool {
        let host = host.trim();
        let name = match host.strip_prefix('[') {
            // [v6] or [v6]:port
            Some(rest) => match rest.split_once(']') {
                Some((v6, after)) if after.is_empty() || after.starts_with(':') => {
                    return v6.parse::<std::net::Ipv6Addr>().is_ok();
                }
                _ => return false,
            },
            None => host.rsplit_once(':').map_or(host, |(h, _)| h),
        };
        if name.parse::<std::net::Ipv4Addr>().is_ok() {
            return true;
        }
        let name = name.trim_end_matches('.').to_ascii_lowercase();
        self.names.contains(&name)
    }

    /// The names, for the refusal's message.
    pub fn names(&self) -> &[String] {
        &self.names
    }
}

/// The web UI's sessions: random ids, kept in memory with their role and
/// expiry. A restarted director forgets them (everyone logs in again).
#[derive(Debug, Default)]
pub struct Sessions {
    /// By the SHA-256 of the id (the ids themselves are not kept).
    map: Mutex<HashMap<String, Session>>,
    /// Login links waiting to be opened, by the SHA-256 of their ticket.
    tickets: Mutex<HashMap<String, (Role, Instant)>>,
}

#[derive(Clone, Copy, Debug)]
struct Session {
    role: Role,
    created: Instant,
    expires: Instant,
}

fn key(id: &str) -> String {
    tempest_control::package::sha256_hex(id.as_bytes())
}

impl Sessions {
    /// A new session of `role`: its id, for the cookie.
    pub fn create(&self, role: Role) -> Result<String, CredentialError> {
        let id = Secret::generate()?.expose().to_owned();
        let now = Instant::now();
        let mut map = self.map.lock();
        map.retain(|_, s| s.expires > now);
        if map.len() >= MAX_SESSIONS {
            if let Some(oldest) = map
                .iter()
                .min_by_key(|(_, s)| s.created)
                .map(|(k, _)| k.clone())
            {
                map.remove(&oldest);
            }
        }
        map.insert(
            key(&id),
            Session {
                role,
                created: now,
                expires: now + SESSION_TTL,
            },
        );
        Ok(id)
    }

    /// The role of the live session `id`.
    pub fn role(&self, id: &str) -> Option<Role> {
        let k = key(id);
        let mut map = self.map.lock();
        match map.get(&k) {
            Some(s) if s.expires > Instant::now() => Some(s.role),
            Some(_) => {
                map.remove(&k);
                None
            }
            None => None,
        }
    }

    /// A single-use login link's ticket for `role`, valid for
    /// [`TICKET_TTL`]: what `tempest dev` prints so that opening the
    /// dashboard needs no token pasted. Only the admin may ask for one.
    pub fn ticket(&self, role: Role) -> Result<String, CredentialError> {
        let t = Secret::generate()?.expose().to_owned();
        let now = Instant::now();
        let mut tickets = self.tickets.lock();
        tickets.retain(|_, (_, expires)| *expires > now);
        if tickets.len() >= MAX_TICKETS {
            if let Some(first) = tickets
                .iter()
                .min_by_key(|(_, (_, e))| *e)
                .map(|(k, _)| k.clone())
            {
                tickets.remove(&first);
            }
        }
        tickets.insert(key(&t), (role, now + TICKET_TTL));
        Ok(t)
    }

    /// Opens a login link: the role of the live `ticket`, which is used up.
    pub fn redeem(&self, ticket: &str) -> Option<Role> {
        let (role, expires) = self.tickets.lock().remove(&key(ticket))?;
        (expires > Instant::now()).then_some(role)
    }

    /// Ends the session `id`: its cookie is refused from now on.
    pub fn revoke(&self, id: &str) {
        self.map.lock().remove(&key(id));
    }

    /// Live sessions.
    pub fn len(&self) -> usize {
        let now = Instant::now();
        self.map.lock().values().filter(|s| s.expires > now).count()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Why a request was refused: the error, and how long to wait before
/// trying again (a 429's `Retry-After`).
#[derive(Debug)]
pub struct Refusal {
    /// The error answered.
    pub error: Error,
    /// Seconds until the address may try again.
    pub retry_after: Option<u64>,
}

impl Refusal {
    fn new(error: Error) -> Refusal {
        Refusal {
            error,
            retry_after: None,
        }
    }

    /// The 429 of an address that used up its failures.
    pub fn too_many(wait: Duration) -> Refusal {
        let secs = (wait.as_secs() + u64::from(wait.subsec_nanos() > 0)).max(1);
        Refusal {
            error: Error::TooManyRequests(format!(
                "too many failed attempts to authenticate from this address: try again in {secs} s"
            )),
            retry_after: Some(secs),
        }
    }

    /// The status answered.
    pub fn status(&self) -> StatusCode {
        self.error.status_code()
    }

    /// Adds the refusal's headers to `res`: `Retry-After` on a 429,
    /// `WWW-Authenticate` on a 401.
    pub fn headers(&self, res: &mut HttpResponse) {
        if let Some(v) = self
            .retry_after
            .and_then(|s| header::HeaderValue::from_str(&s.to_string()).ok())
        {
            res.headers_mut().insert(header::RETRY_AFTER, v);
        }
        if self.status() == StatusCode::UNAUTHORIZED {
            res.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                header::HeaderValue::from_static("Bearer realm=\"tempest\""),
            );
        }
    }

    /// The API's answer: `{"error": ...}` with the headers.
    pub fn response(&self) -> HttpResponse {
        let mut res = self.error.error_response();
        self.headers(&mut res);
        res
    }
}

/// The director's gatekeeper: credentials, sessions, names, failures.
#[derive(Debug, Default)]
pub struct Auth {
    /// The credentials.
    pub credentials: Credentials,
    /// The web UI's sessions.
    pub sessions: Sessions,
    /// The host names answered to.
    pub hosts: Hosts,
    /// Failed authentications per address.
    pub failures: FailureLimiter,
    /// Whether the director serves TLS (its cookies are then `Secure`).
    pub tls: bool,
}

/// Marks a TLS connection whose client showed a certificate of the
/// cluster CA (checked in the handshake): an agent's, under mutual TLS.
#[derive(Copy, Clone, Debug)]
pub struct ClusterPeer;

/// Who a request is, once let through.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum Caller {
    /// The director has no credentials: anyone may do anything.
    Open,
    /// A route that needs nothing, and no credential was looked at.
    Anonymous,
    /// A credential of this role.
    Role(Role),
}

impl Auth {
    /// An gatekeeper over these credentials and host names.
    pub fn new(credentials: Credentials, hosts: Hosts) -> Auth {
        Auth {
            credentials,
            hosts,
            ..Auth::default()
        }
    }

    /// Whether the request may go on, and as whom; else the refusal (see
    /// the module's documentation).
    pub fn gate(&self, req: &ServiceRequest) -> Result<Caller, Refusal> {
        let path = req.path();
        let method = req.method();
        if path != "/api/v1/health" {
            if req.headers().get_all(header::HOST).nth(1).is_some() {
                return Err(Refusal::new(Error::BadRequest(
                    "the request has more than one Host header".into(),
                )));
            }
            let host = req
                .headers()
                .get(header::HOST)
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned)
                .or_else(|| req.uri().authority().map(|a| a.to_string()));
            match host {
                Some(h) if self.hosts.allows(&h) => {}
                Some(h) => {
                    return Err(Refusal::new(Error::MisdirectedRequest(format!(
                        "this director does not answer to the host `{h}`: it answers to IP \
                         addresses and {} (add names with `hosts` in its [director] section)",
                        self.hosts.names().join(", ")
                    ))))
                }
                // No browser leaves Host out, so no rebound page can.
                None => {}
            }
        }
        let need = need(method, path);
        let mutating = !matches!(*method, Method::GET | Method::HEAD | Method::OPTIONS);
        if mutating && cross_site(req.headers()) {
            // A page of another site submitting a form to the director
            // through an operator's browser (with or without credentials).
            return Err(Refusal::new(Error::Forbidden(
                "a request from another site's page is refused: use the director's own pages"
                    .into(),
            )));
        }
        if !self.credentials.any() {
            return Ok(Caller::Open);
        }
        if need == Need::Nothing {
            return Ok(Caller::Anonymous);
        }
        let ip = req.peer_addr().map(|a| a.ip());
        let bearer = req
            .headers()
            .get(header::AUTHORIZATION)
            .map(|v| v.to_str().unwrap_or_default().to_owned());
        let role = if let Some(value) = bearer {
            if let Some(Err(wait)) = ip.map(|ip| self.failures.check(ip)) {
                return Err(Refusal::too_many(wait));
            }
            let given = value.strip_prefix("Bearer ").map(str::trim);
            match given.and_then(|g| self.credentials.role_of(g)) {
                Some(role) => role,
                None => {
                    if let Some(ip) = ip {
                        self.failures.fail(ip);
                    }
                    return Err(unauthorized(if given.is_some() {
                        "wrong token"
                    } else {
                        "the Authorization header must be `Bearer <token>`"
                    }));
                }
            }
        } else if let Some(role) = req
            .cookie(SESSION_COOKIE)
            .and_then(|c| self.sessions.role(c.value()))
        {
            role
        } else {
            return Err(unauthorized(
                "this call needs a credential: Authorization: Bearer <token> (the admin or \
                 viewer token), or log in to the web UI",
            ));
        };
        if self.tls && role == Role::Agent && req.conn_data::<ClusterPeer>().is_none() {
            // The agent token alone is not enough under TLS: an agent also
            // proves itself with the cluster's certificate.
            return Err(Refusal::new(Error::Forbidden(
                "the agent token is taken only from a client with a certificate of the \
                 cluster CA (mutual TLS): set the agent's tls_cert_file and tls_key_file"
                    .into(),
            )));
        }
        if !role.allows(need) {
            let what = match need {
                Need::Read => "reads need the admin or viewer token",
                Need::AgentOrAdmin => "this call is for agents (the agent token) and admins",
                _ => "changes need the admin token",
            };
            return Err(Refusal::new(Error::Forbidden(format!(
                "the {} token cannot do this: {what}",
                role.name()
            ))));
        }
        Ok(Caller::Role(role))
    }

    /// The role of a request's live session cookie.
    pub fn session_role(&self, req: &actix_web::HttpRequest) -> Option<Role> {
        req.cookie(SESSION_COOKIE)
            .and_then(|c| self.sessions.role(c.value()))
    }
}

fn unauthorized(message: &str) -> Refusal {
    Refusal::new(Error::Unauthorized(message.to_owned()))
}

/// Whether a browser says the request comes from another site's page:
/// `Sec-Fetch-Site: cross-site`, or an `Origin` whose host is not the one
/// the request was sent to. Programs (agents, the CLI) send neither.
fn cross_site(headers: &header::HeaderMap) -> bool {
    let text = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
    if text("sec-fetch-site") == Some("cross-site") {
        return true;
    }
    match (text("origin"), text("host")) {
        (Some("null"), _) => true,
        (Some(origin), Some(host)) => {
            let origin_host = origin.split_once("://").map_or(origin, |(_, rest)| rest);
            !origin_host.eq_ignore_ascii_case(host)
        }
        (Some(_), None) => true,
        (None, _) => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn what_each_route_needs_and_who_may() {
        let get = Method::GET;
        let post = Method::POST;
        assert_eq!(need(&get, "/api/v1/health"), Need::Nothing);
        assert_eq!(need(&post, "/api/v1/health"), Need::Admin);
        assert_eq!(need(&get, "/login"), Need::Nothing);
        assert_eq!(need(&post, "/logout"), Need::Nothing);
        assert_eq!(need(&get, "/"), Need::Read);
        assert_eq!(need(&get, "/api/v1/topologies/wc"), Need::Read);
        assert_eq!(
            need(
                &get,
                &format!("/api/v1/packages/{}/archive", "a".repeat(64))
            ),
            Need::AgentOrAdmin
        );
        assert_eq!(need(&post, "/api/v1/agents/heartbeat"), Need::AgentOrAdmin);
        assert_eq!(need(&post, "/api/v1/packages"), Need::Admin);
        assert_eq!(need(&post, "/packages/deploy"), Need::Admin);
        assert!(Role::Admin.allows(Need::AgentOrAdmin) && Role::Admin.allows(Need::Read));
        assert!(Role::Viewer.allows(Need::Read) && !Role::Viewer.allows(Need::Admin));
        assert!(!Role::Viewer.allows(Need::AgentOrAdmin));
        assert!(Role::Agent.allows(Need::AgentOrAdmin) && !Role::Agent.allows(Need::Read));
        assert!(!Role::Agent.allows(Need::Admin));
    }

    #[test]
    fn tokens_name_their_role() {
        let s = |v: &str| Some(Secret::new(v, "t").unwrap());
        let c = Credentials {
            admin: s("admin-token"),
            viewer: s("viewer-token"),
            agent: None,
        };
        assert_eq!(c.role_of("admin-token"), Some(Role::Admin));
        assert_eq!(c.role_of("viewer-token"), Some(Role::Viewer));
        assert_eq!(c.role_of("agent-token"), None);
        assert_eq!(c.role_of(""), None);
        assert_eq!(c.for_agents(), c.admin.as_ref());
    }

    #[test]
    fn hosts_are_names_or_addresses() {
        let h = Hosts::new(["Director.Example".to_owned()]);
        for ok in [
            "127.0.0.1:7300",
            "10.1.2.3",
            "[::1]:7300",
            "[fd00::7]",
            "localhost:7300",
            "director.example:80",
            "DIRECTOR.example.",
        ] {
            assert!(h.allows(ok), "{ok}");
        }
        for bad in [
            "attacker.example",
            "attacker.example:7300",
            "localhost.attacker.example",
            "[::1",
            "[not-v6]:1",
            "",
        ] {
            assert!(!h.allows(bad), "{bad}");
        }
    }

    #[test]
    fn sessions_expire_and_are_revoked() {
        let s = Sessions::default();
        let id = s.create(Role::Viewer).unwrap();
        assert_eq!(id.len(), 64);
        assert_eq!(s.role(&id), Some(Role::Viewer));
        assert_eq!(s.role("nope"), None);
        s.revoke(&id);
        assert_eq!(s.role(&id), None);
        assert!(s.is_empty());
        // An expired one is gone.
        let id = s.create(Role::Admin).unwrap();
        s.map.lock().values_mut().for_each(|v| {
            v.expires = Instant::now() - Duration::from_secs(1);
        });
        assert_eq!(s.role(&id), None);
    }
}
