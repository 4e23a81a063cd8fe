//! TLS to PostgreSQL: a cluster that accepts only `hostssl` connections, with a certificate made
//! here, signed by a CA made here. The service connects with `sslmode=verify-full` (the chain and
//! the host name checked) and serves; without TLS, or with a host name the certificate does not
//! name, it is refused with PostgreSQL's or the TLS library's reason.

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;

use inventory::config::ServerArgs;
use inventory::local_pg::{Durability, LocalPostgres};
use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair};
use reqwest::StatusCode;
use serde_json::json;

use crate::helpers::{TestApp, database_args, local_postgres_or_skip};

/// Stops the test's own cluster and removes its directory, also when the test fails.
struct Cluster(Option<LocalPostgres>, std::path::PathBuf);

impl Drop for Cluster {
    fn drop(&mut self) {
        if let Some(cluster) = self.0.take() {
            let _ = cluster.stop();
        }
        let _ = std::fs::remove_dir_all(&self.1);
    }
}

/// Writes `contents` as a file of the cluster's owner (PostgreSQL refuses a key others can read).
fn write_owned(path: &Path, contents: &str, owner: &std::fs::Metadata) {
    std::fs::write(path, contents).unwrap();
    std::os::unix::fs::chown(path, Some(owner.uid()), Some(owner.gid())).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).unwrap();
}

#[tokio::test]
async fn the_service_connects_with_verify_full_and_is_refused_without_tls() {
    if !local_postgres_or_skip("tls::the_service_connects_with_verify_full_and_is_refused_without_tls") {
        return;
    }
    let dir = std::env::temp_dir().join(format!("inventory-tls-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let cluster = tokio::task::spawn_blocking({
        let dir = dir.clone();
        move || LocalPostgres::start(&dir, Durability::Throwaway)
    })
    .await
    .unwrap()
    .expect("a throwaway cluster");
    let port = cluster.port();
    let cluster = Cluster(Some(cluster), dir.clone());
    let local = cluster.0.as_ref().unwrap();

    // A CA, and a server certificate it signs for `localhost` only.
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params.distinguished_name.push(DnType::CommonName, "inventory test CA");
    let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate().unwrap()).unwrap();
    let server_key = KeyPair::generate().unwrap();
    let server_cert =
        CertificateParams::new(vec!["localhost".to_owned()]).unwrap().signed_by(&server_key, &ca).unwrap();
    let root = dir.join("root.crt");
    std::fs::write(&root, ca.pem()).unwrap();

    // ssl = on with that certificate, and a pg_hba.conf that takes TCP connections over TLS only.
    let admin = sqlx::PgPool::connect(&local.url("postgres")).await.unwrap();
    let data: String = sqlx::query_scalar("SHOW data_directory").fetch_one(&admin).await.unwrap();
    let hba: String = sqlx::query_scalar("SHOW hba_file").fetch_one(&admin).await.unwrap();
    let owner = std::fs::metadata(&data).unwrap();
    write_owned(&Path::new(&data).join("server.crt"), &server_cert.pem(), &owner);
    write_owned(&Path::new(&data).join("server.key"), &server_key.serialize_pem(), &owner);
    write_owned(
        Path::new(&hba),
        "local all all trust\nhostssl all all 127.0.0.1/32 trust\nhostssl all all ::1/128 trust\n",
        &owner,
    );
    for setting in ["ALTER SYSTEM SET ssl = on", "SELECT pg_reload_conf()"] {
        sqlx::query(setting).execute(&admin).await.unwrap();
    }
    admin.close().await;
    // The reload is a signal to the postmaster: wait until a new session sees it.
    let started = std::time::Instant::now();
    loop {
        let fresh = sqlx::PgPool::connect(&local.url("postgres")).await.unwrap();
        let ssl: String = sqlx::query_scalar("SHOW ssl").fetch_one(&fresh).await.unwrap();
        fresh.close().await;
        if ssl == "on" {
            break;
        }
        assert!(started.elapsed() < std::time::Duration::from_secs(10), "the server did not turn ssl on");
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    inventory::store::db::ensure_database(
        &format!("postgres://postgres@localhost:{port}/postgres?sslmode=require"),
        "smoke",
    )
    .await
    .expect("the smoke database, over TLS");

    let verified =
        format!("postgres://postgres@localhost:{port}/smoke?sslmode=verify-full&sslrootcert={}", root.display());
    let pool = inventory::store::db::connect(&verified, &database_args(None)).await.expect("verify-full connects");
    let tls: bool = sqlx::query_scalar("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()")
        .fetch_one(pool.pool())
        .await
        .unwrap();
    assert!(tls, "the session is encrypted");
    inventory::store::db::MIGRATOR.run(pool.pool()).await.unwrap();
    pool.pool().close().await;

    // The suite's smoke, through a service whose pool connects with verify-full.
    let app = TestApp::spawn_through(ServerArgs::default(), verified.clone(), &verified).await;
    app.warehouse("W1", 1).await;
    app.sku("A").await;
    app.receive("A", "W1", 5).await;
    let (status, held) =
        app.post("/v1/reservations", json!({"order_id": "tls-1", "lines": [{"sku": "A", "quantity": 2}]})).await;
    assert_eq!(status, StatusCode::CREATED, "{held}");
    let (status, done) =
        app.post(&format!("/v1/reservations/{}/fulfil", held["id"].as_str().unwrap()), json!({})).await;
    assert_eq!((status, done["status"].as_str()), (StatusCode::OK, Some("fulfilled")), "{done}");
    assert_eq!(app.level("A", "W1").await, (3, 0));
    drop(app);

    // Without TLS the server refuses; with a host name the certificate does not name, the client does.
    let plain = format!("postgres://postgres@localhost:{port}/smoke?sslmode=disable");
    let err = inventory::store::db::connect(&plain, &database_args(None)).await.unwrap_err().to_string();
    // "no encryption" (PostgreSQL 14+) or "SSL off" (13).
    assert!(err.contains("no pg_hba.conf entry"), "{err}");
    let wrong_name =
        format!("postgres://postgres@127.0.0.1:{port}/smoke?sslmode=verify-full&sslrootcert={}", root.display());
    let err = inventory::store::db::connect(&wrong_name, &database_args(None)).await.unwrap_err().to_string();
    assert!(err.to_lowercase().contains("certificate"), "{err}");

    tokio::task::spawn_blocking(move || drop(cluster)).await.unwrap();
}
