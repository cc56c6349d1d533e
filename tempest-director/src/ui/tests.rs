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
    let dir = tempfile::tempdir().unwrap();
    let director = Director::open(
        Settings {
            data_dir: dir.path().join("data"),
            agent_timeout: Duration::from_secs(10),
            max_upload: MAX_UPLOAD,
        },
        Box::new(LeastLoaded),
    )
    .unwrap();
    let (archive, hash) = package(dir.path(), "wordcount", Some(TOML));
    Fixture {
        _dir: dir,
        state: web::Data::new(AppState {
            director: Arc::new(director),
            token: token.map(str::to_owned),
        }),
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
    assert_eq!(d.env["STORE"], "redis://h:1/0?a=b");
    let p = call!(&app, TestRequest::get().uri("/topologies/wc")).await;
    assert!(p.body.contains("STORE=redis://h:1/0?a=b"), "{}", p.body);

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

#[actix_web::test]
async fn with_a_token_changes_need_a_login_and_show_why_on_the_page() {
    let f = fixture(Some(TOKEN));
    f.state.director.upload(&f.archive).unwrap();
    let app = test::init_service(crate::app(f.state.clone())).await;

    // Reading needs nothing.
    let p = call!(&app, TestRequest::get().uri("/packages")).await;
    assert_eq!(p.status, StatusCode::OK);
    assert!(p.body.contains("id=\"login-link\""));

    // Every form is refused with its page and the reason.
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
    assert!(p.body.contains("<h1>Packages</h1>"), "the form's own page");

    // A wrong token, then the right one.
    let p = call!(&app, form("/login", "token=wrong&next=%2Fpackages")).await;
    assert_eq!(p.status, StatusCode::UNAUTHORIZED);
    assert!(p.is_html() && p.error().unwrap().contains("not the cluster token"));
    let body = format!("token={TOKEN}&next=%2Fpackages");
    let p = call!(&app, form("/login", &body)).await;
    assert_eq!(p.status, StatusCode::SEE_OTHER);
    assert_eq!(p.location(), "/packages");
    let login = p
        .cookies()
        .into_iter()
        .find(|c| c.starts_with("tempest_token="))
        .unwrap();
    assert!(
        login.contains("HttpOnly") && login.contains("SameSite=Strict"),
        "{login}"
    );
    let cookie = login.split(';').next().unwrap().to_owned();
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
    // The API takes the cookie as it takes the header.
    let p = call!(
        &app,
        TestRequest::post()
            .uri("/api/v1/topologies/wc/stop")
            .insert_header((header::COOKIE, cookie)),
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
            .insert_header((header::COOKIE, "tempest_token=wrong")),
    )
    .await;
    assert_eq!(p.status, StatusCode::UNAUTHORIZED);

    // Logging out clears the cookie and returns to the page.
    let p = call!(
        &app,
        form("/logout", "").insert_header((header::REFERER, "http://h:1/topologies/wc")),
    )
    .await;
    assert_eq!(p.status, StatusCode::SEE_OTHER);
    assert_eq!(p.location(), "/topologies/wc");
    assert!(p.cookies().iter().any(|c| c.starts_with("tempest_token=;")));
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
    let token = "x;y=z \"q\", w";
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
    let cookie = p
        .cookies()
        .into_iter()
        .find(|c| c.starts_with("tempest_token="))
        .unwrap()
        .split(';')
        .next()
        .unwrap()
        .to_owned();
    assert!(
        !cookie.contains("x"),
        "the cookie holds a digest, not the token: {cookie}"
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
