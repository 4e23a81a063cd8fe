use reqwest::StatusCode;
use serde_json::json;

use crate::helpers::TestApp;

#[tokio::test]
async fn putting_a_warehouse_creates_it_then_updates_it() {
    let app = TestApp::spawn().await;
    let (status, body) = app.put("/v1/warehouses/WH-1", json!({"name": "Main", "region": "eu", "priority": 5})).await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    assert_eq!(
        (body["code"].clone(), body["priority"].clone(), body["active"].clone()),
        (json!("WH-1"), json!(5), json!(true))
    );

    let (status, body) = app.put("/v1/warehouses/WH-1", json!({"name": "Main hall", "active": false})).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let (status, body) = app.get("/v1/warehouses/WH-1").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body["name"], "Main hall");
    assert_eq!(body["active"], false);
    assert_eq!(body["priority"], 5, "omitted fields keep their value");
    assert_eq!(body["region"], "eu");
}

#[tokio::test]
async fn warehouses_are_listed_by_priority() {
    let app = TestApp::spawn().await;
    app.warehouse("B", 10).await;
    app.warehouse("A", 20).await;
    app.warehouse("C", 10).await;
    let (status, body) = app.get("/v1/warehouses").await;
    assert_eq!(status, StatusCode::OK);
    let codes: Vec<&str> = body["items"].as_array().unwrap().iter().map(|w| w["code"].as_str().unwrap()).collect();
    assert_eq!(codes, ["B", "C", "A"]);
}

#[tokio::test]
async fn putting_a_sku_creates_it_then_updates_it() {
    let app = TestApp::spawn().await;
    let (status, body) = app.put("/v1/skus/TSHIRT-M", json!({"name": "T-shirt"})).await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    assert_eq!(body["backorder_limit"], 0);
    let (status, _) = app.put("/v1/skus/TSHIRT-M", json!({"backorder_limit": 7})).await;
    assert_eq!(status, StatusCode::OK);
    let (status, body) = app.get("/v1/skus/TSHIRT-M").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!((body["name"].clone(), body["backorder_limit"].clone()), (json!("T-shirt"), json!(7)));
}

#[tokio::test]
async fn unknown_catalogue_entries_are_404() {
    let app = TestApp::spawn().await;
    for path in ["/v1/warehouses/NOPE", "/v1/skus/NOPE", "/v1/stock/NOPE", "/v1/skus/bad%20code"] {
        let (status, body) = app.get(path).await;
        assert_eq!(status, StatusCode::NOT_FOUND, "{path}");
        assert_eq!(body["code"], "not_found");
    }
}

#[tokio::test]
async fn invalid_codes_and_values_are_rejected_field_by_field() {
    let app = TestApp::spawn().await;
    let (status, body) = app.put("/v1/warehouses/-bad", json!({"priority": -1})).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    let fields: Vec<&str> = body["errors"].as_array().unwrap().iter().map(|e| e["field"].as_str().unwrap()).collect();
    assert_eq!(fields, ["code", "name", "priority"]);
    let (status, body) = app.put("/v1/skus/A", json!({"backorder_limit": -3})).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(body["errors"][0]["field"], "backorder_limit");
    let (status, _) = app.get("/v1/skus/A").await;
    assert_eq!(status, StatusCode::NOT_FOUND, "a rejected PUT creates nothing");
}
