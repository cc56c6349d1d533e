//! The web UI: HTML pages rendered on the server (askama templates in
//! `templates/`) from the same [`Director`] calls the REST API makes, and
//! HTML forms for the changes the API allows.
//!
//! - Every page reads fully without JavaScript; with it, a small inline
//!   script fetches the page again every 2 s and swaps the elements marked
//!   `data-live` (figures, tables, charts; never a form being edited).
//! - Forms post, then redirect to a page that shows what happened
//!   (Post/Redirect/Get, the message carried in a short-lived cookie). A
//!   refused form renders its page again with the error and a 4xx status.
//! - When the director has credentials, every page needs a login: `/login`
//!   takes the admin token (everything) or the viewer token (pages only)
//!   and starts a session: a random id kept by the director with its role
//!   and an expiry (12 h), in an `HttpOnly`, `SameSite=Strict` cookie
//!   (`Secure` when the director serves TLS). Logging out ends it, so the
//!   cookie is refused from then on. [`crate::auth::Auth::gate`] stays the
//!   only gate: what it refuses is answered here by [`or_page`] (the login
//!   page, or the form's page with the error).
//!
//! This module decides nothing about the cluster: it translates forms to
//! director calls and figures to HTML, as [`crate::api`] does to JSON.

pub(crate) mod fmt;
mod svg;

use std::collections::BTreeMap;

use actix_multipart::Multipart;
use actix_web::cookie::{time::Duration as CookieAge, Cookie, SameSite};
use actix_web::http::{header, StatusCode};
use actix_web::{web, HttpRequest, HttpResponse, ResponseError};
use askama::Template;
use futures_util::StreamExt;
use serde::Serialize;

use crate::api::AppState;
use crate::auth::{Refusal, Role, SESSION_COOKIE, SESSION_TTL};
use crate::director::{
    now_ms, ClusterSummary, DeployRequest, TopologyDetail, TopologySummary, SAMPLES_KEPT,
};
use crate::error::Error;
use crate::lifecycle::{Command, Lifecycle};
use crate::metrics::SourceFigures;

/// The cookie that carries the message of the last change to the next page.
const FLASH_COOKIE: &str = "tempest_flash";
/// The header the live-update script sends with its requests.
const LIVE_HEADER: &str = "x-tempest-live";
/// The policy of every page: only this origin's resources, inline style and
/// the inline script, no framing (so no click-jacking of the buttons).
const CSP: &str = "default-src 'self'; style-src 'self' 'unsafe-inline'; \
                   script-src 'self' 'unsafe-inline'; img-src 'self' data:; \
                   frame-ancestors 'none'; form-action 'self'; base-uri 'none'";
/// The most bytes of a form that is not an upload.
const FORM_LIMIT: usize = 256 * 1024;

type Data = web::Data<AppState>;

/// Registers the pages and forms on an app.
pub fn configure(cfg: &mut web::ServiceConfig) {
    cfg.service(web::resource("/").route(web::get().to(overview)))
        .service(web::resource("/agents").route(web::get().to(agents)))
        .service(web::resource("/topologies").route(web::get().to(topologies)))
        .service(web::resource("/topologies/{name}").route(web::get().to(topology)))
        .service(web::resource("/topologies/{name}/stop").route(web::post().to(stop)))
        .service(web::resource("/topologies/{name}/start").route(web::post().to(start)))
        .service(web::resource("/topologies/{name}/kill").route(web::post().to(kill)))
        .service(web::resource("/topologies/{name}/rebalance").route(web::post().to(rebalance)))
        .service(
            web::resource("/topologies/{name}/processes/{id:.+}/log")
                .route(web::get().to(process_log)),
        )
        .service(web::resource("/packages").route(web::get().to(packages)))
        .service(web::resource("/packages/upload").route(web::post().to(upload)))
        .service(web::resource("/packages/deploy").route(web::post().to(deploy)))
        .service(
            web::resource("/login")
                .route(web::get().to(login_page))
                .route(web::post().to(login)),
        )
        .service(web::resource("/logout").route(web::post().to(logout)));
}

// ---------------------------------------------------------------------------
// What every page has.

/// The frame of every page: title, navigation, messages, login state.
struct Chrome {
    title: String,
    nav: &'static str,
    flash: Option<String>,
    error: Option<String>,
    token_required: bool,
    logged_in: bool,
    /// `admin` or `viewer` once logged in.
    role: &'static str,
    /// Whether the forms that change things are shown (no credentials, or
    /// the admin logged in).
    can_change: bool,
    /// The page's own path, where logging in returns to.
    here: String,
    /// Whether the live-update script runs.
    live: bool,
}

impl Chrome {
    fn new(
        req: &HttpRequest,
        data: &AppState,
        title: impl Into<String>,
        nav: &'static str,
    ) -> Chrome {
        // The live script's requests leave the message to the page it is on.
        let flash = if req.headers().contains_key(LIVE_HEADER) {
            None
        } else {
            req.cookie(FLASH_COOKIE)
                .map(|c| c.value().to_owned())
                .filter(|m| !m.is_empty())
        };
        let token_required = data.auth.credentials.any();
        let role = data.auth.session_role(req);
        Chrome {
            title: title.into(),
            nav,
            flash,
            error: None,
            token_required,
            logged_in: role.is_some(),
            role: role.map_or("", Role::name),
            can_change: !token_required || role == Some(Role::Admin),
            here: req.path().to_owned(),
            live: false,
        }
    }

    fn at(mut self, here: impl Into<String>) -> Chrome {
        self.here = here.into();
        self
    }

    fn live(mut self) -> Chrome {
        self.live = true;
        self
    }

    fn error(mut self, e: Option<String>) -> Chrome {
        self.error = e;
        self
    }
}

trait Page: Template {
    fn chrome(&self) -> &Chrome;
}

macro_rules! pages {
    ($($t:ty),* $(,)?) => {
        $(impl Page for $t {
            fn chrome(&self) -> &Chrome {
                &self.chrome
            }
        })*
    };
}

pages!(
    OverviewPage,
    AgentsPage,
    TopologiesPage,
    TopologyPage,
    PackagesPage,
    LogPage,
    LoginPage,
    ErrorPage,
);

/// The HTML answer of a page, clearing the message it showed.
fn respond(status: StatusCode, page: &impl Page) -> HttpResponse {
    match page.render() {
        Ok(html) => {
            let mut b = HttpResponse::build(status);
            b.content_type("text/html; charset=utf-8")
                .insert_header((header::CACHE_CONTROL, "no-store"))
                .insert_header((header::X_FRAME_OPTIONS, "DENY"))
                .insert_header((header::X_CONTENT_TYPE_OPTIONS, "nosniff"))
                .insert_header((header::CONTENT_SECURITY_POLICY, CSP));
            if page.chrome().flash.is_some() {
                b.cookie(expired(FLASH_COOKIE));
            }
            b.body(html)
        }
        Err(e) => {
            tracing::error!("rendering the page {}: {e}", page.chrome().title);
            HttpResponse::InternalServerError()
                .content_type("text/plain; charset=utf-8")
                .body(format!("rendering the page failed: {e}"))
        }
    }
}

fn cookie(name: &'static str, value: String) -> Cookie<'static> {
    Cookie::build(name, value)
        .path("/")
        .http_only(true)
        .same_site(SameSite::Strict)
        .finish()
}

fn expired(name: &'static str) -> Cookie<'static> {
    let mut c = cookie(name, String::new());
    c.make_removal();
    c
}

/// Post/Redirect/Get: to `location`, with `message` for the page there.
fn see_other(location: &str, message: &str) -> HttpResponse {
    let mut flash = cookie(FLASH_COOKIE, message.to_owned());
    flash.set_max_age(CookieAge::seconds(60));
    HttpResponse::SeeOther()
        .insert_header((header::LOCATION, location.to_owned()))
        .cookie(flash)
        .finish()
}

fn state(req: &HttpRequest) -> Option<&Data> {
    req.app_data::<Data>()
}

fn name_of<T: Serialize>(v: &T) -> String {
    serde_json::to_value(v)
        .ok()
        .and_then(|v| v.as_str().map(str::to_owned))
        .unwrap_or_default()
}

// ---------------------------------------------------------------------------
// Errors.

#[derive(Template)]
#[template(path = "error.html")]
struct ErrorPage {
    chrome: Chrome,
    heading: String,
    back: String,
}

fn error_page(req: &HttpRequest, data: &AppState, e: &Error, back: &str) -> HttpResponse {
    let status = e.status_code();
    let heading = match status {
        StatusCode::NOT_FOUND => "Not found".to_owned(),
        s => format!("{} {}", s.as_u16(), s.canonical_reason().unwrap_or("Error")),
    };
    if let Error::Internal(m) = e {
        tracing::error!("internal error: {m}");
    }
    let page = ErrorPage {
        chrome: Chrome::new(req, data, heading.clone(), "").error(Some(e.to_string())),
        heading,
        back: back.to_owned(),
    };
    respond(status, &page)
}

/// The answer to a path no route takes: the API's JSON under `/api/`, a
/// page elsewhere.
pub async fn not_found(req: HttpRequest) -> HttpResponse {
    match state(&req) {
        Some(data) if !req.path().starts_with("/api/") => {
            let e = Error::NotFound(format!("there is no page {}", req.path()));
            error_page(&req, data, &e, "/")
        }
        _ => crate::api::not_found(req).await,
    }
}

/// What [`crate::auth::Auth::gate`] refused is answered with: the API's
/// JSON under `/api/`; elsewhere a page that shows nothing the caller may
/// not read. Without a credential: the login page (401), returning to the
/// page asked for, or to the page of the form. With one that cannot make
/// the change (a viewer): the form's page with the error (403). Anything
/// else (a wrong host, a cross-site form, too many failures): the error
/// alone.
pub fn or_page(req: &HttpRequest, refusal: &Refusal) -> HttpResponse {
    let path = req.path();
    let Some(data) = state(req).filter(|_| !path.starts_with("/api/")) else {
        return refusal.response();
    };
    let status = refusal.status();
    let reading = matches!(
        *req.method(),
        actix_web::http::Method::GET | actix_web::http::Method::HEAD
    );
    let form_page = if path.starts_with("/packages") {
        "/packages".to_owned()
    } else {
        match path
            .strip_prefix("/topologies/")
            .and_then(|rest| rest.split('/').next())
        {
            Some(name) if !name.is_empty() => format!("/topologies/{name}"),
            _ => "/".to_owned(),
        }
    };
    let mut res = match status {
        StatusCode::UNAUTHORIZED => {
            let next = if reading {
                match req.query_string() {
                    "" => path.to_owned(),
                    q => format!("{path}?{q}"),
                }
            } else {
                form_page
            };
            let message = if reading {
                "log in to see this page: the admin token (changes too) or the viewer token"
            } else {
                "this change needs the admin token: log in first"
            };
            respond(
                status,
                &login_view(req, data, safe_next(Some(&next)), Some(message.into())),
            )
        }
        StatusCode::FORBIDDEN if data.auth.session_role(req).is_some() => {
            let e = &refusal.error;
            if form_page == "/packages" {
                packages_page(req, data, Some(e), DeployForm::default())
            } else if let Some(name) = form_page
                .strip_prefix("/topologies/")
                .filter(|name| data.director.topology(name).is_ok())
            {
                topology_page(req, data, name, Some(e))
            } else {
                error_page(req, data, e, "/")
            }
        }
        _ => error_page(req, data, &refusal.error, "/"),
    };
    *res.status_mut() = status;
    refusal.headers(&mut res);
    res
}

// ---------------------------------------------------------------------------
// Overview, agents, topologies.

/// A topology in a table.
struct TopologyRow {
    name: String,
    package_name: String,
    state: &'static str,
    phase: String,
    uptime: String,
    running: usize,
    processes: usize,
    rate: String,
    acked: u64,
    failed: u64,
    in_flight: u64,
    p99: String,
    generation: u64,
}

impl TopologyRow {
    fn new(t: &TopologySummary) -> TopologyRow {
        TopologyRow {
            name: t.name.clone(),
            package_name: t.package_name.clone(),
            state: t.state.as_db(),
            phase: name_of(&t.phase),
            uptime: if t.uptime_secs > 0 {
                fmt::secs(t.uptime_secs)
            } else {
                "–".into()
            },
            running: t.running,
            processes: t.processes,
            rate: fmt::rate(t.msgs_per_sec),
            acked: t.acked,
            failed: t.failed,
            in_flight: t.in_flight,
            p99: fmt::ms(t.p99_ms),
            generation: t.generation,
        }
    }
}

#[derive(Template)]
#[template(path = "overview.html")]
struct OverviewPage {
    chrome: Chrome,
    cluster: ClusterSummary,
    rate: String,
    topologies: Vec<TopologyRow>,
}

/// Every topology's row, for the overview and the topologies page.
fn topology_rows(data: &AppState) -> Vec<TopologyRow> {
    data.director
        .topologies()
        .iter()
        .map(TopologyRow::new)
        .collect()
}

async fn overview(data: Data, req: HttpRequest) -> HttpResponse {
    let cluster = data.director.cluster();
    let page = OverviewPage {
        chrome: Chrome::new(&req, &data, "Overview", "overview").live(),
        rate: fmt::rate(cluster.msgs_per_sec),
        cluster,
        topologies: topology_rows(&data),
    };
    respond(StatusCode::OK, &page)
}

#[derive(Template)]
#[template(path = "topologies.html")]
struct TopologiesPage {
    chrome: Chrome,
    topologies: Vec<TopologyRow>,
}

async fn topologies(data: Data, req: HttpRequest) -> HttpResponse {
    let page = TopologiesPage {
        chrome: Chrome::new(&req, &data, "Topologies", "topologies").live(),
        topologies: topology_rows(&data),
    };
    respond(StatusCode::OK, &page)
}

struct AgentRow {
    id: String,
    address: String,
    up: bool,
    hostname: String,
    version: String,
    cores: u32,
    load: String,
    memory: String,
    disk_free: String,
    running: usize,
    reported: usize,
    placed: usize,
    processes: Vec<(String, String)>,
    last_heartbeat: String,
    last_heartbeat_ms: u64,
}

#[derive(Template)]
#[template(path = "agents.html")]
struct AgentsPage {
    chrome: Chrome,
    agents: Vec<AgentRow>,
}

async fn agents(data: Data, req: HttpRequest) -> HttpResponse {
    let now = now_ms();
    let agents = data
        .director
        .agents()
        .into_iter()
        .map(|a| {
            let n = &a.node;
            let used = n.memory_total.saturating_sub(n.memory_available);
            AgentRow {
                memory: if n.memory_total > 0 {
                    format!(
                        "{} of {} ({})",
                        fmt::bytes(used),
                        fmt::bytes(n.memory_total),
                        fmt::percent(used as f64 / n.memory_total as f64)
                    )
                } else {
                    "–".into()
                },
                load: format!("{:.2} / {:.2} / {:.2}", n.load[0], n.load[1], n.load[2]),
                disk_free: fmt::bytes(n.disk_free),
                hostname: n.hostname.clone(),
                version: n.agent_version.clone(),
                cores: n.cores,
                running: a
                    .processes
                    .iter()
                    .filter(|p| p.state == tempest_control::ProcessState::Running)
                    .count(),
                reported: a.processes.len(),
                placed: a.placed,
                processes: a
                    .processes
                    .iter()
                    .map(|p| (p.id.clone(), name_of(&p.state)))
                    .collect(),
                last_heartbeat: fmt::ago(a.last_heartbeat_ms, now),
                last_heartbeat_ms: a.last_heartbeat_ms,
                id: a.id,
                address: a.address,
                up: a.up,
            }
        })
        .collect();
    let page = AgentsPage {
        chrome: Chrome::new(&req, &data, "Agents", "agents").live(),
        agents,
    };
    respond(StatusCode::OK, &page)
}

// ---------------------------------------------------------------------------
// One topology.

struct TaskRow {
    name: String,
    workers: u32,
    messages_in: u64,
    rate: String,
    errors: u64,
    p99: String,
    capacity: String,
}

struct SourceRow {
    name: String,
    /// `healthy`, `unhealthy` or `unknown` (also its badge's class).
    health: &'static str,
    polled: u64,
    acked: u64,
    failed: u64,
    errors: u64,
    in_flight: u64,
    rate: String,
    /// The tasks it feeds, comma-separated (`–` when its server does not
    /// say: it feeds the roots).
    feeds: String,
}

struct ProcessRow {
    id: String,
    state: String,
    error: Option<String>,
    agent: String,
    agent_up: bool,
    pid: String,
    restarts: u32,
    uptime: String,
    generation: u64,
    log: String,
}

#[derive(Template)]
#[template(path = "topology.html")]
struct TopologyPage {
    chrome: Chrome,
    t: TopologyRow,
    package: String,
    package_short: String,
    deployed: String,
    p50: String,
    running: bool,
    dag: String,
    tasks: Vec<TaskRow>,
    source: SourceFigures,
    source_healthy: &'static str,
    /// Whether to show the sources one by one: several, or one named.
    per_source: bool,
    sources: Vec<SourceRow>,
    throughput_chart: String,
    latency_chart: String,
    processes: Vec<ProcessRow>,
    recent_errors: Vec<crate::director::RecentError>,
    config: String,
    env: Vec<(String, String)>,
    effective_config: String,
}

fn short_hash(h: &str) -> String {
    h.chars().take(12).collect()
}

fn topology_view(
    req: &HttpRequest,
    data: &AppState,
    d: TopologyDetail,
    error: Option<&Error>,
) -> Result<TopologyPage, Error> {
    let name = d.summary.name.clone();
    let samples = data.director.samples(&name)?;
    let now = now_ms();
    let window = SAMPLES_KEPT.as_millis() as u64;
    let throughput_chart = svg::chart(
        "throughput-chart",
        "roots acked per second",
        "acked/s",
        now,
        window,
        &[svg::Series {
            name: "acked/s",
            class: "acked",
            points: samples.iter().map(|p| (p.ts, Some(p.rate))).collect(),
        }],
    );
    let latency_chart = svg::chart(
        "latency-chart",
        "root complete latency",
        "ms",
        now,
        window,
        &[
            svg::Series {
                name: "p50",
                class: "p50",
                points: samples.iter().map(|p| (p.ts, p.p50_ms)).collect(),
            },
            svg::Series {
                name: "p99",
                class: "p99",
                points: samples.iter().map(|p| (p.ts, p.p99_ms)).collect(),
            },
        ],
    );
    let dag_tasks: Vec<svg::DagTask<'_>> = d
        .tasks
        .iter()
        .map(|(task, f)| svg::DagTask {
            name: task,
            rate: f.msgs_per_sec,
            workers: f.workers,
        })
        .collect();
    let dag_edges: Vec<svg::DagEdge<'_>> = d
        .edges
        .iter()
        .map(|e| svg::DagEdge {
            from: &e.from,
            to: &e.to,
            grouping: &e.grouping,
        })
        .collect();
    let dag_sources: Vec<svg::DagSource<'_>> = d
        .sources
        .iter()
        .map(|(name, f)| svg::DagSource {
            name,
            rate: f.msgs_per_sec,
            healthy: f.healthy,
        })
        .collect();
    let dag_source_edges: Vec<svg::DagSourceEdge<'_>> = d
        .source_edges
        .iter()
        .map(|e| svg::DagSourceEdge {
            source: &e.source,
            to: &e.to,
        })
        .collect();
    let dag = svg::dag(&dag_sources, &dag_tasks, &dag_edges, &dag_source_edges);
    let sources = d
        .sources
        .iter()
        .map(|(name, f)| {
            let feeds: Vec<&str> = d
                .source_edges
                .iter()
                .filter(|e| &e.source == name)
                .map(|e| e.to.as_str())
                .collect();
            SourceRow {
                name: name.clone(),
                health: match f.healthy {
                    Some(true) => "healthy",
                    Some(false) => "unhealthy",
                    None => "unknown",
                },
                polled: f.polled,
                acked: f.acked,
                failed: f.failed,
                errors: f.errors,
                in_flight: f.in_flight,
                rate: fmt::rate(f.msgs_per_sec),
                feeds: if feeds.is_empty() {
                    "–".into()
                } else {
                    feeds.join(", ")
                },
            }
        })
        .collect();
    let tasks = d
        .tasks
        .iter()
        .map(|(task, f)| TaskRow {
            name: task.clone(),
            workers: f.workers,
            messages_in: f.messages_in,
            rate: fmt::rate(f.msgs_per_sec),
            errors: f.errors,
            p99: fmt::ms(f.handle_p99_ms),
            capacity: fmt::percent(f.capacity),
        })
        .collect();
    let prefix = format!("{name}/");
    let processes = d
        .placement
        .iter()
        .map(|p| {
            let short = p.id.strip_prefix(&prefix).unwrap_or(&p.id);
            ProcessRow {
                id: p.id.clone(),
                state: p.state.clone(),
                error: p.error.clone(),
                agent: p.agent.clone(),
                agent_up: p.agent_up,
                pid: p.pid.map_or_else(|| "–".into(), |pid| pid.to_string()),
                restarts: p.restarts,
                uptime: if p.uptime_secs > 0 {
                    fmt::secs(p.uptime_secs)
                } else {
                    "–".into()
                },
                generation: p.generation,
                log: format!(
                    "/topologies/{}/processes/{}/log",
                    crate::agents::encode(&name),
                    crate::agents::encode(short)
                ),
            }
        })
        .collect();
    Ok(TopologyPage {
        chrome: Chrome::new(req, data, format!("Topology {name}"), "topologies")
            .at(format!("/topologies/{name}"))
            .live()
            .error(error.map(ToString::to_string)),
        package_short: short_hash(&d.summary.package),
        package: d.summary.package.clone(),
        deployed: fmt::ago(d.summary.created_at_ms, now),
        p50: fmt::ms(d.summary.p50_ms),
        running: d.summary.state == Lifecycle::Running,
        t: TopologyRow::new(&d.summary),
        dag,
        tasks,
        source_healthy: match d.source.healthy {
            Some(true) => "yes",
            Some(false) => "no",
            None => "–",
        },
        source: d.source,
        per_source: d.sources.len() > 1
            || d.sources
                .keys()
                .any(|k| k != crate::metrics::DEFAULT_SOURCE),
        sources,
        throughput_chart,
        latency_chart,
        processes,
        recent_errors: d.recent_errors,
        config: d.config,
        env: d.env.into_iter().collect(),
        effective_config: d.effective_config,
    })
}

/// The topology page, with `error` shown; the error page when it is gone.
fn topology_page(
    req: &HttpRequest,
    data: &AppState,
    name: &str,
    error: Option<&Error>,
) -> HttpResponse {
    let view = data
        .director
        .topology(name)
        .and_then(|d| topology_view(req, data, d, error));
    match view {
        Ok(page) => respond(
            error.map_or(StatusCode::OK, ResponseError::status_code),
            &page,
        ),
        Err(e) => error_page(req, data, &e, "/topologies"),
    }
}

async fn topology(data: Data, req: HttpRequest, name: web::Path<String>) -> HttpResponse {
    topology_page(&req, &data, &name, None)
}

/// Applies a command from a topology page's buttons.
fn command(req: &HttpRequest, data: &AppState, name: &str, command: Command) -> HttpResponse {
    let what = match &command {
        Command::Start => "started",
        Command::Stop => "stopped",
        Command::Kill => "killed",
        Command::Rebalance(_) => "rebalanced",
    };
    match data.director.command(name, command) {
        Ok(Some(_)) => see_other(&format!("/topologies/{name}"), &format!("{name}: {what}")),
        Ok(None) => see_other("/topologies", &format!("{name}: {what}")),
        Err(e) => topology_page(req, data, name, Some(&e)),
    }
}

async fn stop(data: Data, req: HttpRequest, name: web::Path<String>) -> HttpResponse {
    command(&req, &data, &name, Command::Stop)
}

async fn start(data: Data, req: HttpRequest, name: web::Path<String>) -> HttpResponse {
    command(&req, &data, &name, Command::Start)
}

async fn kill(data: Data, req: HttpRequest, name: web::Path<String>) -> HttpResponse {
    command(&req, &data, &name, Command::Kill)
}

/// Reads an `application/x-www-form-urlencoded` body as pairs, within
/// [`FORM_LIMIT`]; what goes wrong is an error for the page.
async fn read_form(mut body: web::Payload) -> Result<Vec<(String, String)>, Error> {
    let mut bytes = Vec::new();
    while let Some(chunk) = body.next().await {
        let chunk = chunk.map_err(|e| Error::BadRequest(format!("reading the form: {e}")))?;
        if bytes.len() + chunk.len() > FORM_LIMIT {
            return Err(Error::TooLarge(format!(
                "the form is larger than {}",
                fmt::bytes(FORM_LIMIT as u64)
            )));
        }
        bytes.extend_from_slice(&chunk);
    }
    serde_urlencoded::from_bytes(&bytes)
        .map_err(|e| Error::BadRequest(format!("unreadable form: {e}")))
}

/// The rebalance form: `workers:TASK = N` for every task; only the counts
/// that change are sent on, so the tasks left alone keep running.
fn rebalance_request(
    pairs: &[(String, String)],
    current: &BTreeMap<String, u32>,
) -> Result<BTreeMap<String, u32>, Error> {
    let mut changes = BTreeMap::new();
    for (k, v) in pairs {
        let Some(task) = k.strip_prefix("workers:") else {
            continue;
        };
        let n: u32 = v.trim().parse().map_err(|_| {
            Error::BadRequest(format!(
                "task `{task}`: the worker count must be a whole number, not `{v}`"
            ))
        })?;
        if current.get(task) != Some(&n) {
            changes.insert(task.to_owned(), n);
        }
    }
    if changes.is_empty() {
        return Err(Error::BadRequest(
            "nothing to rebalance: change a worker count first".into(),
        ));
    }
    Ok(changes)
}

async fn rebalance(
    data: Data,
    req: HttpRequest,
    name: web::Path<String>,
    body: web::Payload,
) -> HttpResponse {
    let current = match data.director.topology(&name) {
        Ok(d) => d.summary.workers,
        Err(e) => return error_page(&req, &data, &e, "/topologies"),
    };
    match read_form(body)
        .await
        .and_then(|pairs| rebalance_request(&pairs, &current))
    {
        Ok(changes) => command(&req, &data, &name, Command::Rebalance(changes)),
        Err(e) => topology_page(&req, &data, &name, Some(&e)),
    }
}

// ---------------------------------------------------------------------------
// Logs.

#[derive(Template)]
#[template(path = "log.html")]
struct LogPage {
    chrome: Chrome,
    topology: String,
    process: String,
    stream: String,
    lines: u64,
    text: Option<String>,
}

async fn process_log(
    data: Data,
    req: HttpRequest,
    path: web::Path<(String, String)>,
) -> HttpResponse {
    let (name, id) = path.into_inner();
    let query = web::Query::<crate::api::LogQuery>::from_query(req.query_string());
    let (stream, lines) = match &query {
        Ok(q) => (
            q.stream.clone().unwrap_or_else(|| "stdout".into()),
            q.lines.unwrap_or(200).clamp(1, 10_000),
        ),
        Err(_) => ("stdout".into(), 200),
    };
    let answer = match query {
        Err(e) => Err(Error::BadRequest(format!("bad query (stream, lines): {e}"))),
        Ok(_) => crate::api::fetch_log(&data, &name, &id, &stream, Some(lines)).await,
    };
    let (status, text, error) = match answer {
        Ok((status, body)) => {
            let v: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
            if status.is_success() {
                let text = v["text"].as_str().unwrap_or_default().to_owned();
                (status, Some(text), None)
            } else {
                let why = v["error"]
                    .as_str()
                    .unwrap_or("the agent refused")
                    .to_owned();
                (status, None, Some(why))
            }
        }
        Err(e) => (e.status_code(), None, Some(e.to_string())),
    };
    let page = LogPage {
        chrome: Chrome::new(&req, &data, format!("Log of {name}/{id}"), "topologies").error(error),
        process: format!("{name}/{id}"),
        topology: name,
        stream,
        lines,
        text,
    };
    respond(status, &page)
}

// ---------------------------------------------------------------------------
// Packages: list, upload, deploy.

struct PackageRow {
    hash: String,
    short: String,
    name: String,
    version: String,
    size: String,
    target: String,
    tempest_version: String,
    uploaded: String,
    topology_toml: Option<String>,
}

/// What the deploy form holds, shown again when it is refused.
#[derive(Default)]
struct DeployForm {
    name: String,
    package: String,
    config: String,
    workers: String,
    env: String,
}

#[derive(Template)]
#[template(path = "packages.html")]
struct PackagesPage {
    chrome: Chrome,
    packages: Vec<PackageRow>,
    max_upload: String,
    form: DeployForm,
}

fn packages_page(
    req: &HttpRequest,
    data: &AppState,
    error: Option<&Error>,
    mut form: DeployForm,
) -> HttpResponse {
    let now = now_ms();
    let mut list = data.director.packages();
    // Newest first: the one just uploaded is the one to deploy.
    list.sort_by(|a, b| {
        b.uploaded_at_ms
            .cmp(&a.uploaded_at_ms)
            .then(a.hash.cmp(&b.hash))
    });
    if form.package.is_empty() {
        let asked = web::Query::<BTreeMap<String, String>>::from_query(req.query_string())
            .ok()
            .and_then(|q| q.get("package").cloned());
        form.package = asked
            .or_else(|| list.first().map(|p| p.hash.clone()))
            .unwrap_or_default();
    }
    let packages = list
        .into_iter()
        .map(|p| PackageRow {
            short: short_hash(&p.hash),
            hash: p.hash,
            name: p.manifest.name,
            version: p.manifest.version,
            size: fmt::bytes(p.size),
            target: p.manifest.target,
            tempest_version: p.manifest.tempest_version,
            uploaded: fmt::ago(p.uploaded_at_ms, now),
            topology_toml: p.topology_toml,
        })
        .collect();
    let page = PackagesPage {
        chrome: Chrome::new(req, data, "Packages", "packages")
            .at("/packages")
            .error(error.map(ToString::to_string)),
        packages,
        max_upload: fmt::bytes(data.director.settings().max_upload),
        form,
    };
    respond(
        error.map_or(StatusCode::OK, ResponseError::status_code),
        &page,
    )
}

async fn packages(data: Data, req: HttpRequest) -> HttpResponse {
    packages_page(&req, &data, None, DeployForm::default())
}

/// Reads the `package` file of an upload form, within the upload limit.
async fn read_upload(req: &HttpRequest, mut form: Multipart, max: u64) -> Result<Vec<u8>, Error> {
    let mut budget = crate::api::UploadBudget::start(req, max)?;
    let bad =
        |e: actix_multipart::MultipartError| Error::BadRequest(format!("reading the upload: {e}"));
    let mut file: Option<(String, Vec<u8>)> = None;
    while let Some(field) = form.next().await {
        let mut field = field.map_err(bad)?;
        let is_package = field.name() == Some("package");
        let filename = field
            .content_disposition()
            .and_then(|c| c.get_filename())
            .unwrap_or_default()
            .to_owned();
        let mut bytes = Vec::new();
        while let Some(chunk) = field.next().await {
            let chunk = chunk.map_err(bad)?;
            if budget.take(chunk.len())? && is_package {
                bytes.extend_from_slice(&chunk);
            }
        }
        if is_package {
            file = Some((filename, bytes));
        }
    }
    budget.finish()?;
    match file {
        Some((_, bytes)) if !bytes.is_empty() => Ok(bytes),
        Some((name, _)) if !name.is_empty() => {
            Err(Error::BadRequest(format!("the file {name} is empty")))
        }
        _ => Err(Error::BadRequest("choose a package file to upload".into())),
    }
}

async fn upload(data: Data, req: HttpRequest, form: Multipart) -> HttpResponse {
    let max = data.director.settings().max_upload;
    let stored = match read_upload(&req, form, max).await {
        Ok(bytes) => {
            let director = data.director.clone();
            web::block(move || director.upload(&bytes))
                .await
                .map_err(Error::internal)
                .and_then(|r| r)
        }
        Err(e) => Err(e),
    };
    match stored {
        Ok((new, p)) => {
            let what = if new { "stored" } else { "already stored" };
            let message = format!(
                "package {} {} {what} ({})",
                p.manifest.name,
                p.manifest.version,
                short_hash(&p.hash)
            );
            see_other(&format!("/packages?package={}", p.hash), &message)
        }
        Err(e) => packages_page(&req, &data, Some(&e), DeployForm::default()),
    }
}

/// `split=2, count=4` as worker counts: items between commas, semicolons
/// or line breaks (or spaces, when no space stands around the `=`).
fn parse_workers(text: &str) -> Result<BTreeMap<String, u32>, Error> {
    let mut out = BTreeMap::new();
    let items = text.split([',', ';', '\n']).flat_map(|piece| {
        let piece = piece.trim();
        if piece.matches('=').count() > 1 {
            piece.split_whitespace().collect::<Vec<_>>()
        } else {
            vec![piece]
        }
    });
    for item in items.filter(|s| !s.is_empty()) {
        let parsed = item
            .split_once('=')
            .map(|(t, n)| (t.trim(), n.trim().parse::<u32>()));
        match parsed {
            Some((task, Ok(n))) if !task.is_empty() && !task.contains(char::is_whitespace) => {
                out.insert(task.to_owned(), n);
            }
            _ => {
                return Err(Error::BadRequest(format!(
                    "workers: `{item}` is not TASK=COUNT (e.g. split=2, count=4)"
                )))
            }
        }
    }
    Ok(out)
}

/// `NAME=value` lines as environment variables; blank lines are skipped.
fn parse_env(text: &str) -> Result<BTreeMap<String, String>, Error> {
    let mut out = BTreeMap::new();
    for line in text.lines().map(|l| l.trim_end_matches('\r')) {
        if line.trim().is_empty() {
            continue;
        }
        let Some((name, value)) = line.split_once('=') else {
            return Err(Error::BadRequest(format!(
                "environment: `{line}` is not NAME=value"
            )));
        };
        out.insert(name.trim().to_owned(), value.to_owned());
    }
    Ok(out)
}

fn deploy_request(form: &DeployForm) -> Result<DeployRequest, Error> {
    if form.name.trim().is_empty() {
        return Err(Error::BadRequest("give the topology a name".into()));
    }
    if form.package.is_empty() {
        return Err(Error::BadRequest(
            "choose a package (upload one first)".into(),
        ));
    }
    Ok(DeployRequest {
        name: form.name.trim().to_owned(),
        package: form.package.clone(),
        config: Some(form.config.replace("\r\n", "\n")).filter(|c| !c.trim().is_empty()),
        workers: parse_workers(&form.workers)?,
        env: parse_env(&form.env)?,
    })
}

async fn deploy(data: Data, req: HttpRequest, body: web::Payload) -> HttpResponse {
    let mut form = DeployForm::default();
    let result = read_form(body).await.and_then(|pairs| {
        for (k, v) in pairs {
            match k.as_str() {
                "name" => form.name = v,
                "package" => form.package = v,
                "config" => form.config = v,
                "workers" => form.workers = v,
                "env" => form.env = v,
                _ => {}
            }
        }
        let request = deploy_request(&form)?;
        data.director.deploy(request)
    });
    match result {
        Ok(d) => {
            let name = &d.summary.name;
            see_other(&format!("/topologies/{name}"), &format!("deployed {name}"))
        }
        Err(e) => packages_page(&req, &data, Some(&e), form),
    }
}

// ---------------------------------------------------------------------------
// Logging in and out.

#[derive(Template)]
#[template(path = "login.html")]
struct LoginPage {
    chrome: Chrome,
    next: String,
    token_required: bool,
}

/// Where to go after logging in: a path of this site, else the overview.
/// Only path characters pass: browsers drop tabs and newlines from a
/// `Location`, so `/\t/evil.example` would become `//evil.example`.
fn safe_next(next: Option<&str>) -> String {
    let path_char = |c: char| c.is_ascii_alphanumeric() || "/-._~%?=&+,;:@!$'()*".contains(c);
    match next {
        Some(n) if n.starts_with('/') && !n.starts_with("//") && n.chars().all(path_char) => {
            n.to_owned()
        }
        _ => "/".into(),
    }
}

fn login_view(
    req: &HttpRequest,
    data: &AppState,
    next: String,
    error: Option<String>,
) -> LoginPage {
    LoginPage {
        chrome: Chrome::new(req, data, "Log in", "")
            .at(next.clone())
            .error(error),
        token_required: data.auth.credentials.any(),
        next,
    }
}

async fn login_page(data: Data, req: HttpRequest) -> HttpResponse {
    let query = web::Query::<BTreeMap<String, String>>::from_query(req.query_string())
        .map(|q| q.into_inner())
        .unwrap_or_default();
    let next = safe_next(query.get("next").map(String::as_str));
    match query.get("ticket") {
        Some(ticket) => login_with_ticket(&data, &req, ticket, next),
        None => respond(StatusCode::OK, &login_view(&req, &data, next, None)),
    }
}

/// Opens a single-use login link (`/login?ticket=…`, from `tempest dev`):
/// a session of the ticket's role, the ticket used up.
fn login_with_ticket(data: &Data, req: &HttpRequest, ticket: &str, next: String) -> HttpResponse {
    let ip = req.peer_addr().map(|a| a.ip());
    if let Some(Err(wait)) = ip.map(|ip| data.auth.failures.check(ip)) {
        let refusal = Refusal::too_many(wait);
        let page = login_view(req, data, next, Some(refusal.error.to_string()));
        let mut res = respond(refusal.status(), &page);
        refusal.headers(&mut res);
        return res;
    }
    let Some(role) = data.auth.sessions.redeem(ticket) else {
        if let Some(ip) = ip {
            data.auth.failures.fail(ip);
        }
        let page = login_view(
            req,
            data,
            next,
            Some("that login link was used already or has expired: log in with a token".into()),
        );
        return respond(StatusCode::UNAUTHORIZED, &page);
    };
    start_session(data, req, role, &next)
}

/// A new session of `role` for this browser (ending the one it had), and
/// a redirect to `next` with its cookie.
fn start_session(data: &Data, req: &HttpRequest, role: Role, next: &str) -> HttpResponse {
    if let Some(old) = req.cookie(SESSION_COOKIE) {
        data.auth.sessions.revoke(old.value());
    }
    let id = match data.auth.sessions.create(role) {
        Ok(id) => id,
        Err(e) => return error_page(req, data, &Error::internal(e), "/"),
    };
    let mut res = see_other(next, &format!("logged in ({})", role.name()));
    if let Err(e) = res.add_cookie(&session_cookie(id, data.auth.tls)) {
        return error_page(req, data, &Error::internal(e), "/");
    }
    res
}

/// The session cookie: `HttpOnly`, `SameSite=Strict`, `Secure` under TLS,
/// for as long as the session lasts.
fn session_cookie(id: String, secure: bool) -> Cookie<'static> {
    let mut c = cookie(SESSION_COOKIE, id);
    c.set_secure(secure);
    c.set_max_age(CookieAge::seconds(SESSION_TTL.as_secs() as i64));
    c
}

async fn login(data: Data, req: HttpRequest, body: web::Payload) -> HttpResponse {
    let pairs = read_form(body).await.unwrap_or_default();
    let field = |k: &str| pairs.iter().find(|(n, _)| n == k).map(|(_, v)| v.as_str());
    let next = safe_next(field("next"));
    if !data.auth.credentials.any() {
        return see_other(&next, "this director needs no token");
    }
    let ip = req.peer_addr().map(|a| a.ip());
    if let Some(Err(wait)) = ip.map(|ip| data.auth.failures.check(ip)) {
        let refusal = Refusal::too_many(wait);
        let page = login_view(&req, &data, next, Some(refusal.error.to_string()));
        let mut res = respond(refusal.status(), &page);
        refusal.headers(&mut res);
        return res;
    }
    let given = field("token").unwrap_or_default().trim();
    let role = match data.auth.credentials.role_of(given) {
        Some(role @ (Role::Admin | Role::Viewer)) => role,
        Some(Role::Agent) => {
            let page = login_view(
                &req,
                &data,
                next,
                Some("the agent token cannot log in: use the admin or the viewer token".into()),
            );
            return respond(StatusCode::FORBIDDEN, &page);
        }
        None => {
            if let Some(ip) = ip {
                data.auth.failures.fail(ip);
            }
            let page = login_view(
                &req,
                &data,
                next,
                Some("that is neither the admin token nor the viewer token".into()),
            );
            return respond(StatusCode::UNAUTHORIZED, &page);
        }
    };
    // A session already open in this browser ends: one at a time.
    start_session(&data, &req, role, &next)
}

async fn logout(data: Data, req: HttpRequest) -> HttpResponse {
    if let Some(c) = req.cookie(SESSION_COOKIE) {
        data.auth.sessions.revoke(c.value());
    }
    let next = req
        .headers()
        .get(header::REFERER)
        .and_then(|v| v.to_str().ok())
        .and_then(|r| r.find("://").map(|i| &r[i + 3..]))
        .and_then(|r| r.find('/').map(|i| r[i..].to_owned()));
    let mut res = see_other(&safe_next(next.as_deref()), "logged out");
    if let Err(e) = res.add_cookie(&expired(SESSION_COOKIE)) {
        tracing::error!("clearing the session cookie: {e}");
    }
    res
}

#[cfg(test)]
mod tests;
