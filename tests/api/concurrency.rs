//! Concurrent stock operations keep every invariant.

use futures::future::join_all;
use reqwest::StatusCode;
use serde_json::json;

use crate::helpers::TestApp;

#[tokio::test]
async fn concurrent_transfers_and_adjustments_conserve_units() {
    let app = TestApp::spawn().await;
    app.warehouse("EAST", 1).await;
    app.warehouse("WEST", 2).await;
    app.sku("A").await;
    app.receive("A", "EAST", 100).await;
    app.receive("A", "WEST", 100).await;

    let requests = (0..100).map(|i| {
        let app = &app;
        async move {
            let (from, to) = if i % 2 == 0 { ("EAST", "WEST") } else { ("WEST", "EAST") };
            match i % 5 {
                // Adjustments in both directions; a removal may be refused, which is fine.
                0 => {
                    let delta = if i % 10 == 0 { 3 } else { -2 };
                    let (status, body) = app
                        .post(
                            "/v1/stock/adjust",
                            json!({"sku": "A", "warehouse": from, "delta": delta, "reason": "count"}),
                        )
                        .await;
                    (status, body, if status == StatusCode::OK { delta } else { 0 })
                }
                _ => {
                    let (status, body) = app
                        .post("/v1/stock/transfer", json!({"sku": "A", "from": from, "to": to, "quantity": 1 + i % 7}))
                        .await;
                    (status, body, 0)
                }
            }
        }
    });
    let results = join_all(requests).await;
    let mut expected_total = 200;
    for (status, body, delta) in &results {
        assert!(status == &StatusCode::OK || status == &StatusCode::CONFLICT, "{status} {body}");
        expected_total += delta;
    }
    let (east, west) = (app.level("A", "EAST").await, app.level("A", "WEST").await);
    assert_eq!(east.0 + west.0, expected_total, "units are conserved");
    assert!(results.iter().filter(|r| r.0 == StatusCode::OK).count() > 50, "most operations succeed");
    app.assert_invariants().await;
}
