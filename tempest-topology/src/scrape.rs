//! The Prometheus scrape endpoint: `GET /metrics` serves a process's
//! registry in the text exposition format
//! ([`tempest_core::metrics::prometheus`]).
//!
//! It runs on actix-web, on a thread of its own with its own small runtime
//! (one HTTP worker), so a scrape never takes time from the data plane's
//! runtime: it only takes the registry's lock for the moment a snapshot
//! lasts, as a flush does.

use std::net::SocketAddr;
use std::sync::mpsc;
use std::time::Duration;

use actix_web::dev::ServerHandle;
use actix_web::{web, App, HttpResponse, HttpServer};

use tempest_core::metrics::{prometheus, Registry};

/// A running `/metrics` endpoint. Dropping it stops the server without
/// waiting; [`ScrapeEndpoint::stop`] waits.
pub struct ScrapeEndpoint {
    addr: SocketAddr,
    handle: ServerHandle,
    thread: Option<std::thread::JoinHandle<()>>,
}

async fn metrics(registry: web::Data<Registry>) -> HttpResponse {
    let body = prometheus::render(&registry.snapshot());
    HttpResponse::Ok()
        .content_type(prometheus::CONTENT_TYPE)
        .body(body)
}

async fn index() -> HttpResponse {
    HttpResponse::Ok()
        .content_type("text/plain; charset=utf-8")
        .body("Tempest metrics: GET /metrics\n")
}

impl ScrapeEndpoint {
    /// Binds `listen` (`IP:PORT` or `HOST:PORT`; port 0 picks a free one)
    /// and serves `registry` on `/metrics` until stopped.
    pub fn start(registry: Registry, listen: &str) -> std::io::Result<ScrapeEndpoint> {
        let (tx, rx) = mpsc::channel();
        let listen = listen.to_owned();
        let thread = std::thread::Builder::new()
            .name("tempest-scrape".into())
            .spawn(move || {
                let system = actix_web::rt::System::new();
                system.block_on(async move {
                    let data = web::Data::new(registry);
                    let server = HttpServer::new(move || {
                        App::new()
                            .app_data(data.clone())
                            .route("/metrics", web::get().to(metrics))
                            .route("/", web::get().to(index))
                    })
                    .workers(1)
                    .disable_signals()
                    .shutdown_timeout(1)
                    .client_request_timeout(Duration::from_secs(5))
                    .bind(listen.as_str());
                    let server = match server {
                        Ok(s) => s,
                        Err(e) => {
                            let _ = tx.send(Err(e));
                            return;
                        }
                    };
                    let Some(addr) = server.addrs().first().copied() else {
                        let _ = tx.send(Err(std::io::Error::other(format!(
                            "{listen} gave no address to listen on"
                        ))));
                        return;
                    };
                    let running = server.run();
                    let _ = tx.send(Ok((addr, running.handle())));
                    if let Err(e) = running.await {
                        tracing::warn!(target: "tempest::metrics", "the metrics endpoint failed: {e}");
                    }
                });
            })?;
        match rx.recv() {
            Ok(Ok((addr, handle))) => Ok(ScrapeEndpoint {
                addr,
                handle,
                thread: Some(thread),
            }),
            Ok(Err(e)) => {
                let _ = thread.join();
                Err(e)
            }
            Err(_) => {
                let _ = thread.join();
                Err(std::io::Error::other(
                    "the metrics endpoint's thread ended before listening",
                ))
            }
        }
    }

    /// The address it listens on.
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Stops serving and waits for the server's thread to end.
    pub async fn stop(mut self) {
        self.handle.stop(true).await;
        if let Some(t) = self.thread.take() {
            let _ = tokio::task::spawn_blocking(move || t.join()).await;
        }
    }
}

impl Drop for ScrapeEndpoint {
    fn drop(&mut self) {
        if self.thread.is_some() {
            // The command is sent at once; nobody waits for its completion.
            drop(self.handle.stop(false));
        }
    }
}
