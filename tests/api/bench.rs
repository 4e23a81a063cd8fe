//! The benchmark's smoke run: every scenario, its pgbench baseline and the set-based anchor for about a second
//! each, on a small data set, so the benchmark cannot rot. Its figures are not checked (speed
//! targets live in the benchmark itself, never in a timed test); what it proves is that every
//! scenario gets answers, nothing fails, the sold-out run sells exactly its stock and the
//! invariants hold afterwards.

use std::process::Command;

use serde_json::Value;

use crate::helpers::{fresh_database, local_postgres_or_skip};

#[tokio::test]
async fn the_benchmark_smoke_run_exercises_every_scenario_and_keeps_the_invariants() {
    // Its baselines run pgbench, which ships with the PostgreSQL server binaries.
    if !local_postgres_or_skip("bench::the_benchmark_smoke_run_exercises_every_scenario_and_keeps_the_invariants") {
        return;
    }
    let server = fresh_database().await;
    let work = std::env::temp_dir().join(format!("inventory-bench-smoke-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&work);
    let out = work.join("results");
    let name = format!("bench_smoke_{}", std::process::id());

    let output = Command::new(env!("CARGO_BIN_EXE_inventory-bench"))
        .args(["--smoke", "--rounds", "2", "--database-name", &name])
        .arg("--database-url")
        .arg(&server)
        .arg("--inventory-bin")
        .arg(env!("CARGO_BIN_EXE_inventory"))
        .arg("--data-dir")
        .arg(&work)
        .arg("--out")
        .arg(&out)
        .output()
        .expect("run inventory-bench");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "the smoke run failed:\n{stdout}\n{}", String::from_utf8_lossy(&output.stderr));

    let json = std::fs::read_dir(&out)
        .unwrap()
        .filter_map(Result::ok)
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|x| x == "json"))
        .expect("a JSON result file");
    let report: Value = serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    assert_eq!(report["violations"], serde_json::json!([]));
    assert_eq!(report["sold_out_problems"], serde_json::json!([]));
    assert!(report["import"]["levels"].as_u64() == Some(2_000 * 4), "{}", report["import"]);

    let rows = report["scenarios"].as_array().unwrap();
    let names: Vec<&str> = rows.iter().map(|r| r["scenario"].as_str().unwrap()).collect();
    assert_eq!(names, ["uniform", "multi5", "hot", "hot-sold-out", "lifecycle", "availability", "mixed"]);
    for row in rows {
        let statuses = row["statuses"].as_object().unwrap();
        let failures: u64 = statuses
            .iter()
            .filter(|(status, _)| *status == "0" || status.starts_with('5'))
            .map(|(_, n)| n.as_u64().unwrap())
            .sum();
        assert_eq!(failures, 0, "{}: requests failed: {statuses:?}", row["scenario"]);
        assert!(row["ops"].as_u64().unwrap() > 0, "{}: no work done", row["scenario"]);
        assert!(row["latency"]["p99_ms"].as_f64().unwrap() > 0.0, "{}", row["scenario"]);
        assert!(row["pgbench"]["tps"].as_f64().unwrap() > 0.0, "{}: no pgbench baseline", row["scenario"]);
        assert!(row["ratio"].as_f64().unwrap() > 0.0, "{}: no service/pgbench ratio", row["scenario"]);
        let one_line = ["uniform", "hot", "hot-sold-out"].contains(&row["scenario"].as_str().unwrap());
        assert_eq!(row["set_limit_ratio"].is_number(), one_line, "{}: ratio to the set-based limit", row["scenario"]);
        // Two rounds, each with its own baseline, except the sold-out run's (its SKU stays sold
        // out); the row gives their medians, and counts both.
        let rounds = row["rounds"].as_array().unwrap();
        let expected = if row["scenario"] == "hot-sold-out" { 1 } else { 2 };
        assert_eq!(rounds.len(), expected, "{}: rounds {rounds:?}", row["scenario"]);
        let each = |k: &str| -> Vec<f64> { rounds.iter().map(|r| r[k].as_f64().unwrap()).collect() };
        let mean = |v: Vec<f64>| v.iter().sum::<f64>() / v.len() as f64;
        assert!((row["throughput"].as_f64().unwrap() - mean(each("throughput"))).abs() < 1e-6, "{row}");
        assert!((row["ratio"].as_f64().unwrap() - mean(each("ratio"))).abs() < 1e-9, "{row}");
        assert!(each("pgbench_tps").iter().all(|t| *t > 0.0), "{row}");
    }
    let limit = &report["set_limit"];
    assert!(limit["reservations_per_sec"].as_f64().unwrap() > 0.0, "the set-based anchor ran: {limit}");
    assert_eq!(limit["rounds"].as_array().unwrap().len(), 2, "the set-based anchor ran in each round: {limit}");
    let per_tx = limit["reservations_per_transaction"].as_f64().unwrap();
    assert!((9.0..=10.0).contains(&per_tx), "about 10 reservations per transaction: {per_tx}");
    let open: Vec<(u64, f64)> = report["open_loop"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| (r["percent"].as_u64().unwrap(), r["offered_per_sec"].as_f64().unwrap()))
        .collect();
    let closed = rows[0]["throughput"].as_f64().unwrap();
    assert_eq!(open.iter().map(|(p, _)| *p).collect::<Vec<_>>(), [50, 80], "open-loop runs: {}", report["open_loop"]);
    for (percent, offered) in &open {
        assert!((offered - closed * *percent as f64 / 100.0).abs() < 1e-6, "offered {offered} at {percent} %");
    }
    for row in report["open_loop"].as_array().unwrap() {
        let answered: u64 = row["statuses"].as_object().unwrap().iter().map(|(_, n)| n.as_u64().unwrap()).sum();
        assert_eq!(row["statuses"].get("0"), None, "open loop: requests got no answer: {row}");
        assert!(answered > 0 && row["latency"]["p99_ms"].as_f64().unwrap() > 0.0, "{row}");
    }
    let sold_out = rows.iter().find(|r| r["scenario"] == "hot-sold-out").unwrap();
    assert_eq!(sold_out["statuses"]["201"], 300, "exactly the stock is sold: {}", sold_out["statuses"]);
    assert!(sold_out["statuses"]["409"].as_u64().unwrap() > 0, "the run ends with refusals");

    let admin = sqlx::PgPool::connect(&server).await.unwrap();
    for db in [name.clone(), format!("{name}_pgbench")] {
        sqlx::query(sqlx::AssertSqlSafe(format!("DROP DATABASE {db} WITH (FORCE)"))).execute(&admin).await.unwrap();
    }
    let _ = std::fs::remove_dir_all(&work);
}
