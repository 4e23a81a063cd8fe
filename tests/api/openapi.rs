//! The OpenAPI document covers every route, `/docs` renders it in a real browser, and a
//! TypeScript client generated from the committed document type-checks.

use std::collections::BTreeSet;
use std::process::Command;

use reqwest::{Method, StatusCode};
use serde_json::Value;

use crate::helpers::TestApp;

/// Every operation of the contract (`docs/api.md`).
const CONTRACT: &[(&str, &str)] = &[
    ("PUT", "/v1/warehouses/{code}"),
    ("GET", "/v1/warehouses"),
    ("GET", "/v1/warehouses/{code}"),
    ("PUT", "/v1/skus/{sku}"),
    ("GET", "/v1/skus/{sku}"),
    ("PUT", "/v1/channels/{code}"),
    ("GET", "/v1/channels"),
    ("GET", "/v1/channels/{code}"),
    ("POST", "/v1/stock/receive"),
    ("POST", "/v1/stock/adjust"),
    ("POST", "/v1/stock/transfer"),
    ("PUT", "/v1/stock/{sku}/{warehouse}"),
    ("GET", "/v1/stock/{sku}"),
    ("GET", "/v1/availability"),
    ("GET", "/v1/stock"),
    ("POST", "/v1/reservations"),
    ("POST", "/v1/reservations/plan"),
    ("GET", "/v1/reservations/{id}"),
    ("GET", "/v1/reservations"),
    ("POST", "/v1/reservations/{id}/fulfil"),
    ("POST", "/v1/reservations/{id}/release"),
    ("POST", "/v1/reservations/{id}/extend"),
    ("PUT", "/v1/reservations/{id}/lines"),
    ("GET", "/v1/ledger"),
    ("GET", "/v1/events"),
    ("GET", "/v1/events/stream"),
    ("PUT", "/v1/webhooks/{name}"),
    ("GET", "/v1/webhooks"),
    ("GET", "/v1/webhooks/{name}"),
    ("DELETE", "/v1/webhooks/{name}"),
    ("GET", "/health/live"),
    ("GET", "/health/ready"),
    ("GET", "/metrics"),
];

async fn document(app: &TestApp) -> Value {
    let (status, doc) = app.get("/openapi.json").await;
    assert_eq!(status, StatusCode::OK);
    doc
}

fn operations(doc: &Value) -> BTreeSet<(String, String)> {
    doc["paths"]
        .as_object()
        .unwrap()
        .iter()
        .flat_map(|(path, ops)| ops.as_object().unwrap().keys().map(move |m| (m.to_uppercase(), path.clone())))
        .collect()
}

#[tokio::test]
async fn the_document_describes_every_route_and_every_described_route_exists() {
    let app = TestApp::spawn().await;
    let doc = document(&app).await;
    assert!(doc["openapi"].as_str().unwrap().starts_with("3.1"));
    let documented = operations(&doc);
    for (method, path) in CONTRACT {
        assert!(documented.contains(&((*method).to_owned(), (*path).to_owned())), "{method} {path} is not documented");
    }
    // And the other way round: the router answers every documented operation (not 404/405).
    for (method, path) in &documented {
        let concrete = path.replace("{id}", "0196f6a0-0000-7000-8000-000000000000").replace(['{', '}'], "");
        let method = Method::from_bytes(method.as_bytes()).unwrap();
        let res = app.client.request(method.clone(), app.url(&concrete)).send().await.unwrap();
        let status = res.status();
        // The event stream never ends: its headers are answer enough.
        let body: Value = if path.ends_with("/stream") { Value::Null } else { res.json().await.unwrap_or(Value::Null) };
        let unrouted = status == StatusCode::METHOD_NOT_ALLOWED || body["detail"] == "no such resource";
        assert!(!unrouted, "{method} {path} is documented but not routed ({status})");
    }
}

#[tokio::test]
async fn the_document_names_the_problem_codes_the_key_header_and_the_auth_scheme() {
    let app = TestApp::spawn().await;
    let doc = document(&app).await;
    let codes = doc["components"]["schemas"]["ProblemCode"]["enum"].as_array().unwrap();
    for code in
        ["insufficient_stock", "duplicate_order", "reservation_not_active", "idempotency_key_reused", "unavailable"]
    {
        assert!(codes.iter().any(|c| c == code), "{code}");
    }
    let key = &doc["components"]["parameters"]["IdempotencyKey"];
    assert_eq!((key["name"].as_str(), key["in"].as_str()), (Some("Idempotency-Key"), Some("header")), "{key}");
    let description = doc["paths"]["/v1/reservations"]["post"]["description"].as_str().unwrap();
    assert!(description.contains("Idempotency-Key"), "{description}");
    assert_eq!(doc["components"]["securitySchemes"]["api_key"]["scheme"], "bearer");
    let conflict = &doc["paths"]["/v1/reservations"]["post"]["responses"]["409"]["content"];
    assert!(conflict["application/problem+json"].is_object(), "{conflict}");
}

fn chromium() -> Option<String> {
    ["chromium", "chromium-browser", "google-chrome"]
        .into_iter()
        .find(|b| Command::new(b).arg("--version").output().is_ok_and(|o| o.status.success()))
        .map(str::to_owned)
}

#[tokio::test]
async fn the_docs_page_renders_the_reservations_operation_offline_in_a_browser() {
    let Some(browser) = chromium() else {
        // CI installs Chromium (.ci/run); on a developer machine without it, say so loudly.
        crate::helpers::skip(
            "openapi::the_docs_page_renders_the_reservations_operation_offline_in_a_browser",
            "no Chromium installed: apt-get install chromium",
        );
        return;
    };
    let app = TestApp::spawn().await;
    let url = app.url("/docs/");
    let profile = std::env::temp_dir().join(format!("inventory-chromium-{}", std::process::id()));
    let out = tokio::task::spawn_blocking(move || {
        Command::new(browser)
            .args([
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--no-first-run",
                &format!("--user-data-dir={}", profile.display()),
                "--virtual-time-budget=15000",
                "--dump-dom",
                &url,
            ])
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    let dom = String::from_utf8_lossy(&out.stdout);
    // Rendered by Swagger UI's JavaScript (served by the binary), not present in the static HTML.
    assert!(dom.contains("opblock-summary-path") && dom.contains("/v1/reservations"), "not rendered: {dom:.2000}");
}

/// `docs/openapi.json` is the document the service serves, committed so that client generators
/// and reviewers can use it without running anything. A change of the API shows up here first:
/// `UPDATE_OPENAPI=1 cargo test --test api committed_openapi` rewrites the file (never under CI).
#[tokio::test]
async fn the_committed_openapi_json_is_the_document_the_service_serves() {
    let app = TestApp::spawn().await;
    let served = document(&app).await;
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/openapi.json");
    if std::env::var_os("UPDATE_OPENAPI").is_some() && !crate::helpers::in_ci() {
        std::fs::write(&path, serde_json::to_string_pretty(&served).unwrap() + "\n").unwrap();
    }
    let committed: Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    assert!(
        committed == served,
        "docs/openapi.json differs from what the service serves: \
         run `UPDATE_OPENAPI=1 cargo test --test api committed_openapi` and commit the file"
    );
}

/// Client generators name their functions after the operation ids: each operation has one, no two
/// share it, and each is a camelCase verb phrase (`reserveStock`, `getAvailability`, …).
#[tokio::test]
async fn every_operation_has_its_own_meaningful_operation_id() {
    let app = TestApp::spawn().await;
    let doc = document(&app).await;
    let mut seen = BTreeSet::new();
    for (path, ops) in doc["paths"].as_object().unwrap() {
        for (method, op) in ops.as_object().unwrap() {
            let id = op["operationId"].as_str().unwrap_or_else(|| panic!("{method} {path} has no operationId"));
            assert!(seen.insert(id.to_owned()), "{id} is used twice (again at {method} {path})");
            let verb = ["get", "list", "put", "reserve", "plan", "fulfil", "release", "extend", "receive", "adjust"]
                .iter()
                .chain(&["transfer", "import", "stream", "delete"])
                .any(|v| id.starts_with(v));
            assert!(verb && id.chars().all(|c| c.is_ascii_alphanumeric()), "{method} {path}: `{id}`");
        }
    }
    assert!(seen.len() >= CONTRACT.len(), "every operation of the contract was looked at: {}", seen.len());
}

/// Every operation says in a line what it is for and explains itself in a description; the
/// failures any request can meet are declared once (`components/responses`) and referred to.
#[tokio::test]
async fn every_operation_has_a_summary_a_description_and_its_failures() {
    let app = TestApp::spawn().await;
    let doc = document(&app).await;
    for (path, ops) in doc["paths"].as_object().unwrap() {
        for (method, op) in ops.as_object().unwrap() {
            let summary = op["summary"].as_str().unwrap_or_default();
            let description = op["description"].as_str().unwrap_or_default();
            assert!(
                !summary.is_empty() && summary.len() <= 60 && !summary.contains('\n'),
                "{method} {path}: {summary:?}"
            );
            assert!(description.len() > summary.len(), "{method} {path}: no description");
            let responses = op["responses"].as_object().unwrap();
            assert!(responses.contains_key("500"), "{method} {path}: no 500");
            if op["security"] != serde_json::json!([]) {
                for status in ["401", "403"] {
                    let reference = responses.get(status).and_then(|r| r["$ref"].as_str()).unwrap_or_default();
                    assert!(reference.starts_with("#/components/responses/"), "{method} {path}: {status}");
                }
            }
        }
    }
    let bodies = doc["components"]["schemas"].as_object().unwrap();
    for body in ["ReserveBody", "SettleBody", "ExtendBody", "ReceiveBody", "AdjustBody", "TransferBody"] {
        assert!(bodies[body]["example"].is_object(), "{body} has no example");
    }
}

/// A client can be generated from the committed document: openapi-typescript turns
/// `docs/openapi.json` into TypeScript types, and `tsc --strict` checks the small client in
/// `clients/typescript/src` (it stocks up, makes a reservation, reads the 201 answer and the 409
/// problem) against them. A change of the document that breaks a client (a path, a parameter, a
/// field or a problem code renamed or removed) fails here as a compile error. The packages are
/// pinned by `clients/typescript/package-lock.json`; `npm ci` runs when `node_modules` is missing
/// or older than the lockfile (about 3 s more); generating and checking take about 5 s.
#[test]
fn a_typescript_client_type_checks_against_the_committed_document() {
    const TEST: &str = "openapi::a_typescript_client_type_checks_against_the_committed_document";
    if !Command::new("npm").arg("--version").output().is_ok_and(|o| o.status.success()) {
        crate::helpers::skip(TEST, "no npm: install Node.js 18+ with npm (apt-get install nodejs npm)");
        return;
    }
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("clients/typescript");
    let modified = |p: &str| std::fs::metadata(dir.join(p)).and_then(|m| m.modified()).ok();
    // npm ci writes node_modules/.package-lock.json last: older than the lockfile or package.json
    // (a checkout changed them) or missing means the installed packages may not be the pinned ones.
    let installed = modified("node_modules/.package-lock.json");
    if installed.is_none() || installed < modified("package-lock.json") || installed < modified("package.json") {
        npm(&dir, "npm", &["ci", "--no-audit", "--no-fund"], 300);
    }
    // `--no`: never fetch a package that is not installed (`npx tsc` would fetch an unrelated one).
    npm(&dir, "npx", &["--no", "--", "openapi-typescript", "../../docs/openapi.json", "-o", "generated/api.d.ts"], 120);
    npm(&dir, "npx", &["--no", "--", "tsc", "-p", "."], 120);
}

/// Runs an npm command in `dir`, killed (with the processes it started) after `timeout_secs`;
/// fails the test unless it succeeds, with what it printed.
fn npm(dir: &std::path::Path, program: &str, args: &[&str], timeout_secs: u64) {
    use std::io::Read;
    use std::os::unix::process::CommandExt;
    use std::process::Stdio;
    use std::time::{Duration, Instant};

    let command = format!("{program} {}", args.join(" "));
    let started = Instant::now();
    let mut child = Command::new(program)
        .args(args)
        .current_dir(dir)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        // Its own process group, so that a timeout ends node and whatever npm started as well.
        .process_group(0)
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start `{command}`: {e}"));
    let drain = |mut pipe: Box<dyn Read + Send>| {
        std::thread::spawn(move || {
            let mut text = String::new();
            let _ = pipe.read_to_string(&mut text);
            text
        })
    };
    let stdout = drain(Box::new(child.stdout.take().unwrap()));
    let stderr = drain(Box::new(child.stderr.take().unwrap()));
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break Some(status);
        }
        if started.elapsed() > Duration::from_secs(timeout_secs) {
            let _ = Command::new("kill").args(["-KILL", "--", &format!("-{}", child.id())]).status();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let (stdout, stderr) = (stdout.join().unwrap(), stderr.join().unwrap());
    let took = started.elapsed();
    match status {
        Some(status) if status.success() => eprintln!("`{command}` in clients/typescript: {took:.1?}"),
        Some(status) => panic!("`{command}` in clients/typescript failed ({status}):\n{stdout}\n{stderr}"),
        None => panic!("`{command}` in clients/typescript took over {timeout_secs} s:\n{stdout}\n{stderr}"),
    }
}
