//! The agent's HTTP API, under `/api/v1`, JSON in and out.
//!
//! | call | what |
//! | --- | --- |
//! | `GET /api/v1/health` | `{"status": "ok", "agent_id", "version"}` |
//! | `GET /api/v1/node` | the node's figures ([`NodeInfo`](tempest_control::NodeInfo)) |
//! | `GET /api/v1/processes` | every process, assigned or supervised ([`ProcessStatus`]) |
//! | `GET /api/v1/processes/{id}` | one process |
//! | `GET /api/v1/processes/{id}/logs?stream=stdout\|stderr&lines=N` | the tail of its log |
//! | `GET /api/v1/metrics` (and `/metrics`) | Prometheus text: the node's figures and its processes' metrics, summed |
//! | `GET /api/v1/assignment` | the assignment being converged to |
//! | `POST /api/v1/assignment` | converge to this assignment (`application/json`) |
//! | `PUT /api/v1/packages/{hash}` | install a package archive (`application/octet-stream` or `application/gzip`) |
//!
//! Process ids contain `/`: write them as they are or percent-encoded.
//! Errors are `{"error": "..."}` with a 4xx or 5xx status. When the agent
//! has a token (the agent token), every call but the health check needs
//! `Authorization: Bearer <token>` (401 otherwise). A body of any other
//! type than the call's is refused (415), whatever the credentials: the
//! types a web page may send to another site without asking (`text/plain`,
//! forms) never change anything. [`gate`] checks both before a handler
//! runs. The assignment read back shows whether each spec has a data-plane
//! secret, never the secret.

use std::sync::Arc;

use actix_web::http::header;
use actix_web::{web, HttpRequest, HttpResponse};
use tempest_control::{ApiError, Assignment, ProcessStatus};

use crate::packages::MAX_PACKAGE_BYTES;
use crate::supervisor::Stream;
use crate::Agent;

/// The most log lines one call returns.
pub const MAX_LOG_LINES: usize = 10_000;
/// The log lines returned when the call does not say.
pub const DEFAULT_LOG_LINES: usize = 100;
/// The largest assignment accepted.
const MAX_ASSIGNMENT_BYTES: usize = 16 << 20;

/// Mounts the API on an actix-web app whose data holds the [`Agent`].
pub fn configure(cfg: &mut web::ServiceConfig) {
    cfg.service(
        web::scope("/api/v1")
            .service(get("/health", health))
            .service(get("/node", node))
            .service(get("/processes", processes))
            .service(get("/processes/{id:.+}/logs", logs))
            .service(get("/processes/{id:.+}", process))
            .service(get("/metrics", metrics))
            .service(
                web::resource("/assignment")
                    .route(web::get().to(assignment))
                    .route(web::post().to(apply))
                    .default_service(web::to(method_not_allowed)),
            )
            .service(
                web::resource("/packages/{hash}")
                    .route(web::put().to(upload))
                    .default_service(web::to(method_not_allowed)),
            )
            .default_service(web::to(not_found)),
    )
    .service(get("/metrics", metrics))
    .default_service(web::to(not_found));
}

fn get<F, Args>(path: &str, handler: F) -> actix_web::Resource
where
    F: actix_web::Handler<Args>,
    Args: actix_web::FromRequest + 'static,
    F::Output: actix_web::Responder + 'static,
{
    web::resource(path)
        .route(web::get().to(handler))
        .default_service(web::to(method_not_allowed))
}

/// A JSON error.
pub fn error(status: actix_web::http::StatusCode, message: impl Into<String>) -> HttpResponse {
    HttpResponse::build(status).json(ApiError::new(message))
}

async fn not_found(req: HttpRequest) -> HttpResponse {
    error(
        actix_web::http::StatusCode::NOT_FOUND,
        format!("no such API call: {} {}", req.method(), req.path()),
    )
}

async fn method_not_allowed(req: HttpRequest) -> HttpResponse {
    error(
        actix_web::http::StatusCode::METHOD_NOT_ALLOWED,
        format!("{} is not allowed on {}", req.method(), req.path()),
    )
}

/// What every request passes before its handler: the body's type for a
/// call that sends one (415), then the token (401).
pub fn gate(agent: &Agent, req: &actix_web::dev::ServiceRequest) -> Result<(), HttpResponse> {
    let method = req.method();
    if matches!(
        *method,
        actix_web::http::Method::POST
            | actix_web::http::Method::PUT
            | actix_web::http::Method::PATCH
    ) {
        let given = req
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .map(|v| {
                v.split(';')
                    .next()
                    .unwrap_or_default()
                    .trim()
                    .to_ascii_lowercase()
            });
        let wanted: &[&str] = if req.path().starts_with("/api/v1/packages/") {
            &[
                "application/octet-stream",
                "application/gzip",
                "application/x-gzip",
            ]
        } else {
            &["application/json"]
        };
        if !given.as_deref().is_some_and(|g| wanted.contains(&g)) {
            return Err(error(
                actix_web::http::StatusCode::UNSUPPORTED_MEDIA_TYPE,
                format!(
                    "{} {} takes a body of type {}, not {}",
                    method,
                    req.path(),
                    wanted.join(" or "),
                    given.as_deref().unwrap_or("none")
                ),
            ));
        }
    }
    if req.path() == "/api/v1/health" {
        return Ok(());
    }
    authorize(agent, req.headers(), req.peer_addr().map(|a| a.ip()))
}

/// Checks the bearer token of a call from `ip`: an address that gave too
/// many wrong tokens lately is refused (429) before its token is looked at.
fn authorize(
    agent: &Agent,
    headers: &header::HeaderMap,
    ip: Option<std::net::IpAddr>,
) -> Result<(), HttpResponse> {
    let Some(token) = &agent.config.token else {
        return Ok(());
    };
    if let Some(Err(wait)) = ip.map(|ip| agent.failures.check(ip)) {
        let secs = wait.as_secs().max(1);
        return Err(HttpResponse::TooManyRequests()
            .insert_header((header::RETRY_AFTER, secs.to_string()))
            .json(ApiError::new(format!(
                "too many failed authentications from this address: try again in {secs} s"
            ))));
    }
    let fail = || {
        if let Some(ip) = ip {
            agent.failures.fail(ip);
        }
    };
    let unauthorized = |message: &str| {
        HttpResponse::Unauthorized()
            .insert_header((header::WWW_AUTHENTICATE, "Bearer realm=\"tempest\""))
            .json(ApiError::new(message))
    };
    let Some(value) = headers.get(header::AUTHORIZATION) else {
        return Err(unauthorized(
            "this call needs the agent token: send `Authorization: Bearer <token>`",
        ));
    };
    let given = value
        .to_str()
        .ok()
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim);
    match given {
        Some(g) if token.matches(g) => Ok(()),
        Some(_) => {
            fail();
            Err(unauthorized("wrong agent token"))
        }
        None => {
            fail();
            Err(unauthorized(
                "the Authorization header must be `Bearer <token>`",
            ))
        }
    }
}

async fn read_body(payload: web::Payload, limit: usize) -> Result<web::Bytes, HttpResponse> {
    match payload.to_bytes_limited(limit).await {
        Ok(Ok(b)) => Ok(b),
        Ok(Err(e)) => Err(error(
            actix_web::http::StatusCode::BAD_REQUEST,
            format!("reading the request body: {e}"),
        )),
        Err(_) => Err(error(
            actix_web::http::StatusCode::PAYLOAD_TOO_LARGE,
            format!("the request body is larger than {limit} bytes"),
        )),
    }
}

/// A path segment, percent-decoded.
fn decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' && i + 2 < bytes.len() {
            let hex = &bytes[i + 1..i + 3];
            let value = std::str::from_utf8(hex)
                .ok()
                .filter(|_| hex.iter().all(u8::is_ascii_hexdigit))
                .and_then(|h| u8::from_str_radix(h, 16).ok());
            if let Some(v) = value {
                out.push(v);
                i += 3;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn process_id(req: &HttpRequest) -> String {
    decode(req.match_info().get("id").unwrap_or_default())
}

async fn health(agent: web::Data<Agent>) -> HttpResponse {
    HttpResponse::Ok().json(serde_json::json!({
        "status": "ok",
        "agent_id": agent.id,
        "version": env!("CARGO_PKG_VERSION"),
    }))
}

async fn node(agent: web::Data<Agent>) -> HttpResponse {
    HttpResponse::Ok().json(crate::node::info(&agent.config.data_dir))
}

async fn processes(agent: web::Data<Agent>) -> HttpResponse {
    HttpResponse::Ok().json(agent.processes())
}

fn find(agent: &Agent, id: &str) -> Result<ProcessStatus, HttpResponse> {
    agent
        .processes()
        .into_iter()
        .find(|p| p.id == id)
        .ok_or_else(|| {
            error(
                actix_web::http::StatusCode::NOT_FOUND,
                format!("no process `{id}` on this agent"),
            )
        })
}

async fn process(agent: web::Data<Agent>, req: HttpRequest) -> HttpResponse {
    match find(&agent, &process_id(&req)) {
        Ok(p) => HttpResponse::Ok().json(p),
        Err(e) => e,
    }
}

async fn logs(agent: web::Data<Agent>, req: HttpRequest) -> HttpResponse {
    let bad = |m: String| error(actix_web::http::StatusCode::BAD_REQUEST, m);
    let query = match web::Query::<Vec<(String, String)>>::from_query(req.query_string()) {
        Ok(q) => q.into_inner(),
        Err(e) => return bad(format!("bad query string: {e}")),
    };
    let mut stream = Stream::Stdout;
    let mut lines = DEFAULT_LOG_LINES;
    for (k, v) in &query {
        match k.as_str() {
            "stream" => {
                stream = match v.as_str() {
                    "stdout" => Stream::Stdout,
                    "stderr" => Stream::Stderr,
                    other => {
                        return bad(format!(
                            "stream must be stdout or stderr, not `{other}`"
                        ))
                    }
                }
            }
            "lines" => match v.parse::<u64>() {
                Ok(n) => lines = usize::try_from(n).unwrap_or(usize::MAX).min(MAX_LOG_LINES),
                Err(_) => {
                    return bad(format!(
                        "lines must be a whole number (at most {MAX_LOG_LINES} are returned), not `{v}`"
                    ))
                }
            },
            other => {
                return bad(format!(
                    "unknown parameter `{other}`; the parameters are stream and lines"
                ))
            }
        }
    }
    let id = process_id(&req);
    let supervisor = agent.supervisor.clone();
    let key = id.clone();
    // A process stopped earlier keeps its logs; one assigned but never
    // started has none yet.
    let text = match web::block(move || supervisor.log_tail(&key, stream, lines))
        .await
        .ok()
        .flatten()
    {
        Some(text) => text,
        None => match find(&agent, &id) {
            Ok(_) => String::new(),
            Err(e) => return e,
        },
    };
    HttpResponse::Ok().json(serde_json::json!({
        "id": id,
        "stream": stream.as_str(),
        "lines": lines,
        "text": text,
    }))
}

async fn metrics(agent: web::Data<Agent>) -> HttpResponse {
    let a: Arc<Agent> = agent.into_inner();
    // Scrapes run on the agent's runtime, where its HTTP client lives.
    let runtime = a.runtime.clone();
    match runtime.spawn(async move { a.metrics_text().await }).await {
        Ok(text) => HttpResponse::Ok()
            .content_type(crate::metrics::CONTENT_TYPE)
            .body(text),
        Err(e) => error(
            actix_web::http::StatusCode::INTERNAL_SERVER_ERROR,
            format!("gathering metrics failed: {e}"),
        ),
    }
}

async fn assignment(agent: web::Data<Agent>) -> HttpResponse {
    let mut a = agent.assigner.desired().unwrap_or_default();
    // Whether a spec has a secret, not the secret.
    for spec in &mut a.processes {
        if spec.data_secret.is_some() {
            spec.data_secret = tempest_control::Secret::new("***", "mask").ok();
        }
        if let Some(cert) = &mut spec.data_tls {
            cert.key_pem = tempest_control::tls::KeyPem::masked();
        }
    }
    HttpResponse::Ok().json(a)
}

async fn apply(agent: web::Data<Agent>, body: web::Payload) -> HttpResponse {
    let body = match read_body(body, MAX_ASSIGNMENT_BYTES).await {
        Ok(b) => b,
        Err(e) => return e,
    };
    let assignment: Assignment = match serde_json::from_slice(&body) {
        Ok(a) => a,
        Err(e) => {
            return error(
                actix_web::http::StatusCode::BAD_REQUEST,
                format!("malformed assignment: {e}"),
            )
        }
    };
    let a: Arc<Agent> = agent.into_inner();
    let assigner = a.assigner.clone();
    let result = a
        .runtime
        .spawn(async move { assigner.apply(assignment).await })
        .await;
    match result {
        Ok(Ok(c)) => HttpResponse::Ok().json(serde_json::json!({
            "started": c.started,
            "stopped": c.stopped,
            "replaced": c.replaced,
            "processes": a.processes(),
        })),
        Ok(Err(e)) => error(actix_web::http::StatusCode::BAD_REQUEST, e),
        Err(e) => error(
            actix_web::http::StatusCode::INTERNAL_SERVER_ERROR,
            format!("applying the assignment failed: {e}"),
        ),
    }
}

async fn upload(agent: web::Data<Agent>, req: HttpRequest, body: web::Payload) -> HttpResponse {
    let hash = decode(req.match_info().get("hash").unwrap_or_default());
    if !tempest_control::package::is_content_hash(&hash) {
        return error(
            actix_web::http::StatusCode::BAD_REQUEST,
            format!("`{hash}` is not a package content hash (64 lowercase hex digits)"),
        );
    }
    let body = match read_body(body, MAX_PACKAGE_BYTES as usize).await {
        Ok(b) => b,
        Err(e) => return e,
    };
    let a: Arc<Agent> = agent.into_inner();
    let packages = a.packages.clone();
    let result = a
        .runtime
        // The body as received: a copy of an archive of up to 2 GiB would
        // double what the upload costs.
        .spawn(async move { packages.install(&hash, body).await })
        .await;
    match result {
        Ok(Ok(p)) => HttpResponse::Ok().json(serde_json::json!({
            "hash": p.hash,
            "name": p.manifest.name,
            "version": p.manifest.version,
            "binary": p.manifest.binary,
        })),
        Ok(Err(e)) => error(actix_web::http::StatusCode::BAD_REQUEST, e),
        Err(e) => error(
            actix_web::http::StatusCode::INTERNAL_SERVER_ERROR,
            format!("installing the package failed: {e}"),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_percent_escapes() {
        assert_eq!(decode("wc%2Fcount%2F1"), "wc/count/1");
        assert_eq!(decode("wc/count/1"), "wc/count/1");
        assert_eq!(decode("a%2"), "a%2");
        assert_eq!(decode("a%zz"), "a%zz");
        assert_eq!(decode("%"), "%");
    }
}
