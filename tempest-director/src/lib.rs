//! # tempest-director
//!
//! The cluster's control plane: it stores topology packages, deploys them
//! as named topologies, places their topology servers and task workers on
//! the agents, answers each agent's heartbeat with its assignment, and moves
//! the processes of an agent that stops heartbeating. Its state lives in
//! SQLite in its data directory, so a restarted director carries on.
//!
//! - [`store`]: the database and package files;
//! - [`lifecycle`]: a topology's typed state machine;
//! - [`placement`]: the scheduler trait and the least-loaded policy;
//! - [`director`]: the decisions, over the state;
//! - [`metrics`]: the metrics collector's parsing and figures;
//! - [`agents`]: the director's calls to the agents' APIs;
//! - [`auth`]: credentials, sessions, the `Host` check, the rate limit;
//! - [`api`]: the REST API and its OpenAPI document;
//! - [`ui`]: the web UI, server-rendered pages over the same calls;
//! - [`config`]: the `[director]` section of `Cluster.toml`.

#![warn(missing_docs)]

pub mod agents;
pub mod api;
pub mod auth;
pub mod config;
pub mod director;
pub mod error;
pub mod lifecycle;
pub mod metrics;
pub mod placement;
pub mod store;
pub mod ui;

use std::sync::Arc;
use std::time::Duration;

use actix_web::{web, App, HttpServer};

use crate::config::DirectorConfig;
use crate::director::{Director, Settings};
use crate::placement::LeastLoaded;

/// How often the director looks for agents that went down.
const TICK: Duration = Duration::from_millis(250);

/// The director's HTTP app over `state`: [`auth::Auth::gate`] in front of
/// the REST API and the web UI.
pub fn app(
    state: web::Data<api::AppState>,
) -> App<
    impl actix_web::dev::ServiceFactory<
        actix_web::dev::ServiceRequest,
        Config = (),
        Response = actix_web::dev::ServiceResponse<
            actix_web::body::EitherBody<actix_web::body::BoxBody>,
        >,
        Error = actix_web::Error,
        InitError = (),
    >,
> {
    let auth = state.auth.clone();
    App::new()
        .app_data(state)
        .wrap_fn(move |req, srv| {
            use actix_web::dev::Service;
            use actix_web::HttpMessage;
            use futures_util::future::{ready, Either, FutureExt};
            match auth.gate(&req) {
                Err(refusal) => {
                    let refusal = ui::or_page(req.request(), &refusal);
                    Either::Left(ready(Ok(req.into_response(refusal).map_into_right_body())))
                }
                Ok(caller) => {
                    req.extensions_mut().insert(caller);
                    Either::Right(
                        srv.call(req)
                            .map(|r| r.map(actix_web::dev::ServiceResponse::map_into_left_body)),
                    )
                }
            }
        })
        .configure(api::configure)
        .configure(ui::configure)
        .default_service(web::route().to(ui::not_found))
}

/// Opens the state, binds the API and serves until stopped. Prints
/// `tempest-director listening on http://ADDR` once the API listens.
pub async fn run(config: DirectorConfig) -> anyhow::Result<()> {
    config.check().map_err(|e| anyhow::anyhow!(e))?;
    for w in &config.warnings {
        tracing::warn!("{w}");
    }
    if config.insecure && !config.has_credentials() && !config.listen.ip().is_loopback() {
        tracing::warn!(
            "--insecure: serving {} without credentials: anyone who reaches it can read \
             everything and run code on every agent",
            config.listen
        );
    }
    if config.insecure && config.tls.is_none() && !config.listen.ip().is_loopback() {
        tracing::warn!(
            "--insecure: serving {} without TLS: tokens, sessions and deploy secrets cross \
             the network in clear",
            config.listen
        );
    }
    let identity = match &config.tls {
        Some(files) => Some(
            files
                .load()
                .map_err(|e| anyhow::anyhow!("loading the director's TLS files: {e}"))?,
        ),
        None => None,
    };
    let ca = match &config.tls_ca_key {
        Some(key) => {
            let cert = config
                .tls
                .as_ref()
                .map(|f| f.ca.clone())
                .unwrap_or_default();
            Some(
                tempest_control::tls::ClusterCa::load(&cert, key)
                    .map_err(|e| anyhow::anyhow!("loading the cluster CA: {e}"))?,
            )
        }
        None => {
            if identity.is_some() {
                tracing::warn!(
                    "no tls_ca_key_file: deployments get no data-plane certificate, so \
                     topology links are plain TCP (authenticated by the deployment's secret, \
                     not encrypted)"
                );
            }
            None
        }
    };
    let director = Arc::new(Director::open(
        Settings {
            data_dir: config.data_dir.clone(),
            agent_timeout: config.agent_timeout,
            max_upload: config.max_upload,
            ca: ca.map(Arc::new),
        },
        Box::new(LeastLoaded),
    )?);
    let credentials = auth::Credentials {
        admin: config.admin_token.clone(),
        viewer: config.viewer_token.clone(),
        agent: config.agent_token.clone(),
    };
    let mut hosts = config.hosts.clone();
    if config.listen.ip().is_unspecified() {
        // Every interface: the machine's own name too.
        hosts.push(tempest_core::metrics::hostname());
    }
    let mut gate = auth::Auth::new(credentials, auth::Hosts::new(hosts));
    gate.tls = identity.is_some();
    let state = web::Data::new(api::AppState::new(
        director.clone(),
        gate,
        identity.as_ref(),
    )?);
    let agents = state.agents.clone();
    let signals = tempest_core::shutdown::Signals::install();
    let server = HttpServer::new(move || app(state.clone()))
        // The director stops on its own signal handling below: while it
        // shuts down it must not judge agents (which cannot reach it) down.
        .disable_signals()
        .shutdown_timeout(2)
        // Under TLS, a connection whose client showed a certificate of the
        // cluster (an agent's) is marked so.
        .on_connect(|conn, ext| {
            use actix_tls::accept::rustls_0_23::TlsStream;
            if let Some(tls) = conn.downcast_ref::<TlsStream<actix_web::rt::net::TcpStream>>() {
                if tls.get_ref().1.peer_certificates().is_some() {
                    ext.insert(auth::ClusterPeer);
                }
            }
        });
    let (server, scheme) = match &identity {
        Some(id) => (
            server
                .bind_rustls_0_23(
                    config.listen,
                    id.server_config(tempest_control::tls::ClientAuth::Optional)
                        .map_err(|e| anyhow::anyhow!("the director's TLS configuration: {e}"))?,
                )
                .map_err(|e| anyhow::anyhow!("binding {}: {e}", config.listen))?,
            "https",
        ),
        None => (
            server
                .bind(config.listen)
                .map_err(|e| anyhow::anyhow!("binding {}: {e}", config.listen))?,
            "http",
        ),
    };
    let addr = server
        .addrs()
        .first()
        .copied()
        .ok_or_else(|| anyhow::anyhow!("bound no address"))?;
    println!("tempest-director listening on {scheme}://{addr}");
    let ticker = director.clone();
    let reconciling = actix_web::rt::spawn(async move {
        let mut interval = tokio::time::interval(TICK);
        loop {
            interval.tick().await;
            let d = ticker.clone();
            if let Ok(Err(e)) = web::block(move || d.tick()).await {
                tracing::error!("reconciling: {e}");
            }
        }
    });
    let collector = director.clone();
    let every = config.metrics_interval;
    let collecting = actix_web::rt::spawn(async move {
        let mut interval = tokio::time::interval(every);
        interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            interval.tick().await;
            collect(&collector, &agents, every).await;
        }
    });
    let server = server.run();
    let handle = server.handle();
    let mut serving = actix_web::rt::spawn(server);
    let result = tokio::select! {
        _ = signals.wait() => {
            tracing::info!("signal received: exiting");
            Ok(())
        }
        r = &mut serving => match r {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(anyhow::Error::new(e).context("the API server failed")),
            Err(e) => Err(anyhow::anyhow!("the API server ended abnormally: {e}")),
        },
    };
    // No more decisions: a director on its way out moves nothing.
    reconciling.abort();
    collecting.abort();
    handle.stop(true).await;
    result
}

/// The largest exposition read from one agent.
const MAX_EXPOSITION: usize = 16 << 20;

/// One round of the metrics collector: scrapes every live agent at once
/// and records the figures. A scrape that fails (no answer, too large, not
/// an exposition) leaves that agent out of this round only.
async fn collect(director: &Arc<Director>, agents: &agents::AgentClient, every: Duration) {
    let timeout = every.max(Duration::from_secs(1));
    let scrapes = director.live_agents().into_iter().map(|addr| async move {
        match agents
            .get(&addr, "/api/v1/metrics", MAX_EXPOSITION, timeout)
            .await
        {
            Ok(a) if a.status == 200 => match metrics::parse(&String::from_utf8_lossy(&a.body)) {
                Ok(samples) => Some(samples),
                Err(e) => {
                    tracing::warn!("scraping agent {addr}: not an exposition: {e}");
                    None
                }
            },
            Ok(a) => {
                tracing::warn!("scraping agent {addr}: status {}", a.status);
                None
            }
            Err(e) => {
                tracing::warn!("scraping agent {addr}: {e}");
                None
            }
        }
    });
    let samples: Vec<metrics::Sample> = futures_util::future::join_all(scrapes)
        .await
        .into_iter()
        .flatten()
        .flatten()
        .collect();
    let d = director.clone();
    let ts = director::now_ms();
    if let Ok(Err(e)) = web::block(move || d.record_metrics(&samples, ts)).await {
        tracing::error!("recording metrics: {e}");
    }
}
