//! Behind PgBouncer in transaction pooling mode (`pool_mode = transaction`): the service
//! connects with `--database-pooler transaction` (and cannot without it), and the smoke
//! scenarios and the concurrency tests pass through a pool of few server connections. Each test
//! runs its own `pgbouncer` in front of the test cluster, on a free port; without the program
//! the tests say SKIPPED (and fail under CI, whose `.ci/run` installs it).

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use inventory::config::{DatabaseArgs, Pooler, ServerArgs};
use reqwest::StatusCode;
use serde_json::json;

use crate::drills::free_port;
use crate::helpers::{self, TestApp, database_args, skip};
use crate::{concurrency, events, idempotency, import};

const BIN: &str = env!("CARGO_BIN_EXE_inventory");

/// Server connections PgBouncer keeps per database: far fewer than the service's pool (16) and
/// than concurrent requests, so server sessions are shared between the service's connections.
const SERVER_POOL: usize = 10;

/// A `pgbouncer` of the test's own, stopped when dropped.
struct PgBouncer {
    child: Child,
    port: u16,
    dir: PathBuf,
}

impl PgBouncer {
    /// Starts `pgbouncer` in transaction pooling mode in front of the server of `db_url` (the
    /// harness's, with trust authentication), or says SKIPPED and returns `None` when it is not
    /// installed.
    fn start(test: &str, db_url: &str) -> Option<Self> {
        let Some(program) = find_pgbouncer() else {
            skip(test, "`pgbouncer` is not installed (Debian/Ubuntu: apt-get install pgbouncer)");
            return None;
        };
        let target: sqlx::postgres::PgConnectOptions = db_url.parse().expect("a PostgreSQL URL");
        let dir = std::env::temp_dir().join(format!("inventory-pgbouncer-{}-{}", std::process::id(), free_port()));
        std::fs::create_dir_all(&dir).unwrap();
        let port = free_port();
        let user = target.get_username();
        let password = password_of(db_url).map(|p| format!(" password={p}")).unwrap_or_default();
        // `*`: every database name maps to the same name on the server (each test's own).
        let ini = format!(
            "[databases]\n* = host={host} port={server_port} user={user}{password}\n\n[pgbouncer]\n\
             listen_addr = 127.0.0.1\nlisten_port = {port}\nunix_socket_dir =\n\
             auth_type = trust\nauth_file = {auth}\n\
             pool_mode = transaction\nmax_client_conn = 500\ndefault_pool_size = {SERVER_POOL}\n\
             ignore_startup_parameters = extra_float_digits\n",
            host = target.get_host(),
            server_port = target.get_port(),
            auth = dir.join("userlist.txt").display(),
        );
        std::fs::write(dir.join("pgbouncer.ini"), ini).unwrap();
        std::fs::write(dir.join("userlist.txt"), format!("\"{user}\" \"\"\n")).unwrap();
        let log = std::fs::File::create(dir.join("pgbouncer.log")).unwrap();
        let mut command = Command::new(program);
        // PgBouncer refuses to run as root: it takes the identity of the user PostgreSQL runs as.
        if is_root() {
            command.args(["-u", "postgres"]);
        }
        let child = command
            .arg(dir.join("pgbouncer.ini"))
            .current_dir("/")
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("start pgbouncer");
        let mut bouncer = Self { child, port, dir };
        bouncer.wait_listening();
        Some(bouncer)
    }

    fn wait_listening(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(15);
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!("pgbouncer exited ({status}):\n{}", self.log());
            }
            assert!(Instant::now() < deadline, "pgbouncer does not listen:\n{}", self.log());
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// `db_url` with PgBouncer's address instead of the server's.
    fn url(&self, db_url: &str) -> String {
        let database = db_url.rsplit('/').next().unwrap().split('?').next().unwrap();
        let user = db_url.parse::<sqlx::postgres::PgConnectOptions>().unwrap().get_username().to_owned();
        format!("postgres://{user}@127.0.0.1:{}/{database}", self.port)
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("pgbouncer.log")).unwrap_or_default()
    }
}

impl Drop for PgBouncer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn find_pgbouncer() -> Option<PathBuf> {
    // Debian installs it under /usr/sbin, which is not on every user's PATH.
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin".into(), "/usr/local/sbin".into()])
        .map(|dir| dir.join("pgbouncer"))
        .find(|p| p.is_file())
}

fn is_root() -> bool {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata("/proc/self").is_ok_and(|m| m.uid() == 0)
}

/// The password in a PostgreSQL URL, if any (`postgres://user:password@host/db`).
fn password_of(url: &str) -> Option<&str> {
    let rest = url.split_once("://")?.1;
    let userinfo = rest.split_once('@')?.0;
    userinfo.split_once(':').map(|(_, password)| password)
}

fn pooled() -> DatabaseArgs {
    DatabaseArgs { database_pooler: Pooler::Transaction, ..database_args(None) }
}

/// A fresh database, a `pgbouncer` in front of it, and the service connected through it with
/// `--database-pooler transaction` (the test's own pool connects directly). `None`: skipped.
async fn spawn_behind_pgbouncer(test: &str) -> Option<(TestApp, PgBouncer)> {
    let db_url = helpers::fresh_database().await;
    let bouncer = PgBouncer::start(test, &db_url)?;
    let app = TestApp::spawn_through_with(ServerArgs::default(), db_url.clone(), &bouncer.url(&db_url), pooled()).await;
    Some((app, bouncer))
}

#[tokio::test]
async fn without_the_pooler_setting_the_service_cannot_connect_through_pgbouncer() {
    let db_url = helpers::fresh_database().await;
    let test = "pgbouncer::without_the_pooler_setting_the_service_cannot_connect_through_pgbouncer";
    let Some(bouncer) = PgBouncer::start(test, &db_url) else { return };
    let err = inventory::store::db::connect(&bouncer.url(&db_url), &database_args(None)).await.unwrap_err();
    assert!(err.to_string().contains("unsupported startup parameter: options"), "{err}");
    let db = inventory::store::db::connect(&bouncer.url(&db_url), &pooled()).await.expect("connects with the setting");
    assert!(db.pooled());
}

#[tokio::test]
async fn behind_pgbouncer_the_smoke_scenarios_pass() {
    let Some((app, bouncer)) = spawn_behind_pgbouncer("pgbouncer::behind_pgbouncer_the_smoke_scenarios_pass").await
    else {
        return;
    };
    let (status, ready) = app.get("/health/ready").await;
    assert_eq!(status, StatusCode::OK, "{ready}");
    // Catalogue, receive, reserve, release, fulfil, and the event feed.
    events::crossings_and_lifecycle_changes(&app).await;

    app.warehouse("W2", 2).await;
    app.sku("B").await;
    app.receive("B", "W1", 10).await;
    let (status, held) = app
        .post(
            "/v1/reservations",
            json!({"order_id": "pb-1", "lines": [{"sku": "B", "quantity": 4}], "ttl_seconds": 60}),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{held}");
    let id = held["id"].as_str().unwrap();
    let (status, extended) = app.post(&format!("/v1/reservations/{id}/extend"), json!({"ttl_seconds": 600})).await;
    assert_eq!(status, StatusCode::OK, "{extended}");
    let (status, adjusted) =
        app.post("/v1/stock/adjust", json!({"sku": "B", "warehouse": "W1", "delta": -1, "reason": "damage"})).await;
    assert_eq!(status, StatusCode::OK, "{adjusted}");
    let (status, moved) =
        app.post("/v1/stock/transfer", json!({"sku": "B", "from": "W1", "to": "W2", "quantity": 3})).await;
    assert_eq!(status, StatusCode::OK, "{moved}");
    let (status, stock) = app.get("/v1/stock/B").await;
    assert_eq!((status, &stock["total"]), (StatusCode::OK, &json!({"on_hand": 9, "reserved": 4, "available": 5})));
    let (status, ledger) = app.get("/v1/ledger?sku=B").await;
    assert_eq!(status, StatusCode::OK, "{ledger}");
    let kinds: Vec<&str> = ledger["items"].as_array().unwrap().iter().map(|e| e["kind"].as_str().unwrap()).collect();
    assert_eq!(kinds, ["receive", "reserve", "adjust", "transfer_out", "transfer_in"]);
    let (status, availability) = app.get("/v1/availability?sku=B&sku=NONE").await;
    assert_eq!((status, &availability["items"][0]["available"]), (StatusCode::OK, &json!(5)));

    // The CSV import: a temporary table and COPY in one transaction.
    let (status, report) = import::import(&app, "?create_missing=true", "C,W3,7\nB,W2,5\n").await;
    assert_eq!(status, StatusCode::OK, "{report}");
    assert_eq!((app.level("C", "W3").await, app.level("B", "W2").await), ((7, 0), (5, 0)));

    // An idempotent retry is replayed, not applied twice.
    let body = json!({"order_id": "pb-2", "lines": [{"sku": "C", "quantity": 2}]});
    let (status, replayed, first) = idempotency::post_with_key(&app, "/v1/reservations", "pb-key", &body).await;
    assert_eq!((status, replayed), (StatusCode::CREATED, None), "{first}");
    let (status, replayed, again) = idempotency::post_with_key(&app, "/v1/reservations", "pb-key", &body).await;
    assert_eq!((status, replayed.as_deref(), &again["id"]), (StatusCode::CREATED, Some("true"), &first["id"]));
    assert_eq!(app.level("C", "W3").await, (7, 2));

    // The command line through the pooler: `check` works, `migrate` is refused.
    let url = bouncer.url(&app.db_url);
    let check = Command::new(BIN).args(["check", "--database-url", &url, "--database-pooler", "transaction"]).output();
    let check = check.unwrap();
    assert!(check.status.success(), "{}", String::from_utf8_lossy(&check.stderr));
    assert!(String::from_utf8_lossy(&check.stdout).contains("ok: all invariants hold"));
    let migrate = Command::new(BIN)
        .args(["migrate", "--database-url", &url])
        .env("INVENTORY_DATABASE_POOLER", "transaction")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&migrate.stderr);
    assert!(!migrate.status.success() && stderr.contains("straight to PostgreSQL"), "{stderr}");
    app.assert_invariants().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn behind_pgbouncer_three_hundred_buyers_of_fifty_units_get_exactly_fifty() {
    let test = "pgbouncer::behind_pgbouncer_three_hundred_buyers_of_fifty_units_get_exactly_fifty";
    let Some((app, _bouncer)) = spawn_behind_pgbouncer(test).await else { return };
    concurrency::three_hundred_buyers_of_fifty_units(&app).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn behind_pgbouncer_concurrent_transfers_and_adjustments_conserve_units() {
    let test = "pgbouncer::behind_pgbouncer_concurrent_transfers_and_adjustments_conserve_units";
    let Some((app, _bouncer)) = spawn_behind_pgbouncer(test).await else { return };
    concurrency::transfers_and_adjustments_conserve_units(&app).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn behind_pgbouncer_crossing_multi_line_orders_never_deadlock_or_lose_a_unit() {
    let test = "pgbouncer::behind_pgbouncer_crossing_multi_line_orders_never_deadlock_or_lose_a_unit";
    let Some((app, _bouncer)) = spawn_behind_pgbouncer(test).await else { return };
    concurrency::crossing_multi_line_orders(&app).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn behind_pgbouncer_every_acknowledged_reservation_can_be_settled_at_once_under_load() {
    let test = "pgbouncer::behind_pgbouncer_every_acknowledged_reservation_can_be_settled_at_once_under_load";
    let Some((app, _bouncer)) = spawn_behind_pgbouncer(test).await else { return };
    concurrency::settling_every_acknowledged_reservation_under_load(&app).await;
}

#[test]
fn the_password_of_a_url_is_found() {
    assert_eq!(password_of("postgres://u:secret@h:5432/db"), Some("secret"));
    assert_eq!(password_of("postgres://u@h/db"), None);
}
