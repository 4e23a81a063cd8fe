//! Metrics and request ids.

use reqwest::StatusCode;
use serde_json::json;

use crate::drills;
use crate::helpers::TestApp;

/// The value of the first sample whose line starts with `name{` and contains every label.
pub(crate) fn sample(text: &str, name: &str, labels: &[&str]) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(&format!("{name}{{")) || l.starts_with(&format!("{name} ")))
        .find(|l| labels.iter().all(|label| l.contains(label)))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0)
}

pub(crate) async fn metrics(app: &TestApp) -> String {
    let res = app.client.get(app.url("/metrics")).send().await.unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    assert!(res.headers()["content-type"].to_str().unwrap().starts_with("text/plain"));
    res.text().await.unwrap()
}

/// The service runs as a process of its own here, so its metrics count this test's requests
/// and nothing else: every change is checked exactly.
#[tokio::test]
async fn metrics_count_exactly_the_requests_made() {
    let db_url = crate::helpers::fresh_database().await;
    let listen = format!("127.0.0.1:{}", drills::free_port());
    let log = drills::DrillLog::new("metrics");
    let service = drills::Service::start(&db_url, &listen, log.path(), &[]);
    let app = drills::app_for(&listen, &db_url).await;
    assert!(drills::wait_ready(&app.base, std::time::Duration::from_secs(30)).await.is_some(), "{log}");
    app.warehouse("W1", 1).await;
    app.sku("A").await;
    app.receive("A", "W1", 2).await;
    let before = metrics(&app).await;
    let route = r#"route="/v1/reservations""#;
    let (status, r) =
        app.post("/v1/reservations", json!({"order_id": "m1", "lines": [{"sku": "A", "quantity": 2}]})).await;
    assert_eq!(status, StatusCode::CREATED);
    let (status, _) =
        app.post("/v1/reservations", json!({"order_id": "m2", "lines": [{"sku": "A", "quantity": 1}]})).await;
    assert_eq!(status, StatusCode::CONFLICT);
    app.call(reqwest::Method::POST, &format!("/v1/reservations/{}/fulfil", r["id"].as_str().unwrap()), None).await;
    let after = metrics(&app).await;

    let delta = |name: &str, labels: &[&str]| sample(&after, name, labels) - sample(&before, name, labels);
    use inventory::metrics::{HTTP_DURATION, HTTP_REQUESTS, POOL_MAX, RESERVATIONS, UNITS};
    assert_eq!(delta(HTTP_REQUESTS, &[route, r#"method="POST""#, r#"status="201""#]), 1.0, "{after}");
    assert_eq!(delta(HTTP_REQUESTS, &[route, r#"method="POST""#, r#"status="409""#]), 1.0);
    assert_eq!(delta(RESERVATIONS, &[r#"outcome="created""#]), 1.0);
    assert_eq!(delta(RESERVATIONS, &[r#"outcome="insufficient_stock""#]), 1.0);
    assert_eq!(delta(UNITS, &[r#"kind="reserve""#]), 2.0);
    assert_eq!(delta(UNITS, &[r#"kind="fulfil""#]), 2.0);
    assert_eq!(delta(UNITS, &[r#"kind="receive""#]), 0.0, "nothing received in between");
    assert!(after.contains(&format!("{HTTP_DURATION}_bucket")), "latency histogram");
    assert!(after.contains(POOL_MAX));
    assert!(!after.contains("/v1/reservations/0"), "route templates, never raw paths");
    service.stop();
}

/// What a Prometheus operator expects of `/metrics`: every metric with `# HELP` and `# TYPE`,
/// the service's own under the `inventory_` prefix, the build, the process and the pool; and
/// `promtool check metrics` (Debian's `prometheus` package) finds nothing to complain about.
#[tokio::test]
async fn metrics_are_described_prefixed_and_pass_promtool() {
    let app = TestApp::spawn().await;
    app.warehouse("W1", 1).await;
    let text = metrics(&app).await;
    let mut described = std::collections::BTreeSet::new();
    let mut typed = std::collections::BTreeSet::new();
    for line in text.lines() {
        let mut words = line.split_whitespace();
        match (words.next(), words.next(), words.next()) {
            (Some("#"), Some("HELP"), Some(name)) => described.insert(name.to_owned()),
            (Some("#"), Some("TYPE"), Some(name)) => typed.insert(name.to_owned()),
            _ => false,
        };
    }
    let samples: std::collections::BTreeSet<String> = text
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .map(|l| l.split(['{', ' ']).next().unwrap().to_owned())
        .collect();
    for sample in &samples {
        let family = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|suffix| sample.strip_suffix(suffix).filter(|f| typed.contains(*f)))
            .unwrap_or(sample);
        assert!(typed.contains(family) && described.contains(family), "{sample}: no # HELP or # TYPE\n{text}");
        assert!(family.starts_with("inventory_") || family.starts_with("process_"), "{family}: unprefixed");
    }
    let version = env!("CARGO_PKG_VERSION");
    let build = format!("{}{{", inventory::metrics::BUILD_INFO);
    let build = text.lines().find(|l| l.starts_with(&build)).unwrap_or_else(|| panic!("no build info\n{text}"));
    assert!(build.contains(&format!(r#"version="{version}""#)) && build.contains("commit="), "{build}");
    for name in ["process_resident_memory_bytes", "process_open_fds", "process_start_time_seconds"] {
        assert!(samples.contains(name), "{name} missing\n{text}");
    }
    for state in ["in_use", "idle"] {
        let series = format!(r#"{}{{state="{state}"}}"#, inventory::metrics::POOL_CONNECTIONS);
        assert!(text.contains(&series), "{series} missing");
    }
    let Ok(mut promtool) = std::process::Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
    else {
        // CI installs it (.ci/run); on a developer machine without it, say so loudly.
        crate::helpers::skip(
            "operability::metrics_are_described_prefixed_and_pass_promtool (the promtool part)",
            "no promtool installed: apt-get install prometheus",
        );
        return;
    };
    use std::io::Write;
    promtool.stdin.take().unwrap().write_all(text.as_bytes()).unwrap();
    let out = promtool.wait_with_output().unwrap();
    let said = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success() && said.trim().is_empty(), "promtool check metrics: {said}\n{text}");
}

#[tokio::test]
async fn every_response_carries_a_request_id() {
    let app = TestApp::spawn().await;
    let res = app.client.get(app.url("/health/live")).send().await.unwrap();
    let id = res.headers()["x-request-id"].to_str().unwrap().to_owned();
    assert!(uuid::Uuid::parse_str(&id).is_ok(), "generated ids are UUIDs: {id}");
    let res =
        app.client.post(app.url("/v1/stock/receive")).header("x-request-id", "abc-1").body("{").send().await.unwrap();
    assert_eq!(res.headers()["x-request-id"], "abc-1");
}

#[tokio::test]
async fn random_methods_and_paths_never_become_metric_labels() {
    let app = TestApp::spawn().await;
    let mut tokens = Vec::new();
    for i in 0..1_000 {
        let token = format!("ZQX{i}{:x}", rand::random::<u32>());
        let method = reqwest::Method::from_bytes(token.as_bytes()).unwrap();
        let path = if i % 2 == 0 { format!("/v1/{token}") } else { format!("/v1/reservations/{token}") };
        let res = app.client.request(method, app.url(&path)).send().await.unwrap();
        assert!(res.status().is_client_error(), "{}", res.status());
        tokens.push(token);
    }
    let text = metrics(&app).await;
    let leaked: Vec<&String> = tokens.iter().filter(|t| text.contains(t.as_str())).collect();
    assert!(leaked.is_empty(), "{} request-made values became labels, e.g. {:?}", leaked.len(), leaked.first());
    // The series these requests could add: one per (fixed method label, route, status).
    let prefix = format!("{}{{", inventory::metrics::HTTP_REQUESTS);
    let other = text.lines().filter(|l| l.starts_with(&prefix) && l.contains(r#"method="other""#));
    assert!(other.count() <= 10, "{text}");
}
