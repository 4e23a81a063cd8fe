//! The binary itself: `serve` with its own PostgreSQL, and `check`.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::drills::free_port;
use crate::helpers::{TestApp, empty_database, local_postgres_or_skip};

const BIN: &str = env!("CARGO_BIN_EXE_inventory");

#[tokio::test]
async fn check_passes_on_a_consistent_database_and_reports_a_corrupted_row() {
    let app = TestApp::spawn().await;
    app.warehouse("W1", 1).await;
    app.sku("A").await;
    app.receive("A", "W1", 5).await;

    let ok = Command::new(BIN).args(["check", "--database-url", &app.db_url]).output().unwrap();
    assert!(ok.status.success(), "{}", String::from_utf8_lossy(&ok.stderr));

    app.expect_broken_invariants();
    sqlx::query("UPDATE stock_levels SET on_hand = on_hand + 1 WHERE sku = 'A'").execute(&app.db).await.unwrap();
    let bad = Command::new(BIN).args(["check", "--database-url", &app.db_url]).output().unwrap();
    assert_eq!(bad.status.code(), Some(1));
    let stdout = String::from_utf8_lossy(&bad.stdout);
    assert!(stdout.contains("VIOLATION A/W1: ledger_matches_level"), "{stdout}");
}

/// `inventory serve <args>` on a free loopback port, quiet; returns the process and its base URL.
fn serve_on_a_free_port(args: &[&str]) -> (std::process::Child, String) {
    let listen = format!("127.0.0.1:{}", free_port());
    let child = Command::new(BIN)
        .args(["serve", "--listen", &listen])
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    (child, format!("http://{listen}"))
}

async fn wait_ready(url: &str, deadline: Duration) -> bool {
    let started = Instant::now();
    while started.elapsed() < deadline {
        if let Ok(res) = reqwest::get(url).await
            && res.status().is_success()
        {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    false
}

#[tokio::test]
async fn serve_without_database_url_runs_its_own_postgres_and_keeps_the_data() {
    if !local_postgres_or_skip("cli::serve_without_database_url_runs_its_own_postgres_and_keeps_the_data") {
        return;
    }
    // A private parent (mode 0700), like a checkout under /root: as root, PostgreSQL (run as the
    // `postgres` user) cannot reach it, so the cluster must live elsewhere, linked from the data dir.
    let parent = std::env::temp_dir().join(format!("inventory-serve-test-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&parent);
    std::fs::create_dir_all(&parent).unwrap();
    std::fs::set_permissions(&parent, std::os::unix::fs::PermissionsExt::from_mode(0o700)).unwrap();
    let dir = parent.join("data");
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    let start = || {
        Command::new(BIN)
            .args(["serve", "--listen", &listen, "--data-dir", dir.to_str().unwrap()])
            .env_remove("DATABASE_URL")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap()
    };
    let base = format!("http://{listen}");
    let client = reqwest::Client::new();

    let mut child = start();
    assert!(wait_ready(&format!("{base}/health/ready"), Duration::from_secs(60)).await, "service did not become ready");
    let res = client
        .put(format!("{base}/v1/warehouses/KEEP"))
        .json(&serde_json::json!({"name": "kept"}))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 201);
    // `inventory check` on the same data dir attaches to the service's cluster and leaves it running.
    let check = Command::new(BIN)
        .args(["check", "--data-dir", dir.to_str().unwrap()])
        .env_remove("DATABASE_URL")
        .output()
        .unwrap();
    assert!(check.status.success(), "{}", String::from_utf8_lossy(&check.stderr));
    let res = client.get(format!("{base}/v1/warehouses/KEEP")).send().await.unwrap();
    assert_eq!(res.status(), 200, "the service's database survives a check");
    stop(&mut child);
    let pid_file = dir.join("pg/postmaster.pid");
    assert!(!pid_file.exists(), "the cluster is stopped with the service");

    let mut child = start();
    assert!(wait_ready(&format!("{base}/health/ready"), Duration::from_secs(60)).await, "second start failed");
    let res = client.get(format!("{base}/v1/warehouses/KEEP")).send().await.unwrap();
    assert_eq!(res.status(), 200, "the second start reuses the data");
    stop(&mut child);
    if let Ok(cluster) = std::fs::read_link(dir.join("pg")) {
        let _ = std::fs::remove_dir_all(cluster.parent().unwrap());
    }
    let _ = std::fs::remove_dir_all(&parent);
}

#[tokio::test]
async fn a_second_serve_on_the_same_data_dir_is_refused_and_leaves_the_first_running() {
    if !local_postgres_or_skip("cli::a_second_serve_on_the_same_data_dir_is_refused_and_leaves_the_first_running") {
        return;
    }
    let dir = std::env::temp_dir().join(format!("inventory-two-serves-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let serve = |listen: &str| {
        Command::new(BIN)
            .args(["serve", "--listen", listen, "--data-dir", dir.to_str().unwrap()])
            .env_remove("DATABASE_URL")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    };
    let listen = format!("127.0.0.1:{}", free_port());
    let base = format!("http://{listen}");
    let mut first = serve(&listen);
    assert!(wait_ready(&format!("{base}/health/ready"), Duration::from_secs(60)).await, "first service not ready");

    // Another port, and the same port (whose bind would fail): both refused, neither touches
    // the cluster the first one runs.
    for other in [format!("127.0.0.1:{}", free_port()), listen.clone()] {
        let mut second = serve(&other);
        let started = Instant::now();
        while second.try_wait().unwrap().is_none() && started.elapsed() < Duration::from_secs(30) {
            std::thread::sleep(Duration::from_millis(100));
        }
        if second.try_wait().unwrap().is_none() {
            stop(&mut second);
            panic!("a second serve on {other} kept running on the first one's data directory");
        }
        let second = second.wait_with_output().unwrap();
        assert!(!second.status.success(), "a second serve on {other} must not run");
        let stderr = String::from_utf8_lossy(&second.stderr);
        assert!(stderr.contains("already using the data directory"), "{stderr}");
        assert!(stderr.contains(&format!("pid {}", first.id())), "names the holder: {stderr}");
    }
    let client = reqwest::Client::new();
    let res = client.put(format!("{base}/v1/warehouses/STILL")).json(&serde_json::json!({"name": "s"})).send().await;
    assert_eq!(res.unwrap().status(), 201, "the first service still has its database");
    // The terminal that started it closes: SIGHUP drains the service and stops its cluster too.
    signal_and_wait(&mut first, "-HUP");
    assert!(!dir.join("pg/postmaster.pid").exists(), "the first service stops its cluster on SIGHUP");
    if let Ok(cluster) = std::fs::read_link(dir.join("pg")) {
        let _ = std::fs::remove_dir_all(cluster.parent().unwrap());
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// SIGTERM, then wait for a graceful exit.
fn stop(child: &mut std::process::Child) {
    signal_and_wait(child, "-TERM");
}

/// Sends `signal` (`-TERM`, `-HUP`), then waits for a graceful exit.
fn signal_and_wait(child: &mut std::process::Child, signal: &str) {
    let status = Command::new("kill").args([signal, &child.id().to_string()]).status().unwrap();
    assert!(status.success());
    let started = Instant::now();
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            assert!(status.success(), "graceful shutdown exits 0, got {status}");
            return;
        }
        assert!(started.elapsed() < Duration::from_secs(60), "service did not stop");
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[tokio::test]
async fn a_public_service_without_database_url_refuses_to_start_its_own_postgres() {
    let dir = std::env::temp_dir().join(format!("inventory-public-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let out = Command::new(BIN)
        .args(["serve", "--listen", "0.0.0.0:0", "--data-dir", dir.to_str().unwrap()])
        .env_remove("DATABASE_URL")
        .env_remove("INVENTORY_SELF_MANAGED_POSTGRES")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("set DATABASE_URL") && stderr.contains("--self-managed-postgres"), "{stderr}");
    assert!(!dir.exists(), "nothing was created under the data directory");
}

#[tokio::test]
async fn data_dir_says_where_the_data_lives_and_starts_nothing() {
    let dir = std::env::temp_dir().join(format!("inventory-where-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let out = Command::new(BIN).args(["data-dir", "--data-dir", dir.to_str().unwrap()]).output().unwrap();
    assert!(out.status.success());
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains(&format!("data directory: {}", dir.canonicalize().unwrap().display())), "{stdout}");
    assert!(stdout.contains("none yet"), "{stdout}");
    assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 0, "nothing created");
    std::fs::remove_dir(&dir).unwrap();
}

/// Migrations as a separate job: a service started with `--no-migrate` on an empty database
/// comes up, is not ready, and becomes ready once `inventory migrate` has run.
#[tokio::test]
async fn with_no_migrate_the_service_waits_for_inventory_migrate() {
    let url = empty_database().await;
    let (mut child, base) = serve_on_a_free_port(&["--no-migrate", "--database-url", &url]);
    assert!(wait_ready(&format!("{base}/health/live"), Duration::from_secs(30)).await, "service did not start");
    let res = reqwest::get(format!("{base}/health/ready")).await.unwrap();
    assert_eq!(res.status(), 503, "not ready before the migrations");
    let migrate = Command::new(BIN).args(["migrate", "--database-url", &url]).output().unwrap();
    assert!(migrate.status.success(), "{}", String::from_utf8_lossy(&migrate.stderr));
    assert!(wait_ready(&format!("{base}/health/ready"), Duration::from_secs(10)).await, "ready after migrate");
    stop(&mut child);
}

/// `DATABASE_URL=` (set, but empty, as shells and compose files leave it) means "no database
/// given", not a URL that fails to parse; an unknown role is refused with the list of roles.
#[tokio::test]
async fn an_empty_database_url_is_unset_and_roles_are_listed() {
    let dir = std::env::temp_dir().join(format!("inventory-empty-url-{}", std::process::id()));
    let out = Command::new(BIN)
        .args(["data-dir", "--data-dir", dir.to_str().unwrap()])
        .env("DATABASE_URL", "")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success() && !stdout.contains("DATABASE_URL is set"), "{stdout}");
    let out = Command::new(BIN).args(["keys", "new", "--role", "boss"]).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && stderr.contains("read, orders, ops, admin"), "{stderr}");
}

/// SIGTERM in a cluster: `/health/ready` answers 503 at once, so load balancers stop sending,
/// while the service keeps answering for the drain delay; then it stops and exits 0.
#[tokio::test]
async fn on_sigterm_the_service_is_unready_at_once_and_serves_through_the_drain_delay() {
    let app = TestApp::spawn().await;
    let (mut child, base) = serve_on_a_free_port(&["--drain-delay-secs", "3", "--database-url", &app.db_url]);
    assert!(wait_ready(&format!("{base}/health/ready"), Duration::from_secs(30)).await, "service did not start");
    let signalled = Instant::now();
    assert!(Command::new("kill").args(["-TERM", &child.id().to_string()]).status().unwrap().success());
    let client = reqwest::Client::new();
    let mut unready = false;
    while signalled.elapsed() < Duration::from_secs(1) && !unready {
        unready = client.get(format!("{base}/health/ready")).send().await.unwrap().status() == 503;
    }
    assert!(unready, "/health/ready still 200 a second after SIGTERM");
    let res = client.put(format!("{base}/v1/warehouses/LATE")).json(&serde_json::json!({"name": "late"})).send().await;
    assert_eq!(res.unwrap().status(), 201, "a request during the drain delay is served");
    assert!(signalled.elapsed() < Duration::from_secs(3), "the checks ran inside the delay");
    let status = tokio::task::spawn_blocking(move || child.wait().unwrap()).await.unwrap();
    assert!(status.success(), "exits 0 after draining: {status}");
    assert!(signalled.elapsed() >= Duration::from_secs(3), "accepting ended only after the delay");
}

/// Each subcommand's help shows its own flags (the service's only under `serve` and the bare
/// command), under headings; a service flag given to another subcommand, or before `serve`, is
/// refused with a message instead of being silently ignored.
#[test]
fn each_subcommand_shows_and_takes_only_its_own_flags() {
    let help = |args: &[&str]| {
        let out = Command::new(BIN).args(args).arg("--help").output().unwrap();
        assert!(out.status.success(), "{args:?}");
        String::from_utf8(out.stdout).unwrap()
    };
    let keys = help(&["keys", "new"]);
    for absent in ["--batch-window-us", "--listen", "--api-keys"] {
        assert!(!keys.contains(absent), "keys new --help lists {absent}:\n{keys}");
    }
    assert!(keys.contains("--role") && keys.contains("--name"), "{keys}");
    for args in [&["serve"][..], &[]] {
        let serve = help(args);
        for heading in ["Database:", "Server:", "Limits:", "Background work:", "Auth:", "Batching:", "Logging:"] {
            assert!(serve.contains(heading), "{args:?} --help has no {heading}\n{serve}");
        }
        assert!(serve.contains("--batch-window-us") && serve.contains("INVENTORY_REQUEST_TIMEOUT_SECS"), "{serve}");
    }
    for (args, says) in [
        (&["--listen", "127.0.0.1:1", "check"][..], "is a flag of `inventory serve`"),
        (&["--batch-max", "4", "serve"][..], "goes after the subcommand"),
        (&["check", "--listen", "127.0.0.1:1"][..], "unexpected argument"),
    ] {
        let out = Command::new(BIN).args(args).output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success() && stderr.contains(says), "{args:?}: {stderr}");
    }
}
