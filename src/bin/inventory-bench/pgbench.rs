//! The baseline: pgbench (a C client, no HTTP) running the one-reservation transaction —
//! conditional UPDATE … RETURNING, reservation insert, ledger insert — against a copy of the
//! same schema and data.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::load::Tally;
use crate::scenarios::HOT_WAREHOUSE;

/// The single-reservation transaction. `:sku_expr` and `:wh_expr` pick the row.
fn script(sku_expr: &str, wh_expr: &str) -> String {
    format!(
        "\\set n random(0, :skus - 1)
\\set w random(0, :warehouses - 1)
BEGIN;
UPDATE stock_levels SET reserved = reserved + 1, updated_at = now()
 WHERE sku = {sku_expr} AND warehouse = {wh_expr} AND on_hand - reserved >= 1
RETURNING on_hand AS oh, reserved AS rs \\gset
INSERT INTO reservations (id, order_id, strategy, expires_at)
VALUES (gen_random_uuid(), 'pgbench-' || gen_random_uuid(), 'priority', now() + interval '15 minutes');
INSERT INTO ledger (id, sku, warehouse, kind, on_hand_delta, reserved_delta, on_hand_after, reserved_after, reference)
VALUES (gen_random_uuid(), {sku_expr}, {wh_expr}, 'reserve', 0, 1, :oh, :rs, 'pgbench');
END;
"
    )
}

/// One-line reservations decided together by one set-based statement per transaction (at most:
/// a row picked twice, or one without stock, is taken once or not at all).
pub const SET_SIZE: usize = 10;

/// The set-based anchor: [`SET_SIZE`] one-line reservations of random rows decided by ONE
/// statement — lock the rows in (sku, warehouse) order, take a unit of each that has one,
/// insert a reservation and a ledger entry per row taken — the same schema work as the
/// one-per-transaction baseline, with none of the per-reservation round trips. What this
/// PostgreSQL can do for this work: the limit the service is measured against.
fn set_script() -> String {
    format!(
        "BEGIN;
WITH pick AS (
  SELECT DISTINCT 'SKU-' || lpad(floor(random() * :skus)::int::text, 6, '0') AS sku,
                  'WH' || floor(random() * :warehouses)::int AS warehouse
    FROM generate_series(1, {SET_SIZE})
), locked AS (
  SELECT l.sku, l.warehouse FROM stock_levels l JOIN pick p USING (sku, warehouse)
   WHERE l.on_hand - l.reserved >= 1
   ORDER BY l.sku, l.warehouse
     FOR UPDATE OF l
), taken AS (
  UPDATE stock_levels l SET reserved = l.reserved + 1, updated_at = now()
    FROM locked k WHERE l.sku = k.sku AND l.warehouse = k.warehouse
  RETURNING l.sku, l.warehouse, l.on_hand, l.reserved
), held AS (
  INSERT INTO reservations (id, order_id, strategy, expires_at)
  SELECT gen_random_uuid(), 'pgbench-' || gen_random_uuid(), 'priority', now() + interval '15 minutes' FROM taken
)
INSERT INTO ledger (id, sku, warehouse, kind, on_hand_delta, reserved_delta, on_hand_after, reserved_after, reference)
SELECT gen_random_uuid(), sku, warehouse, 'reserve', 0, 1, on_hand, reserved, 'pgbench' FROM taken;
END;
"
    )
}

/// The pgbench script of a baseline (`uniform`: a random row; `hot`: always the same row, the
/// SKU passed as `-D hot=…`; `set`: the set-based anchor).
pub fn script_for(baseline: &str) -> String {
    match baseline {
        "hot" => script(":hot", &format!("'{HOT_WAREHOUSE}'")),
        "set" => set_script(),
        _ => script("'SKU-' || lpad(:n::text, 6, '0')", "'WH' || :w"),
    }
}

/// What a pgbench run measured.
#[derive(Debug)]
pub struct Baseline {
    pub tps: f64,
    pub tally: Tally,
}

#[derive(Debug)]
pub struct Run<'a> {
    pub pgbench: &'a Path,
    pub url: &'a str,
    pub work_dir: &'a Path,
    pub baseline: &'a str,
    pub clients: usize,
    pub duration_secs: u64,
    pub skus: usize,
    pub warehouses: usize,
    pub hot_sku: &'a str,
}

/// Runs pgbench with per-transaction logging and reads its latencies back.
pub fn run(r: &Run<'_>) -> Result<Baseline, String> {
    let dir = r.work_dir.join(format!("pgbench-{}-{}", r.baseline, r.clients));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let script_path = dir.join("reserve.sql");
    std::fs::write(&script_path, script_for(r.baseline)).map_err(|e| e.to_string())?;
    let output = Command::new(r.pgbench)
        .args(["--no-vacuum", "--protocol=prepared", "--log"])
        .arg(format!("--log-prefix={}", dir.join("log").display()))
        .arg(format!("--client={}", r.clients))
        .arg(format!("--jobs={}", r.clients.min(2)))
        .arg(format!("--time={}", r.duration_secs.max(1)))
        .arg(format!("--define=skus={}", r.skus))
        .arg(format!("--define=warehouses={}", r.warehouses))
        .arg(format!("--define=hot={}", r.hot_sku))
        .arg(format!("--file={}", script_path.display()))
        .arg(r.url)
        .output()
        .map_err(|e| format!("cannot run {}: {e}", r.pgbench.display()))?;
    let stdout = String::from_utf8_lossy(&output.stdout);
    if !output.status.success() {
        return Err(format!("pgbench failed: {}\n{stdout}", String::from_utf8_lossy(&output.stderr)));
    }
    let tps = stdout
        .lines()
        .find_map(|l| l.strip_prefix("tps = ").and_then(|rest| rest.split_whitespace().next()))
        .and_then(|n| n.parse::<f64>().ok())
        .ok_or_else(|| format!("no tps in pgbench output:\n{stdout}"))?;
    let mut tally = Tally::default();
    for log in logs(&dir)? {
        let text = std::fs::read_to_string(&log).map_err(|e| format!("{}: {e}", log.display()))?;
        // client_id transaction_no time_us script_no time_epoch time_us_part
        for fields in text.lines().map(|l| l.split_whitespace().collect::<Vec<_>>()) {
            let Some(latency) = fields.get(2).and_then(|t| t.parse::<u32>().ok()) else { continue };
            tally.latencies_us.push(latency);
            *tally.by_status.entry(200).or_default() += 1;
        }
    }
    tally.ops = tally.latencies_us.len() as u64;
    Ok(Baseline { tps, tally })
}

fn logs(dir: &Path) -> Result<Vec<PathBuf>, String> {
    let entries = std::fs::read_dir(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    Ok(entries
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.file_name().is_some_and(|n| n.to_string_lossy().starts_with("log.")))
        .collect())
}
