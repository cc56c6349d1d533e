//! The REST API under `/api/v1`, and its OpenAPI document.
//!
//! Handlers translate HTTP to [`Director`] calls and back; they decide
//! nothing. Every error is `{"error": "..."}`. When the director has
//! credentials every call but the health check needs one, as
//! `Authorization: Bearer <token>`: reads the admin or viewer token,
//! changes the admin token, heartbeats and package archives the agent (or
//! admin) token. [`crate::auth::Auth::gate`] checks that before a body is
//! read.

use std::sync::Arc;

use actix_web::{get, post, web, HttpRequest, HttpResponse, ResponseError};
use futures_util::StreamExt;
use serde::Serialize;
use tempest_control::Heartbeat;
use utoipa::{OpenApi, ToSchema};

use crate::director::{
    AgentView, ClusterSummary, DeployRequest, Director, PackageView, ProcessView, RebalanceRequest,
    RecentError, TopologyDetail, TopologySummary,
};
use crate::error::Error;
use crate::lifecycle::{Command, Lifecycle, Phase};
use crate::metrics::{
    PerSourceFigures, PipelineEdge, SamplePoint, SourceEdge, SourceFigures, TaskFigures,
};

/// What the handlers share.
pub struct AppState {
    /// The cluster state.
    pub director: Arc<Director>,
    /// Credentials, sessions, host names, failed attempts.
    pub auth: Arc<crate::auth::Auth>,
    /// The client of the agents' APIs (logs).
    pub agents: crate::agents::AgentClient,
    /// Log calls to agents at once; more wait their turn.
    pub log_calls: Arc<tokio::sync::Semaphore>,
}

impl AppState {
    /// The state of a director over `director`, guarded by `auth`, calling
    /// the agents over https with `identity` when given.
    pub fn new(
        director: Arc<Director>,
        auth: crate::auth::Auth,
        identity: Option<&tempest_control::tls::Identity>,
    ) -> Result<AppState, crate::agents::CallError> {
        let agents =
            crate::agents::AgentClient::new(auth.credentials.for_agents().cloned(), identity)?;
        Ok(AppState {
            director,
            auth: Arc::new(auth),
            agents,
            log_calls: Arc::new(tokio::sync::Semaphore::new(MAX_LOG_CALLS)),
        })
    }
}

type Data = web::Data<AppState>;

/// The body of every error.
#[derive(Serialize, ToSchema)]
pub struct ErrorBody {
    /// What is wrong.
    pub error: String,
}

/// The answer to a health check.
#[derive(Serialize, ToSchema)]
pub struct Health {
    /// Always `ok`.
    pub status: String,
    /// The director's version.
    pub version: String,
}

/// A heartbeat (`tempest_control::Heartbeat`), documented loosely.
#[derive(ToSchema)]
#[allow(dead_code)]
pub struct HeartbeatDoc {
    /// The agent's stable id.
    agent_id: String,
    /// Its API address, `host:port`.
    address: String,
    /// The node's figures.
    #[schema(value_type = Object)]
    node: (),
    /// Its processes' statuses.
    #[schema(value_type = Vec<Object>)]
    processes: (),
}

/// An assignment (`tempest_control::Assignment`), documented loosely.
#[derive(ToSchema)]
#[allow(dead_code)]
pub struct AssignmentDoc {
    /// The process specs the agent should run.
    #[schema(value_type = Vec<Object>)]
    processes: (),
}

/// The OpenAPI document.
#[derive(OpenApi)]
#[openapi(
    info(title = "Tempest director API", description = "The control plane of a Tempest cluster."),
    paths(
        health, upload_package, list_packages, package_archive, heartbeat, list_agents,
        deploy, list_topologies, get_topology, stop, start, kill, rebalance, openapi_json,
        cluster, samples, process_logs, login_ticket
    ),
    components(schemas(
        ErrorBody, Health, HeartbeatDoc, AssignmentDoc, AgentView, PackageView, ProcessView,
        DeployRequest, RebalanceRequest, TopologySummary, TopologyDetail, Lifecycle, Phase,
        ClusterSummary, RecentError, SamplePoint, SourceFigures, TaskFigures, LogTail,
        PipelineEdge, PerSourceFigures, SourceEdge, LoginTicket
    )),
    modifiers(&BearerAuth)
)]
pub struct ApiDoc;

struct BearerAuth;

impl utoipa::Modify for BearerAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "token",
            SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()),
        );
    }
}

/// Registers the API on an app.
pub fn configure(cfg: &mut web::ServiceConfig) {
    cfg.app_data(
        web::JsonConfig::default()
            .error_handler(|e, _| Error::BadRequest(format!("bad JSON body: {e}")).into()),
    )
    .app_data(
        web::PathConfig::default()
            .error_handler(|e, _| Error::BadRequest(format!("bad path: {e}")).into()),
    )
    .service(health)
    .service(upload_package)
    .service(list_packages)
    .service(package_archive)
    .service(heartbeat)
    .service(list_agents)
    .service(deploy)
    .service(list_topologies)
    .service(get_topology)
    .service(stop)
    .service(start)
    .service(kill)
    .service(rebalance)
    .service(cluster)
    .service(samples)
    .service(process_logs)
    .service(login_ticket)
    .service(openapi_json);
}

/// How much of a package upload is read (the API's body, the web UI's
/// multipart file): up to `max_upload` is kept; past it the rest is read
/// and dropped, so the client gets the 413 rather than a reset connection,
/// up to twice the limit and 1 MiB, past which nothing more is read.
pub(crate) struct UploadBudget {
    max: u64,
    read: u64,
}

impl UploadBudget {
    /// A budget of `max` bytes; refuses at once a declared length past
    /// all hope.
    pub(crate) fn start(req: &HttpRequest, max: u64) -> Result<UploadBudget, Error> {
        let budget = UploadBudget { max, read: 0 };
        let declared = req
            .headers()
            .get("content-length")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        if declared.is_some_and(|n| n > budget.hopeless()) {
            return Err(budget.too_large());
        }
        Ok(budget)
    }

    fn hopeless(&self) -> u64 {
        self.max.saturating_mul(2).saturating_add(1 << 20)
    }

    /// Counts `n` more bytes read: whether to keep them (within the limit),
    /// or the 413 once reading on is pointless.
    pub(crate) fn take(&mut self, n: usize) -> Result<bool, Error> {
        self.read = self.read.saturating_add(n as u64);
        if self.read > self.hopeless() {
            return Err(self.too_large());
        }
        Ok(self.read <= self.max)
    }

    /// The 413 when more than the limit was read.
    pub(crate) fn finish(&self) -> Result<(), Error> {
        if self.read > self.max {
            Err(self.too_large())
        } else {
            Ok(())
        }
    }

    fn too_large(&self) -> Error {
        Error::TooLarge(format!(
            "the package is larger than the upload limit of {} bytes ({}, max_upload)",
            self.max,
            crate::ui::fmt::bytes(self.max)
        ))
    }
}

/// The answer to a path that does not exist.
pub async fn not_found(req: HttpRequest) -> HttpResponse {
    Error::NotFound(format!("no such resource: {} {}", req.method(), req.path())).error_response()
}

/// Health check.
#[utoipa::path(get, path = "/api/v1/health", responses((status = 200, body = Health)))]
#[get("/api/v1/health")]
async fn health() -> HttpResponse {
    HttpResponse::Ok().json(Health {
        status: "ok".into(),
        version: env!("CARGO_PKG_VERSION").into(),
    })
}

/// A single-use login link for the web UI.
#[derive(Serialize, utoipa::ToSchema)]
struct LoginTicket {
    /// The ticket: open `/login?ticket=…` once, within `expires_in_secs`.
    ticket: String,
    /// The link's path.
    path: String,
    /// Seconds left to open it.
    expires_in_secs: u64,
}

/// Makes a single-use login link for an admin session (what `tempest dev`
/// prints, so that opening the dashboard needs no token pasted). Admin only.
#[utoipa::path(
    post, path = "/api/v1/sessions/tickets",
    responses((status = 201, body = LoginTicket), (status = 401, body = ErrorBody), (status = 403, body = ErrorBody)),
    security(("token" = []))
)]
#[post("/api/v1/sessions/tickets")]
async fn login_ticket(data: Data) -> Result<HttpResponse, Error> {
    let ticket = data
        .auth
        .sessions
        .ticket(crate::auth::Role::Admin)
        .map_err(Error::internal)?;
    Ok(HttpResponse::Created().json(LoginTicket {
        path: format!("/login?ticket={ticket}"),
        ticket,
        expires_in_secs: crate::auth::TICKET_TTL.as_secs(),
    }))
}

/// Uploads a topology package (the archive is the body). It is verified and
/// stored by its content hash; uploading it again changes nothing.
#[utoipa::path(
    post, path = "/api/v1/packages",
    request_body(content = Vec<u8>, content_type = "application/gzip"),
    responses(
        (status = 201, description = "stored", body = PackageView),
        (status = 200, description = "already stored", body = PackageView),
        (status = 400, description = "not a valid package", body = ErrorBody),
        (status = 401, body = ErrorBody),
        (status = 413, description = "larger than max_upload", body = ErrorBody)
    ),
    security(("token" = []))
)]
#[post("/api/v1/packages")]
async fn upload_package(
    data: Data,
    req: HttpRequest,
    mut body: web::Payload,
) -> Result<HttpResponse, Error> {
    let mut budget = UploadBudget::start(&req, data.director.settings().max_upload)?;
    let mut bytes = web::BytesMut::new();
    while let Some(chunk) = body.next().await {
        let chunk = chunk.map_err(|e| Error::BadRequest(format!("reading the upload: {e}")))?;
        if budget.take(chunk.len())? {
            bytes.extend_from_slice(&chunk);
        }
    }
    budget.finish()?;
    let director = data.director.clone();
    let (new, view) = web::block(move || director.upload(&bytes))
        .await
        .map_err(Error::internal)??;
    Ok(if new {
        HttpResponse::Created().json(view)
    } else {
        HttpResponse::Ok().json(view)
    })
}

/// Every stored package.
#[utoipa::path(get, path = "/api/v1/packages", responses((status = 200, body = Vec<PackageView>)))]
#[get("/api/v1/packages")]
async fn list_packages(data: Data) -> HttpResponse {
    HttpResponse::Ok().json(data.director.packages())
}

/// A package's archive, as uploaded: for agents (the agent token) and
/// admins.
#[utoipa::path(
    get, path = "/api/v1/packages/{hash}/archive",
    params(("hash" = String, Path, description = "the content hash")),
    responses(
        (status = 200, content_type = "application/gzip", body = Vec<u8>),
        (status = 401, body = ErrorBody),
        (status = 403, description = "a viewer token", body = ErrorBody),
        (status = 404, body = ErrorBody)
    ),
    security(("token" = []))
)]
#[get("/api/v1/packages/{hash}/archive")]
async fn package_archive(data: Data, hash: web::Path<String>) -> Result<HttpResponse, Error> {
    let path = data.director.archive(&hash)?;
    let bytes = tokio::fs::read(&path)
        .await
        .map_err(|e| Error::internal(format!("reading {}: {e}", path.display())))?;
    Ok(HttpResponse::Ok()
        .content_type("application/gzip")
        .body(bytes))
}

/// An agent's heartbeat; the answer is its whole assignment.
#[utoipa::path(
    post, path = "/api/v1/agents/heartbeat",
    request_body = HeartbeatDoc,
    responses((status = 200, body = AssignmentDoc), (status = 400, body = ErrorBody), (status = 401, body = ErrorBody)),
    security(("token" = []))
)]
#[post("/api/v1/agents/heartbeat")]
async fn heartbeat(data: Data, hb: web::Json<Heartbeat>) -> Result<HttpResponse, Error> {
    let assignment = data.director.heartbeat(hb.into_inner())?;
    Ok(HttpResponse::Ok().json(assignment))
}

/// Every agent, up or down.
#[utoipa::path(get, path = "/api/v1/agents", responses((status = 200, body = Vec<AgentView>)))]
#[get("/api/v1/agents")]
async fn list_agents(data: Data) -> HttpResponse {
    HttpResponse::Ok().json(data.director.agents())
}

/// Deploys a package as a named topology, running.
#[utoipa::path(
    post, path = "/api/v1/topologies",
    request_body = DeployRequest,
    responses(
        (status = 201, body = TopologyDetail),
        (status = 400, description = "invalid name, config or worker counts", body = ErrorBody),
        (status = 401, body = ErrorBody),
        (status = 404, description = "unknown package", body = ErrorBody),
        (status = 409, description = "the name is taken", body = ErrorBody)
    ),
    security(("token" = []))
)]
#[post("/api/v1/topologies")]
async fn deploy(data: Data, req: web::Json<DeployRequest>) -> Result<HttpResponse, Error> {
    let detail = data.director.deploy(req.into_inner())?;
    Ok(HttpResponse::Created().json(detail))
}

/// Every topology.
#[utoipa::path(get, path = "/api/v1/topologies", responses((status = 200, body = Vec<TopologySummary>)))]
#[get("/api/v1/topologies")]
async fn list_topologies(data: Data) -> HttpResponse {
    HttpResponse::Ok().json(data.director.topologies())
}

/// One topology: its state, placement and processes, and its figures per
/// task and per source.
#[utoipa::path(
    get, path = "/api/v1/topologies/{name}",
    params(("name" = String, Path, description = "the topology's name")),
    responses((status = 200, body = TopologyDetail), (status = 404, body = ErrorBody))
)]
#[get("/api/v1/topologies/{name}")]
async fn get_topology(data: Data, name: web::Path<String>) -> Result<HttpResponse, Error> {
    Ok(HttpResponse::Ok().json(data.director.topology(&name)?))
}

fn answer(r: Result<Option<TopologyDetail>, Error>) -> Result<HttpResponse, Error> {
    Ok(match r? {
        Some(d) => HttpResponse::Ok().json(d),
        None => HttpResponse::Ok().json(serde_json::json!({"killed": true})),
    })
}

/// Stops a running topology's processes; it stays deployed.
#[utoipa::path(
    post, path = "/api/v1/topologies/{name}/stop",
    params(("name" = String, Path, description = "the topology's name")),
    responses((status = 200, body = TopologyDetail), (status = 401, body = ErrorBody),
              (status = 404, body = ErrorBody), (status = 409, description = "already stopped", body = ErrorBody)),
    security(("token" = []))
)]
#[post("/api/v1/topologies/{name}/stop")]
async fn stop(data: Data, name: web::Path<String>) -> Result<HttpResponse, Error> {
    answer(data.director.command(&name, Command::Stop))
}

/// Starts a stopped topology.
#[utoipa::path(
    post, path = "/api/v1/topologies/{name}/start",
    params(("name" = String, Path, description = "the topology's name")),
    responses((status = 200, body = TopologyDetail), (status = 401, body = ErrorBody),
              (status = 404, body = ErrorBody), (status = 409, description = "already running", body = ErrorBody)),
    security(("token" = []))
)]
#[post("/api/v1/topologies/{name}/start")]
async fn start(data: Data, name: web::Path<String>) -> Result<HttpResponse, Error> {
    answer(data.director.command(&name, Command::Start))
}

/// Stops a topology's processes and forgets it.
#[utoipa::path(
    post, path = "/api/v1/topologies/{name}/kill",
    params(("name" = String, Path, description = "the topology's name")),
    responses((status = 200, description = "`{\"killed\": true}`"), (status = 401, body = ErrorBody),
              (status = 404, body = ErrorBody)),
    security(("token" = []))
)]
#[post("/api/v1/topologies/{name}/kill")]
async fn kill(data: Data, name: web::Path<String>) -> Result<HttpResponse, Error> {
    answer(data.director.command(&name, Command::Kill))
}

/// Changes the worker counts of some tasks.
#[utoipa::path(
    post, path = "/api/v1/topologies/{name}/rebalance",
    params(("name" = String, Path, description = "the topology's name")),
    request_body = RebalanceRequest,
    responses((status = 200, body = TopologyDetail), (status = 400, body = ErrorBody),
              (status = 401, body = ErrorBody), (status = 404, body = ErrorBody)),
    security(("token" = []))
)]
#[post("/api/v1/topologies/{name}/rebalance")]
async fn rebalance(
    data: Data,
    name: web::Path<String>,
    req: web::Json<RebalanceRequest>,
) -> Result<HttpResponse, Error> {
    answer(
        data.director
            .command(&name, Command::Rebalance(req.into_inner().workers)),
    )
}

/// The cluster at a glance: agents up and down, topologies running and
/// stopped, the cluster's throughput.
#[utoipa::path(get, path = "/api/v1/cluster", responses((status = 200, body = ClusterSummary)))]
#[get("/api/v1/cluster")]
async fn cluster(data: Data) -> HttpResponse {
    HttpResponse::Ok().json(data.director.cluster())
}

/// A topology's metric series of the last 15 minutes, oldest first, one
/// point per scrape.
#[utoipa::path(
    get, path = "/api/v1/topologies/{name}/samples",
    params(("name" = String, Path, description = "the topology's name")),
    responses((status = 200, body = Vec<SamplePoint>), (status = 404, body = ErrorBody))
)]
#[get("/api/v1/topologies/{name}/samples")]
async fn samples(data: Data, name: web::Path<String>) -> Result<HttpResponse, Error> {
    let director = data.director.clone();
    let points = web::block(move || director.samples(&name))
        .await
        .map_err(Error::internal)??;
    Ok(HttpResponse::Ok().json(points))
}

/// The tail of a process's log, as its agent answers it.
#[derive(Serialize, ToSchema)]
pub struct LogTail {
    /// The process id.
    pub id: String,
    /// `stdout` or `stderr`.
    pub stream: String,
    /// The most lines asked for.
    pub lines: u64,
    /// The lines.
    pub text: String,
}

/// The query of a log call (the API's and the web UI's log page).
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct LogQuery {
    /// `stdout` or `stderr`.
    pub(crate) stream: Option<String>,
    /// The last lines to return.
    pub(crate) lines: Option<u64>,
}

/// How long the agent has to answer a log call.
const LOG_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);
/// The largest log answer read from an agent (10,000 lines of up to
/// 800 bytes each).
const MAX_LOG_ANSWER: usize = 8 << 20;
/// Log calls to agents at once.
const MAX_LOG_CALLS: usize = 4;

/// The tail of one of a topology's process logs, from the agent running it.
/// The id is the process id with or without the `{name}/` prefix, e.g.
/// `server` or `count/0`.
#[utoipa::path(
    get, path = "/api/v1/topologies/{name}/processes/{id}/logs",
    params(
        ("name" = String, Path, description = "the topology's name"),
        ("id" = String, Path, description = "the process id, e.g. `server` or `count/0`"),
        ("stream" = Option<String>, Query, description = "`stdout` (the default) or `stderr`"),
        ("lines" = Option<u64>, Query, description = "the last lines to return (default 100)")
    ),
    responses(
        (status = 200, body = LogTail),
        (status = 400, body = ErrorBody),
        (status = 404, description = "unknown topology or process", body = ErrorBody),
        (status = 502, description = "the agent did not answer", body = ErrorBody)
    )
)]
#[get("/api/v1/topologies/{name}/processes/{id:.+}/logs")]
async fn process_logs(
    data: Data,
    path: web::Path<(String, String)>,
    req: HttpRequest,
) -> Result<HttpResponse, Error> {
    let (name, id) = path.into_inner();
    let query = web::Query::<LogQuery>::from_query(req.query_string())
        .map_err(|e| Error::BadRequest(format!("bad query (stream, lines): {e}")))?;
    let stream = query.stream.clone().unwrap_or_else(|| "stdout".into());
    let (status, body) = fetch_log(&data, &name, &id, &stream, query.lines).await?;
    Ok(HttpResponse::build(status)
        .content_type("application/json")
        .body(body))
}

/// Asks the agent running a topology's process for the tail of its log;
/// answers the agent's status and JSON body. The web UI shows the same.
pub async fn fetch_log(
    data: &AppState,
    name: &str,
    id: &str,
    stream: &str,
    lines: Option<u64>,
) -> Result<(actix_web::http::StatusCode, Vec<u8>), Error> {
    if stream != "stdout" && stream != "stderr" {
        return Err(Error::BadRequest(format!(
            "stream must be stdout or stderr, not `{stream}`"
        )));
    }
    let (full, agent) = data.director.process_agent(name, id)?;
    let mut target = format!(
        "/api/v1/processes/{}/logs?stream={stream}",
        crate::agents::encode(&full)
    );
    if let Some(n) = lines {
        target.push_str(&format!("&lines={n}"));
    }
    let _turn = data
        .log_calls
        .acquire()
        .await
        .map_err(|_| Error::Internal("the director is stopping".into()))?;
    let answer = data
        .agents
        .get(&agent, &target, MAX_LOG_ANSWER, LOG_TIMEOUT)
        .await
        .map_err(|e| Error::BadGateway(format!("agent {agent} did not answer: {e}")))?;
    let status = actix_web::http::StatusCode::from_u16(answer.status)
        .map_err(|_| Error::BadGateway(format!("agent {agent} answered nonsense")))?;
    if serde_json::from_slice::<serde_json::Value>(&answer.body).is_err() {
        return Err(Error::BadGateway(format!(
            "agent {agent} answered {status} without JSON"
        )));
    }
    Ok((status, answer.body))
}

/// This document.
#[utoipa::path(get, path = "/api/v1/openapi.json", responses((status = 200, description = "the OpenAPI document")))]
#[get("/api/v1/openapi.json")]
async fn openapi_json() -> HttpResponse {
    HttpResponse::Ok().json(ApiDoc::openapi())
}
