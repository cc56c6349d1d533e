//! The UI's pages and forms, through the whole app (token check included),
//! over a director with no agents.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use actix_multipart::test::{create_form_data_payload_and_headers_from_fields, TestFormField};
use actix_web::body::MessageBody;
use actix_web::dev::ServiceResponse;
use actix_web::http::{header, StatusCode};
use actix_web::test::{self, TestRequest};
use actix_web::web;

use super::*;
use crate::api::AppState;
use crate::director::{Director, Settings};
use crate::placement::LeastLoaded;

const TOKEN: &str = "ui-test-token";
const VIEWER: &str = "ui-test-viewer-token";
const AGENT: &str = "ui-test-agent-token";
const MAX_UPLOAD: u64 = 64 * 1024;
const TOML: &str =
    "[tasks.split]\nworkers = 1\n\n[tasks.count]\nworkers = 2\n\n[tasks.output]\nworkers = 1\n";

struct Fixture {
    _dir: tempfile::TempDir,
    state: web::Data<AppState>,
    archive: Vec<u8>,
    hash: String,
}

fn fixture(token: Option<&str>) -> Fixture {
    fixture_with(crate::auth::Credentials {
        admin: token.map(|t| tempest_control::Secret::new(t, "test").unwrap()),
        viewer: None,
        agent: None,
    })
}

/// A director with the admin, viewer and agent tokens.
fn fixture_all() -> Fixture {
    let s = |t: &str| Some(tempest_control::Secret::new(t, "test").unwrap());
    fixture_with(crate::auth::Credentials {
        admin: s(TOKEN),
        viewer: s(VIEWER),
        agent: s(AGENT),
    })
}

fn fixture_with(credentials: crate::auth::Credentials) -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let director = Director::open(
        Settings {
            data_dir: dir.path().join("data"),
            agent_timeout: Duration::from_secs(10),
            max_upload: MAX_UPLOAD,
            ca: None,
        },
        Box::new(LeastLoaded),
    )
    .unwrap();
    let (archive, hash) = package(dir.path(), "wordcount", Some(TOML));
    Fixture {
        _dir: dir,
        state: web::Data::new(
            AppState::new(
                Arc::new(director),
                crate::auth::Auth::new(credentials, crate::auth::Hosts::new([])),
                None,
            )
            .unwrap(),
        ),
        archive,
        hash,
    }
}

fn package(dir: &Path, name: &str, toml: Option<&str>) -> (Vec<u8>, String) {
    tempest_testkit::cluster::script_package(dir, name, "#!/bin/sh\nexec sleep 600\n", toml)
}

/// An answer, read whole.
struct Page {
    status: StatusCode,
    headers: header::HeaderMap,
    body: String,
}

impl Page {
    fn location(&self) -> &str {
        self.headers
            .get(header::LOCATION)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
    }

    fn cookies(&self) -> Vec<String> {
        self.headers
            .get_all(header::SET_COOKIE)
            .filter_map(|v| v.to_str().ok().map(str::to_owned))
            .collect()
    }

    fn is_html(&self) -> bool {
        self.headers
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.starts_with("text/html"))
            && self.body.starts_with("<!DOCTYPE html>")
            && self.body.trim_end().ends_with("</html>")
    }

    /// The error shown on the page.
    fn error(&self) -> Option<&str> {
        let start = self.body.find("id=\"error\"")?;
        let rest = &self.body[start..];
        let open = rest.find('>')? + 1;
        let close = rest.find("</p>")?;
        Some(&rest[open..close])
    }
}

async fn read(res: ServiceResponse<impl MessageBody>) -> Page {
    let status = res.status();
    let headers = res.headers().clone();
    let body = test::read_body(res).await;
    Page {
        status,
        headers,
        body: String::from_utf8_lossy(&body).into_owned(),
    }
}

/// Calls the app with a `TestRequest`; the app's type cannot be named.
macro_rules! call {
    ($app:expr, $req:expr $(,)?) => {
        read(test::call_service($app, $req.to_request()).await)
    };
}

fn form(path: &str, body: &str) -> TestRequest {
    TestRequest::post()
        .uri(path)
        .insert_header((header::CONTENT_TYPE, "application/x-www-form-urlencoded"))
        .set_payload(body.to_owned())
}

fn upload_req(fields: Vec<TestFormField<'static>>) -> TestRequest {
    let (body, headers) = create_form_data_payload_and_headers_from_fields(fields);
    headers
        .into_iter()
        .fold(TestRequest::post().uri("/packages/upload"), |r, h| {
            r.insert_header(h)
        })
        .set_payload(body)
}

fn file(bytes: Vec<u8>) -> Vec<TestFormField<'static>> {
    vec![TestFormField::new("package", bytes).filename("wordcount.tar.gz")]
}

fn deploy_body(name: &str, package: &str, config: &str, workers: &str) -> String {
    deploy_body_env(name, package, config, workers, "")
}

fn deploy_body_env(name: &str, package: &str, config: &str, workers: &str, env: &str) -> String {
    serde_urlencoded::to_string([
        ("name", name),
        ("package", package),
        ("config", config),
        ("workers", workers),
        ("env", env),
    ])
    .unwrap()
}

#[actix_web::test]
async fn every_page_renders_as_html_and_unknown_pages_are_404_pages() {
    let f = fixture(None);
    let app = test::init_service(crate::app(f.state.clone())).await;
    for path in ["/", "/agents", "/topologies", "/packages", "/login"] {
        let p = call!(&app, TestRequest::get().uri(path)).await;
        assert_eq!(p.status, StatusCode::OK, "{path}: {}", p.body);
        assert!(p.is_html(), "{path}: {}", p.body);
        assert!(p.error().is_none(), "{path}: {:?}", p.error());
        assert!(p.headers.contains_key(header::CONTENT_SECURITY_POLICY));
    }
    let p = call!(&app, TestRequest::get().uri("/")).await;
    assert!(p.body.contains("id=\"agents-up\">0<"), "{}", p.body);
    assert!(p.body.contains("data-live"), "the overview updates live");
    assert!(
        p.body.contains("<noscript>"),
        "and says so without JavaScript"
    );
    let p = call!(&app, TestRequest::get().uri("/packages")).await;
    assert!(p.body.contains("enctype=\"multipart/form-data\""));
    assert!(p.body.contains("64.0 KiB"), "the upload limit is shown");

    let p = call!(&app, TestRequest::get().uri("/nothing-here")).await;
    assert_eq!(p.status, StatusCode::NOT_FOUND);
    assert!(p.is_html());
    assert!(p.error().unwrap().contains("/nothing-here"));
    let p = call!(&app, TestRequest::get().uri("/topologies/nope")).await;
    assert_eq!(p.status, StatusCode::NOT_FOUND);
    assert!(p.is_html() && p.error().unwrap().contains("no topology nope"));
    let p = call!(
        &app,
        TestRequest::get().uri("/topologies/nope/processes/server/log")
    )
    .await;
    assert_eq!(p.status, StatusCode::NOT_FOUND);
    assert!(p.is_html() && p.error().unwrap().contains("no topology nope"));
    // The API's unknown paths stay JSON.
    let p = call!(&app, TestRequest::get().uri("/api/v1/nothing")).await;
    assert_eq!(p.status, StatusCode::NOT_FOUND);
    assert!(p.body.starts_with('{'), "{}", p.body);
}

#[actix_web::test]
async fn uploads_show_what_went_wrong_on_the_page() {
    let f = fixture(None);
    let app = test::init_service(crate::app(f.state.clone())).await;

    // No file chosen: browsers send an empty part with no file name.
    let p = call!(
        &app,
        upload_req(vec![TestFormField::new("package", Vec::new()).filename("")]),
    )
    .await;
    assert_eq!(p.status, StatusCode::BAD_REQUEST);
    assert!(p.is_html());
    assert!(
        p.error().unwrap().contains("choose a package file"),
        "{:?}",
        p.error()
    );
    let p = call!(&app, upload_req(vec![TestFormField::new("other", "x")])).await;
    assert_eq!(p.status, StatusCode::BAD_REQUEST);
    assert!(p.error().unwrap().contains("choose a package file"));
    // Not a multipart form at all.
    let p = call!(&app, form("/packages/upload", "package=x")).await;
    assert_eq!(p.status, StatusCode::BAD_REQUEST);
    assert!(p.is_html() && p.error().unwrap().contains("reading the upload"));

    // Corrupt.
    let p = call!(&app, upload_req(file(b"not a package at all".to_vec()))).await;
    assert_eq!(p.status, StatusCode::BAD_REQUEST);
    assert!(p.error().unwrap().contains("refused"), "{:?}", p.error());

    // Too large, a little and a lot.
    let p = call!(&app, upload_req(file(vec![7u8; MAX_UPLOAD as usize + 10]))).await;
    assert_eq!(p.status, StatusCode::PAYLOAD_TOO_LARGE);
    assert!(p.is_html());
    assert!(p.error().unwrap().contains("64.0 KiB"), "{:?}", p.error());
    let p = call!(
        &app,
        upload_req(file(vec![7u8; 3 * MAX_UPLOAD as usize + (2 << 20)]))
    )
    .await;
    assert_eq!(p.status, StatusCode::PAYLOAD_TOO_LARGE);
    assert!(f.state.director.packages().is_empty());

    // Stored: Post/Redirect/Get with a message for the next page.
    let p = call!(&app, upload_req(file(f.archive.clone()))).await;
    assert_eq!(p.status, StatusCode::SEE_OTHER, "{}", p.body);
    assert_eq!(p.location(), format!("/packages?package={}", f.hash));
    let flash = p
        .cookies()
        .into_iter()
        .find(|c| c.starts_with("tempest_flash="))
        .unwrap();
    assert!(
        flash.contains("HttpOnly") && flash.contains("SameSite=Strict"),
        "{flash}"
    );
    let cookie = flash.split(';').next().unwrap().to_owned();
    let page = call!(
        &app,
        TestRequest::get()
            .uri(p.location())
            .insert_header((header::COOKIE, cookie.clone())),
    )
    .await;
    assert_eq!(page.status, StatusCode::OK);
    assert!(page.body.contains("id=\"flash\""), "{}", page.body);
    assert!(
        page.body.contains("package wordcount 0.1.0 stored"),
        "{}",
        page.body
    );
    assert!(
        page.cookies()
            .iter()
            .any(|c| c.starts_with("tempest_flash=;")),
        "the message is shown once: {:?}",
        page.cookies()
    );
    assert!(page
        .body
        .contains(&format!("<option value=\"{}\" selected", f.hash)));
    // The live script's polls leave the message alone.
    let poll = call!(
        &app,
        TestRequest::get()
            .uri("/packages")
            .insert_header((header::COOKIE, cookie))
            .insert_header(("x-tempest-live", "1")),
    )
    .await;
    assert!(!poll.body.contains("id=\"flash\"") && poll.cookies().is_empty());
    // Again: nothing changes.
    let p = call!(&app, upload_req(file(f.archive.clone()))).await;
    assert_eq!(p.status, StatusCode::SEE_OTHER);
    assert_eq!(f.state.director.packages().len(), 1);
}

#[actix_web::test]
async fn deploys_and_shows_refused_deploys_with_the_form_kept() {
    let f = fixture(None);
    f.state.director.upload(&f.archive).unwrap();
    let app = test::init_service(crate::app(f.state.clone())).await;

    let p = call!(
        &app,
        form(
            "/packages/deploy",
            &deploy_body("wc", &f.hash, "max_pendin = 3\n", ""),
        ),
    )
    .await;
    assert_eq!(p.status, StatusCode::BAD_REQUEST);
    assert!(p.is_html());
    assert!(p.error().unwrap().contains("max_pendin"), "{:?}", p.error());
    assert!(
        p.body.contains(">max_pendin = 3\n</textarea>"),
        "the form is kept"
    );
    assert!(p.body.contains("value=\"wc\""));

    for (body, status, words) in [
        (
            deploy_body("wc", &f.hash, "", "count=x"),
            400,
            "not TASK=COUNT",
        ),
        (
            deploy_body("wc", &f.hash, "", "nope=2"),
            400,
            "unknown task",
        ),
        (deploy_body("", &f.hash, "", ""), 400, "name"),
        (
            deploy_body("a/b", &f.hash, "", ""),
            400,
            "bad topology name",
        ),
        (
            deploy_body("wc", &"0".repeat(64), "", ""),
            404,
            "no package",
        ),
        (deploy_body("wc", "", "", ""), 400, "choose a package"),
        ("%zz=%".to_owned(), 400, ""),
        (
            deploy_body_env("wc", &f.hash, "", "", "JUST_A_NAME"),
            400,
            "NAME=value",
        ),
        (
            deploy_body_env("wc", &f.hash, "", "", "TEMPEST_X=1"),
            400,
            "TEMPEST_",
        ),
        (
            deploy_body("wc", &f.hash, &"#".repeat(300 * 1024), ""),
            413,
            "larger than",
        ),
    ] {
        let p = call!(&app, form("/packages/deploy", &body)).await;
        assert_eq!(
            p.status.as_u16(),
            status,
            "{}: {}",
            &body[..40.min(body.len())],
            p.body
        );
        assert!(p.is_html(), "{body}");
        assert!(
            p.error().unwrap().contains(words),
            "{body}: {:?}",
            p.error()
        );
    }
    assert!(f.state.director.topologies().is_empty());

    let body = deploy_body_env(
        "wc",
        &f.hash,
        "max_pending = 7\r\n",
        "count=3",
        "STORE=redis://h:1/0?a=b\r\n\r\n",
    );
    let p = call!(&app, form("/packages/deploy", &body)).await;
    assert_eq!(p.status, StatusCode::SEE_OTHER, "{}", p.body);
    assert_eq!(p.location(), "/topologies/wc");
    let d = f.state.director.topology("wc").unwrap();
    assert_eq!(d.summary.workers["count"], 3);
    assert_eq!(d.config, "max_pending = 7\n");
    // Shown masked; kept whole for the processes.
    assert_eq!(d.env["STORE"], "***");
    let p = call!(&app, TestRequest::get().uri("/topologies/wc")).await;
    assert!(p.body.contains("STORE=***"), "{}", p.body);
    let assignment = f
        .state
        .director
        .heartbeat(tempest_control::Heartbeat {
            agent_id: "a".into(),
            address: "a.test:7400".into(),
            node: Default::default(),
            processes: vec![],
        })
        .unwrap();
    let server = &assignment.processes[0];
    assert_eq!(server.env["STORE"], "redis://h:1/0?a=b");
    assert!(server.data_secret.is_some());

    let p = call!(&app, form("/packages/deploy", &body)).await;
    assert_eq!(p.status, StatusCode::CONFLICT);
    assert!(p.error().unwrap().contains("already deployed"));
}

#[actix_web::test]
async fn the_topology_page_and_its_buttons() {
    let f = fixture(None);
    f.state.director.upload(&f.archive).unwrap();
    let app = test::init_service(crate::app(f.state.clone())).await;
    let p = call!(
        &app,
        form("/packages/deploy", &deploy_body("wc", &f.hash, "", ""))
    )
    .await;
    assert_eq!(p.status, StatusCode::SEE_OTHER);

    let p = call!(&app, TestRequest::get().uri("/topologies/wc")).await;
    assert_eq!(p.status, StatusCode::OK);
    assert!(p.is_html());
    for needle in [
        "id=\"acked\"",
        "id=\"status\"",
        "id=\"workers-count\" data-value=\"2\"",
        "name=\"workers:count\" value=\"2\"",
        "<svg id=\"dag\"",
        "id=\"dag-task-split\"",
        "<svg id=\"throughput-chart\"",
        "<svg id=\"latency-chart\"",
        "action=\"/topologies/wc/stop\"",
        "action=\"/topologies/wc/kill\"",
    ] {
        assert!(p.body.contains(needle), "no {needle} in {}", p.body);
    }
    // The list pages show it too.
    for path in ["/", "/topologies"] {
        let p = call!(&app, TestRequest::get().uri(path)).await;
        assert!(p.body.contains("href=\"/topologies/wc\""), "{path}");
    }

    // Rebalance: only what changes is sent on; nonsense is refused.
    let p = call!(
        &app,
        form(
            "/topologies/wc/rebalance",
            "workers%3Acount=2&workers%3Asplit=1"
        )
    )
    .await;
    assert_eq!(p.status, StatusCode::BAD_REQUEST);
    assert!(p.is_html() && p.error().unwrap().contains("nothing to rebalance"));
    let p = call!(
        &app,
        form("/topologies/wc/rebalance", "workers%3Acount=many")
    )
    .await;
    assert_eq!(p.status, StatusCode::BAD_REQUEST);
    assert!(p.error().unwrap().contains("whole number"));
    let p = call!(&app, form("/topologies/wc/rebalance", "workers%3Acount=0")).await;
    assert_eq!(p.status, StatusCode::BAD_REQUEST);
    assert!(
        p.error().unwrap().contains("workers must be 1 to"),
        "{:?}",
        p.error()
    );
    let generation = f.state.director.topology("wc").unwrap().summary.generation;
    let p = call!(
        &app,
        form(
            "/topologies/wc/rebalance",
            "workers%3Acount=3&workers%3Asplit=1"
        )
    )
    .await;
    assert_eq!(p.status, StatusCode::SEE_OTHER, "{}", p.body);
    assert_eq!(p.location(), "/topologies/wc");
    let d = f.state.director.topology("wc").unwrap();
    assert_eq!(
        (d.summary.workers["count"], d.summary.generation),
        (3, generation + 1)
    );
    let p = call!(&app, TestRequest::get().uri("/topologies/wc")).await;
    assert!(p.body.contains("id=\"workers-count\" data-value=\"3\""));

    // Stop, stop again (refused, on the page), start, kill.
    let p = call!(&app, form("/topologies/wc/stop", "")).await;
    assert_eq!(p.status, StatusCode::SEE_OTHER);
    let p = call!(&app, form("/topologies/wc/stop", "")).await;
    assert_eq!(p.status, StatusCode::CONFLICT);
    assert!(
        p.is_html() && p.error().unwrap().contains("cannot stop"),
        "{:?}",
        p.error()
    );
    assert!(
        p.body.contains("id=\"start\""),
        "a stopped topology offers start"
    );
    let p = call!(&app, form("/topologies/wc/start", "")).await;
    assert_eq!(p.status, StatusCode::SEE_OTHER);
    let p = call!(&app, form("/topologies/wc/kill", "")).await;
    assert_eq!(p.status, StatusCode::SEE_OTHER);
    assert_eq!(p.location(), "/topologies");
    assert!(f.state.director.topologies().is_empty());
    for action in ["stop", "start", "kill", "rebalance"] {
        let p = call!(
            &app,
            form(&format!("/topologies/wc/{action}"), "workers%3Acount=1")
        )
        .await;
        assert_eq!(p.status, StatusCode::NOT_FOUND, "{action}");
        assert!(p.is_html() && p.error().unwrap().contains("no topology wc"));
    }
}

/// The session cookie a login answer sets, as `name=value`.
#[actix_web::test]
async fn the_topology_page_and_api_show_every_source() {
    let f = fixture(None);
    f.state.director.upload(&f.archive).unwrap();
    let app = test::init_service(crate::app(f.state.clone())).await;
    let p = call!(
        &app,
        form("/packages/deploy", &deploy_body("wc", &f.hash, "", ""))
    )
    .await;
    assert_eq!(p.status, StatusCode::SEE_OTHER);
    let text = r#"tempest_source_acked_total{topology="wc",host="h",source="orders"} 100
tempest_source_acked_total{topology="wc",host="h",source="refunds"} 10
tempest_source_healthy{topology="wc",host="h",source="orders"} 1
tempest_source_healthy{topology="wc",host="h",source="refunds"} 0
tempest_pipeline_source_edge{topology="wc",host="h",source="orders",to="split"} 1
tempest_pipeline_source_edge{topology="wc",host="h",source="refunds",to="split"} 1
tempest_pipeline_edge{topology="wc",host="h",from="split",to="count",grouping="key"} 1
tempest_pipeline_edge{topology="wc",host="h",from="count",to="output",grouping="shuffle"} 1
"#;
    let samples = crate::metrics::parse(text).unwrap();
    f.state.director.record_metrics(&samples, now_ms()).unwrap();

    let p = call!(&app, TestRequest::get().uri("/topologies/wc")).await;
    assert_eq!(p.status, StatusCode::OK);
    for needle in [
        "id=\"dag-source-orders\" class=\"node source\"",
        "id=\"dag-source-refunds\" class=\"node source unhealthy\"",
        "<title>source refunds: unhealthy</title>",
        "<title>refunds → split</title>",
        "<h2>Sources</h2>",
        "id=\"source-healthy\">no<",
        "id=\"source-row-orders\"",
        "<span class=\"badge unhealthy\" id=\"source-health-refunds\">unhealthy</span>",
        "<span class=\"badge healthy\" id=\"source-health-orders\">healthy</span>",
    ] {
        assert!(p.body.contains(needle), "no {needle} in {}", p.body);
    }

    let p = call!(&app, TestRequest::get().uri("/api/v1/topologies/wc")).await;
    assert_eq!(p.status, StatusCode::OK);
    let v: serde_json::Value = serde_json::from_str(&p.body).unwrap();
    assert_eq!(v["acked"], 110);
    assert_eq!(v["source"]["healthy"], false);
    assert_eq!(v["sources"]["orders"]["healthy"], true);
    assert_eq!(v["sources"]["orders"]["acked"], 100);
    assert_eq!(v["sources"]["refunds"]["healthy"], false);
    assert_eq!(
        v["source_edges"],
        serde_json::json!([
            {"source": "orders", "to": "split"},
            {"source": "refunds", "to": "split"}
        ])
    );
    // The OpenAPI document describes them.
    let p = call!(&app, TestRequest::get().uri("/api/v1/openapi.json")).await;
    let doc: serde_json::Value = serde_json::from_str(&p.body).unwrap();
    let schemas = &doc["components"]["schemas"];
    assert!(schemas["PerSourceFigures"]["properties"]["healthy"].is_object());
    assert!(schemas["SourceEdge"]["properties"]["source"].is_object());
    let detail = &schemas["TopologyDetail"]["allOf"][1]["properties"];
    assert!(
        detail["sources"]["additionalProperties"].is_object(),
        "{detail}"
    );
    assert!(detail["source_edges"]["items"].is_object(), "{detail}");
}

fn session_of(p: &Page) -> String {
    p.cookies()
        .into_iter()
        .find(|c| c.starts_with("tempest_session="))
        .unwrap_or_else(|| panic!("no session cookie: {:?}", p.cookies()))
        .split(';')
        .next()
        .unwrap()
        .to_owned()
}

#[actix_web::test]
async fn with_a_token_every_page_needs_a_login_and_changes_show_why_on_the_page() {
    let f = fixture(Some(TOKEN));
    f.state.director.upload(&f.archive).unwrap();
    let app = test::init_service(crate::app(f.state.clone())).await;

    // Reading needs a login: the login page, showing nothing else.
    for path in ["/", "/agents", "/topologies", "/packages", "/topologies/wc"] {
        let p = call!(&app, TestRequest::get().uri(path)).await;
        assert_eq!(p.status, StatusCode::UNAUTHORIZED, "{path}");
        assert!(
            p.is_html() && p.body.contains("id=\"login-form\""),
            "{path}"
        );
        assert!(!p.body.contains(&f.hash), "{path} shows no package");
        assert!(p.error().unwrap().contains("log in"), "{path}");
    }
    // Its form returns to the page asked for.
    let p = call!(&app, TestRequest::get().uri("/topologies?x=1")).await;
    assert!(p.body.contains("value=\"/topologies?x=1\""), "{}", p.body);

    // Every form is refused with the login page and the reason.
    let deploy = deploy_body("wc", &f.hash, "", "");
    for (path, body) in [
        ("/packages/deploy", deploy.as_str()),
        ("/packages/upload", ""),
        ("/topologies/wc/stop", ""),
        ("/topologies/wc/start", ""),
        ("/topologies/wc/kill", ""),
        ("/topologies/wc/rebalance", "workers%3Acount=3"),
    ] {
        let p = call!(&app, form(path, body)).await;
        assert_eq!(p.status, StatusCode::UNAUTHORIZED, "{path}");
        assert!(p.is_html(), "{path}: {}", p.body);
        assert!(
            p.error().unwrap().contains("log in"),
            "{path}: {:?}",
            p.error()
        );
    }
    assert!(f.state.director.topologies().is_empty());
    let p = call!(&app, form("/packages/deploy", &deploy)).await;
    assert!(
        p.body.contains("value=\"/packages\""),
        "returns to the form's page"
    );

    // A wrong token, then the right one.
    let p = call!(&app, form("/login", "token=wrong&next=%2Fpackages")).await;
    assert_eq!(p.status, StatusCode::UNAUTHORIZED);
    assert!(p.is_html() && p.error().unwrap().contains("neither the admin token"));
    let body = format!("token={TOKEN}&next=%2Fpackages");
    let p = call!(&app, form("/login", &body)).await;
    assert_eq!(p.status, StatusCode::SEE_OTHER);
    assert_eq!(p.location(), "/packages");
    let login = p
        .cookies()
        .into_iter()
        .find(|c| c.starts_with("tempest_session="))
        .unwrap();
    assert!(
        login.contains("HttpOnly") && login.contains("SameSite=Strict"),
        "{login}"
    );
    assert!(login.contains("Max-Age=43200"), "expires in 12 h: {login}");
    assert!(!login.contains("Secure"), "no TLS here: {login}");
    let cookie = session_of(&p);
    assert_eq!(cookie.len(), "tempest_session=".len() + 64, "{cookie}");
    assert!(!cookie.contains(TOKEN), "a session id, not the token");
    let p = call!(
        &app,
        form("/packages/deploy", &deploy).insert_header((header::COOKIE, cookie.clone())),
    )
    .await;
    assert_eq!(p.status, StatusCode::SEE_OTHER, "{}", p.body);
    let p = call!(
        &app,
        TestRequest::get()
            .uri("/topologies/wc")
            .insert_header((header::COOKIE, cookie.clone())),
    )
    .await;
    assert!(p.body.contains("id=\"logout\""));
    assert!(p.body.contains("signed in as admin"), "{}", p.body);
    assert!(p.body.contains("id=\"stop\""));
    // The API takes the cookie as it takes the header.
    let p = call!(
        &app,
        TestRequest::post()
            .uri("/api/v1/topologies/wc/stop")
            .insert_header((header::COOKIE, cookie.clone())),
    )
    .await;
    assert_eq!(p.status, StatusCode::OK, "{}", p.body);
    let p = call!(&app, TestRequest::post().uri("/api/v1/topologies/wc/start")).await;
    assert_eq!(p.status, StatusCode::UNAUTHORIZED);
    assert!(
        p.body.starts_with('{'),
        "the API still answers JSON: {}",
        p.body
    );
    let p = call!(
        &app,
        TestRequest::post()
            .uri("/api/v1/topologies/wc/start")
            .insert_header((header::COOKIE, "tempest_session=wrong")),
    )
    .await;
    assert_eq!(p.status, StatusCode::UNAUTHORIZED);

    // Logging out ends the session and returns to the page: the old cookie
    // is refused from then on.
    let p = call!(
        &app,
        form("/logout", "")
            .insert_header((header::REFERER, "http://h:1/topologies/wc"))
            .insert_header((header::COOKIE, cookie.clone())),
    )
    .await;
    assert_eq!(p.status, StatusCode::SEE_OTHER);
    assert_eq!(p.location(), "/topologies/wc");
    assert!(p
        .cookies()
        .iter()
        .any(|c| c.starts_with("tempest_session=;")));
    assert!(f.state.auth.sessions.is_empty());
    let p = call!(
        &app,
        TestRequest::get()
            .uri("/topologies/wc")
            .insert_header((header::COOKIE, cookie.clone())),
    )
    .await;
    assert_eq!(
        p.status,
        StatusCode::UNAUTHORIZED,
        "the old cookie is refused"
    );
    let p = call!(
        &app,
        TestRequest::post()
            .uri("/api/v1/topologies/wc/start")
            .insert_header((header::COOKIE, cookie)),
    )
    .await;
    assert_eq!(p.status, StatusCode::UNAUTHORIZED);
}

#[actix_web::test]
async fn a_viewer_reads_everything_but_env_values_and_changes_nothing() {
    let f = fixture_all();
    f.state.director.upload(&f.archive).unwrap();
    let env = "DB_PASSWORD=hunter2-very-secret\nOTHER=x";
    let body = deploy_body_env("wc", &f.hash, "", "", env);
    let app = test::init_service(crate::app(f.state.clone())).await;
    let admin = format!("Bearer {TOKEN}");
    let viewer = format!("Bearer {VIEWER}");
    let agent = format!("Bearer {AGENT}");
    let p = call!(
        &app,
        form("/packages/deploy", &body).insert_header((header::AUTHORIZATION, admin.as_str())),
    )
    .await;
    assert_eq!(p.status, StatusCode::SEE_OTHER, "{}", p.body);

    // The viewer token reads the API, env values masked (for everyone).
    for auth in [&viewer, &admin] {
        let p = call!(
            &app,
            TestRequest::get()
                .uri("/api/v1/topologies/wc")
                .insert_header((header::AUTHORIZATION, auth.as_str())),
        )
        .await;
        assert_eq!(p.status, StatusCode::OK, "{}", p.body);
        let v: serde_json::Value = serde_json::from_str(&p.body).unwrap();
        assert_eq!(v["env"]["DB_PASSWORD"], "***", "{v}");
        assert_eq!(v["env"]["OTHER"], "***", "{v}");
        assert_eq!(v["data_secret"], true, "{v}");
        assert!(!p.body.contains("hunter2"), "{}", p.body);
    }
    // ... but no archive (that is for agents and admins), and no change.
    let archive = format!("/api/v1/packages/{}/archive", f.hash);
    let p = call!(
        &app,
        TestRequest::get()
            .uri(&archive)
            .insert_header((header::AUTHORIZATION, viewer.as_str())),
    )
    .await;
    assert_eq!(p.status, StatusCode::FORBIDDEN, "{}", p.body);
    for (path, auth) in [
        ("/api/v1/topologies/wc/stop", &viewer),
        ("/api/v1/topologies/wc/kill", &viewer),
        ("/api/v1/packages", &viewer),
        ("/api/v1/topologies", &viewer),
        ("/api/v1/topologies/wc/stop", &agent),
        ("/api/v1/packages", &agent),
        ("/api/v1/topologies", &agent),
    ] {
        let p = call!(
            &app,
            TestRequest::post()
                .uri(path)
                .insert_header((header::AUTHORIZATION, auth.as_str()))
                .insert_header((header::CONTENT_TYPE, "application/json"))
                .set_payload(body.clone()),
        )
        .await;
        assert_eq!(p.status, StatusCode::FORBIDDEN, "{path} {auth}: {}", p.body);
    }
    // The agent token downloads archives and reads nothing else.
    let p = call!(
        &app,
        TestRequest::get()
            .uri(&archive)
            .insert_header((header::AUTHORIZATION, agent.as_str())),
    )
    .await;
    assert_eq!(p.status, StatusCode::OK);
    let p = call!(
        &app,
        TestRequest::get()
            .uri("/api/v1/topologies/wc")
            .insert_header((header::AUTHORIZATION, agent.as_str())),
    )
    .await;
    assert_eq!(p.status, StatusCode::FORBIDDEN, "{}", p.body);
    assert_eq!(
        f.state.director.topology("wc").unwrap().summary.state,
        crate::lifecycle::Lifecycle::Running
    );

    // In the web UI the viewer sees pages without their forms, values
    // masked; a form posted anyway is refused on its page.
    let p = call!(&app, form("/login", &format!("token={AGENT}"))).await;
    assert_eq!(p.status, StatusCode::FORBIDDEN, "agents do not log in");
    let p = call!(&app, form("/login", &format!("token={VIEWER}&next=%2F"))).await;
    assert_eq!(p.status, StatusCode::SEE_OTHER, "{}", p.body);
    let cookie = session_of(&p);
    let p = call!(
        &app,
        TestRequest::get()
            .uri("/topologies/wc")
            .insert_header((header::COOKIE, cookie.clone())),
    )
    .await;
    assert_eq!(p.status, StatusCode::OK);
    assert!(p.body.contains("signed in as viewer (read only)"));
    assert!(p.body.contains("DB_PASSWORD=***"), "{}", p.body);
    assert!(!p.body.contains("hunter2"));
    assert!(!p.body.contains("id=\"stop\"") && !p.body.contains("id=\"rebalance\""));
    let p = call!(
        &app,
        form("/topologies/wc/stop", "").insert_header((header::COOKIE, cookie.clone())),
    )
    .await;
    assert_eq!(p.status, StatusCode::FORBIDDEN);
    assert!(p.body.contains("<h1>wc</h1>") || p.body.contains("Topology wc"));
    assert!(
        p.error().unwrap().contains("admin token"),
        "{:?}",
        p.error()
    );
    let p = call!(
        &app,
        TestRequest::get()
            .uri("/packages")
            .insert_header((header::COOKIE, cookie)),
    )
    .await;
    assert!(p.body.contains("id=\"read-only\"") && !p.body.contains("id=\"upload\""));
    assert_eq!(
        f.state.director.topology("wc").unwrap().summary.state,
        crate::lifecycle::Lifecycle::Running
    );
}

#[actix_web::test]
async fn a_rebound_name_is_refused_and_failed_logins_are_limited() {
    let f = fixture(Some(TOKEN));
    let app = test::init_service(crate::app(f.state.clone())).await;
    // DNS rebinding: another site's name, bound to the director's address,
    // in both Host and Origin (so the request looks same-origin).
    let deploy = deploy_body("wc", &f.hash, "", "");
    for req in [
        TestRequest::get().uri("/api/v1/topologies"),
        TestRequest::post()
            .uri("/api/v1/packages")
            .set_payload(f.archive.clone()),
        form("/packages/deploy", &deploy),
    ] {
        let p = call!(
            &app,
            req.insert_header((header::HOST, "attacker.example"))
                .insert_header(("origin", "http://attacker.example"))
                .insert_header((header::AUTHORIZATION, format!("Bearer {TOKEN}")))
        )
        .await;
        assert_eq!(p.status, StatusCode::MISDIRECTED_REQUEST, "{}", p.body);
        assert!(p.body.contains("attacker.example"), "{}", p.body);
    }
    assert!(f.state.director.packages().is_empty());
    // Its own names pass.
    for host in ["localhost:7300", "127.0.0.1:7300", "[::1]:7300"] {
        let p = call!(
            &app,
            TestRequest::get()
                .uri("/api/v1/cluster")
                .insert_header((header::HOST, host))
                .insert_header((header::AUTHORIZATION, format!("Bearer {TOKEN}")))
        )
        .await;
        assert_eq!(p.status, StatusCode::OK, "{host}: {}", p.body);
    }

    // Wrong tokens at /login from one address: after ten, 429, even with
    // the right token; another address is not affected.
    let me: std::net::SocketAddr = "10.9.8.7:40000".parse().unwrap();
    let other: std::net::SocketAddr = "10.9.8.6:40000".parse().unwrap();
    for _ in 0..crate::auth::MAX_FAILURES {
        let p = call!(&app, form("/login", "token=wrong").peer_addr(me)).await;
        assert_eq!(p.status, StatusCode::UNAUTHORIZED);
    }
    let p = call!(
        &app,
        form("/login", &format!("token={TOKEN}")).peer_addr(me)
    )
    .await;
    assert_eq!(p.status, StatusCode::TOO_MANY_REQUESTS, "{}", p.body);
    assert!(p.headers.contains_key(header::RETRY_AFTER));
    let p = call!(
        &app,
        TestRequest::get()
            .uri("/api/v1/cluster")
            .peer_addr(me)
            .insert_header((header::AUTHORIZATION, format!("Bearer {TOKEN}")))
    )
    .await;
    assert_eq!(p.status, StatusCode::TOO_MANY_REQUESTS, "the API too");
    let p = call!(
        &app,
        form("/login", &format!("token={TOKEN}")).peer_addr(other)
    )
    .await;
    assert_eq!(p.status, StatusCode::SEE_OTHER, "{}", p.body);
}

#[test]
fn forms_are_read_strictly() {
    assert_eq!(safe_next(Some("/topologies/wc")), "/topologies/wc");
    assert_eq!(safe_next(Some("//evil.example/")), "/");
    assert_eq!(safe_next(Some("https://evil.example/")), "/");
    assert_eq!(safe_next(Some("/\\evil")), "/");
    // Browsers drop tabs and newlines from a Location: `//evil.example`.
    assert_eq!(safe_next(Some("/\t/evil.example")), "/");
    assert_eq!(safe_next(Some("/\n/evil.example")), "/");
    assert_eq!(
        safe_next(Some("/topologies?x=1&y=%2F")),
        "/topologies?x=1&y=%2F"
    );
    assert_eq!(safe_next(None), "/");
    for text in [
        " split=2, count = 4\n",
        "split=2 count=4",
        "split = 2;\r\ncount=4",
    ] {
        let w = parse_workers(text).unwrap();
        assert_eq!((w["split"], w["count"]), (2, 4), "{text}");
    }
    assert!(parse_workers(" ").unwrap().is_empty());
    for bad in ["=3", "a=-1", "a", "a=1=2", "a b=1"] {
        let e = parse_workers(bad).unwrap_err();
        assert!(e.to_string().contains("TASK=COUNT"), "{bad}: {e}");
    }
    let current = [("a".to_owned(), 1), ("b".to_owned(), 2)]
        .into_iter()
        .collect();
    let pairs = |v: &[(&str, &str)]| -> Vec<(String, String)> {
        v.iter()
            .map(|(a, b)| ((*a).to_owned(), (*b).to_owned()))
            .collect()
    };
    let changes = rebalance_request(
        &pairs(&[("workers:a", "1"), ("workers:b", " 3 "), ("x", "y")]),
        &current,
    )
    .unwrap();
    assert_eq!(
        changes.into_iter().collect::<Vec<_>>(),
        [("b".to_owned(), 3)]
    );
}

#[actix_web::test]
async fn pages_of_other_sites_cannot_drive_the_director_and_any_token_logs_in() {
    // A token a cookie could not hold as it is.
    let token = "x;y=z\"q\",w";
    let f = fixture(Some(token));
    f.state.director.upload(&f.archive).unwrap();
    let app = test::init_service(crate::app(f.state.clone())).await;
    let deploy = deploy_body("wc", &f.hash, "", "");

    let body = format!(
        "token={}&next=%2Fpackages",
        form_urlencoded_byte_serialize(token)
    );
    let p = call!(&app, form("/login", &body)).await;
    assert_eq!(p.status, StatusCode::SEE_OTHER, "{}", p.body);
    let cookie = session_of(&p);
    assert!(
        !cookie.contains("x;"),
        "the cookie holds a session id, not the token: {cookie}"
    );

    // Another site's page, through the logged-in browser: refused, with or
    // without the cookie, and nothing happens.
    for (name, value) in [
        ("origin", "http://evil.example"),
        ("origin", "null"),
        ("sec-fetch-site", "cross-site"),
    ] {
        let p = call!(
            &app,
            form("/packages/deploy", &deploy)
                .insert_header((header::COOKIE, cookie.clone()))
                .insert_header((name, value)),
        )
        .await;
        assert_eq!(p.status, StatusCode::FORBIDDEN, "{name}: {value}");
        let p = call!(
            &app,
            TestRequest::post()
                .uri("/api/v1/topologies")
                .insert_header((name, value))
        )
        .await;
        assert_eq!(p.status, StatusCode::FORBIDDEN, "{name}: {value}");
    }
    assert!(f.state.director.topologies().is_empty());

    // The director's own page (same origin) with the cookie works.
    let p = call!(
        &app,
        form("/packages/deploy", &deploy)
            .insert_header((header::COOKIE, cookie))
            .insert_header(("origin", "http://localhost:8080"))
            .insert_header((header::HOST, "localhost:8080"))
            .insert_header(("sec-fetch-site", "same-origin")),
    )
    .await;
    assert_eq!(p.status, StatusCode::SEE_OTHER, "{}", p.body);
    assert_eq!(f.state.director.topologies().len(), 1);
}

/// `application/x-www-form-urlencoded` bytes of a value.
fn form_urlencoded_byte_serialize(v: &str) -> String {
    v.bytes()
        .map(|b| match b {
            b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'*' => {
                (b as char).to_string()
            }
            b' ' => "+".into(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}
