//! API keys and roles.

use inventory::auth::{Role, mint};
use inventory::config::ServerArgs;
use reqwest::{Method, StatusCode};
use serde_json::json;

use crate::helpers::{TestApp, assert_problem};

#[tokio::test]
async fn keys_and_roles_decide_who_may_do_what() {
    let (orders, orders_line) = mint("shop", Role::Orders);
    let (ops, ops_line) = mint("warehouse-team", Role::Ops);
    let (read, read_line) = mint("dashboard", Role::Read);
    let server = ServerArgs {
        api_keys: Some(format!("{orders_line},{ops_line},{read_line}")),
        metrics_public: false,
        ..ServerArgs::default()
    };
    let app = TestApp::spawn_with(server).await;
    let call = |method: Method, path: &str, key: Option<&str>, body: Option<serde_json::Value>| {
        let mut req = app.client.request(method, app.url(path));
        if let Some(key) = key {
            req = req.bearer_auth(key);
        }
        if let Some(body) = body {
            req = req.json(&body);
        }
        req.send()
    };

    // No key, or a wrong one: 401. Health stays open.
    assert_problem(
        call(Method::GET, "/v1/warehouses", None, None).await.unwrap(),
        StatusCode::UNAUTHORIZED,
        "unauthorized",
    )
    .await;
    assert_problem(
        call(Method::GET, "/v1/warehouses", Some("inv_nope"), None).await.unwrap(),
        StatusCode::UNAUTHORIZED,
        "unauthorized",
    )
    .await;
    assert_eq!(call(Method::GET, "/health/live", None, None).await.unwrap().status(), StatusCode::OK);
    assert_eq!(call(Method::GET, "/metrics", None, None).await.unwrap().status(), StatusCode::UNAUTHORIZED);
    assert_eq!(call(Method::GET, "/metrics", Some(&read), None).await.unwrap().status(), StatusCode::OK);

    // ops sets up the catalogue; orders may not.
    let wh = Some(json!({"name": "Main"}));
    assert_problem(
        call(Method::PUT, "/v1/warehouses/W1", Some(&orders), wh.clone()).await.unwrap(),
        StatusCode::FORBIDDEN,
        "forbidden",
    )
    .await;
    assert_eq!(call(Method::PUT, "/v1/warehouses/W1", Some(&ops), wh).await.unwrap().status(), StatusCode::CREATED);
    assert_eq!(
        call(Method::PUT, "/v1/skus/A", Some(&ops), Some(json!({}))).await.unwrap().status(),
        StatusCode::CREATED
    );
    let receive = Some(json!({"sku": "A", "warehouse": "W1", "quantity": 5}));
    assert_eq!(call(Method::POST, "/v1/stock/receive", Some(&ops), receive).await.unwrap().status(), StatusCode::OK);

    // orders reserves; ops and read may not; everyone may read.
    let order = Some(json!({"order_id": "o", "lines": [{"sku": "A", "quantity": 1}]}));
    assert_eq!(
        call(Method::POST, "/v1/reservations", Some(&ops), order.clone()).await.unwrap().status(),
        StatusCode::FORBIDDEN
    );
    assert_eq!(
        call(Method::POST, "/v1/reservations", Some(&read), order.clone()).await.unwrap().status(),
        StatusCode::FORBIDDEN
    );
    assert_eq!(
        call(Method::POST, "/v1/reservations", Some(&orders), order).await.unwrap().status(),
        StatusCode::CREATED
    );
    for key in [&orders, &ops, &read] {
        assert_eq!(call(Method::GET, "/v1/stock/A", Some(key), None).await.unwrap().status(), StatusCode::OK);
    }
    assert_eq!(app.level("A", "W1").await, (5, 1));
}

#[tokio::test]
async fn the_binary_refuses_a_public_address_without_keys() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_inventory"))
        .args(["serve", "--listen", "0.0.0.0:0", "--database-url", "postgres://nobody@127.0.0.1:1/none"])
        .env_remove("INVENTORY_API_KEYS")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("without API keys"), "{stderr}");
}

#[tokio::test]
async fn keys_new_prints_a_key_and_its_config_line() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_inventory"))
        .args(["keys", "new", "--role", "orders", "--name", "shop"])
        .output()
        .unwrap();
    assert!(out.status.success());
    let stdout = String::from_utf8_lossy(&out.stdout);
    let key = stdout.lines().find_map(|l| l.split("): ").nth(1).filter(|k| k.starts_with("inv_"))).unwrap();
    let line = stdout.lines().find_map(|l| l.split("): ").nth(1).filter(|k| k.starts_with("shop:orders:"))).unwrap();
    let keys = inventory::auth::Keys::parse(line).unwrap();
    assert_eq!(keys.find(key).map(|k| k.role), Some(Role::Orders));
}
