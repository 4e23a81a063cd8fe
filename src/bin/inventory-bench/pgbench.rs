//! The baselines: pgbench (a C client, no HTTP) running, against a copy of the same schema and
//! data, in plain SQL the database work a client of the service causes — the same tables and
//! rows (stock level updates, reservation and ledger inserts), one order per transaction.

use std::fmt;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::load::Tally;
use crate::scenarios::{AVAILABILITY_SKUS, HOT_WAREHOUSE, MULTI5_LINES};

/// What pgbench runs: the baseline of a scenario, or the set-based anchor.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Workload {
    /// The one-reservation transaction on a random row.
    Uniform,
    /// The one-reservation transaction, every client on the same row (`-D hot=…`).
    Hot,
    /// One 5-line order over random SKUs per transaction.
    Multi5,
    /// reserve, then fulfil / release / nothing, in two transactions.
    Lifecycle,
    /// The availability read of 10 random SKUs.
    Availability,
    /// 90 % availability, 10 % lifecycle.
    Mixed,
    /// [`SET_SIZE`] one-line reservations decided by one statement.
    Set,
}

impl Workload {
    /// The pgbench script.
    pub fn script(self) -> String {
        let random_row = ("'SKU-' || lpad(:n::text, 6, '0')", "'WH' || :w");
        match self {
            Self::Uniform => reserve_script(random_row, false),
            Self::Hot => reserve_script((":hot", &format!("'{HOT_WAREHOUSE}'")), false),
            Self::Multi5 => multi5_script(),
            Self::Lifecycle => lifecycle_script(),
            Self::Availability => availability_script(),
            Self::Mixed => format!(
                "\\set m random(1, 100)\n\\if :m <= 90\n{}\\else\n{}\\endif\n",
                availability_script(),
                lifecycle_script()
            ),
            Self::Set => set_script(),
        }
    }

    /// What one run of the script does, in one line.
    pub fn description(self) -> String {
        match self {
            Self::Uniform => "one transaction: conditional `UPDATE stock_levels … RETURNING` of a random row, a \
                              reservation insert, a ledger insert"
                .into(),
            Self::Hot => "the `uniform` transaction, every client on the same row".into(),
            Self::Multi5 => format!(
                "one transaction per order: a reservation insert, every level of {MULTI5_LINES} random SKUs locked \
                 (`SELECT … ORDER BY sku, warehouse FOR UPDATE`), then per line the reserved update of the first \
                 warehouse by priority with a unit, and a ledger insert"
            ),
            Self::Lifecycle => "one script per lifecycle: the `uniform` transaction, then a second one that locks \
                                the reservation, updates the level, inserts a ledger entry and sets the status — 70 % \
                                fulfil, 20 % release; 10 % stop after the reserve (left to expire: nothing sweeps \
                                the copy)"
                .into(),
            Self::Availability => format!(
                "the service's availability statement (levels of {AVAILABILITY_SKUS} random SKUs in active \
                 warehouses, one row per SKU), no transaction around it"
            ),
            Self::Mixed => "90 % the `availability` script, 10 % the `lifecycle` script, drawn per run".into(),
            Self::Set => format!(
                "{SET_SIZE} one-line reservations of random rows decided by one statement per transaction (the \
                 set-based limit)"
            ),
        }
    }
}

impl fmt::Display for Workload {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let name = serde_json::to_value(self).ok().and_then(|v| v.as_str().map(str::to_owned)).unwrap_or_default();
        f.write_str(&name)
    }
}

/// The single-reservation transaction on the row `(sku, warehouse)` (SQL expressions); with
/// `keep_id` the reservation's id is kept in `:rid` for a later step.
fn reserve_script((sku, warehouse): (&str, &str), keep_id: bool) -> String {
    let keep = if keep_id { "\nRETURNING id AS rid \\gset" } else { ";" };
    format!(
        "\\set n random(0, :skus - 1)
\\set w random(0, :warehouses - 1)
BEGIN;
UPDATE stock_levels SET reserved = reserved + 1, updated_at = now()
 WHERE sku = {sku} AND warehouse = {warehouse} AND on_hand - reserved >= 1
RETURNING on_hand AS oh, reserved AS rs \\gset
INSERT INTO reservations (id, order_id, strategy, expires_at)
VALUES (gen_random_uuid(), 'pgbench-' || gen_random_uuid(), 'priority', now() + interval '15 minutes'){keep}
INSERT INTO ledger (id, sku, warehouse, kind, on_hand_delta, reserved_delta, on_hand_after, reserved_after, reference)
VALUES (gen_random_uuid(), {sku}, {warehouse}, 'reserve', 0, 1, :oh, :rs, 'pgbench');
END;
"
    )
}

/// The `multi5` order as the service does it: the reservation row first (its lock order), then
/// every level of the order's SKUs in active warehouses locked in (sku, warehouse) order, then
/// each line takes its unit from the first warehouse by (priority, code) that has one — the
/// priority allocation — with a ledger entry.
fn multi5_script() -> String {
    let sku = |i: usize| format!("'SKU-' || lpad(:s{i}::text, 6, '0')");
    let mut out = String::new();
    for i in 1..=MULTI5_LINES {
        out += &format!("\\set s{i} random(0, :skus - 1)\n");
    }
    let skus: Vec<String> = (1..=MULTI5_LINES).map(sku).collect();
    out += &format!(
        "BEGIN;
INSERT INTO reservations (id, order_id, strategy, expires_at)
VALUES (gen_random_uuid(), 'pgbench-' || gen_random_uuid(), 'priority', now() + interval '15 minutes');
SELECT l.sku, l.warehouse, l.on_hand, l.reserved, l.backorder_limit, w.priority, w.active, l.reorder_point
  FROM stock_levels l JOIN warehouses w ON w.code = l.warehouse AND w.active
 WHERE l.sku = ANY(ARRAY[{}])
 ORDER BY l.sku, l.warehouse
   FOR UPDATE OF l;
",
        skus.join(", ")
    );
    for sku in &skus {
        out += &format!(
            "UPDATE stock_levels l SET reserved = l.reserved + 1, updated_at = now()
  FROM (SELECT c.warehouse FROM stock_levels c JOIN warehouses w ON w.code = c.warehouse AND w.active
         WHERE c.sku = {sku} AND c.on_hand - c.reserved >= 1
         ORDER BY w.priority, c.warehouse LIMIT 1) pick
 WHERE l.sku = {sku} AND l.warehouse = pick.warehouse
RETURNING l.warehouse AS wh, l.on_hand AS oh, l.reserved AS rs \\gset
INSERT INTO ledger (id, sku, warehouse, kind, on_hand_delta, reserved_delta, on_hand_after, reserved_after, reference)
VALUES (gen_random_uuid(), {sku}, :wh, 'reserve', 0, 1, :oh, :rs, 'pgbench');
"
        );
    }
    out + "END;\n"
}

/// One lifecycle: the `uniform` reserve transaction, then — as the service settles a
/// reservation — a second transaction that locks the reservation row, changes the level, writes
/// the ledger entry and sets the status: 70 % fulfil, 20 % release, 10 % nothing (the hold is
/// left to expire).
fn lifecycle_script() -> String {
    let (sku, warehouse) = ("'SKU-' || lpad(:n::text, 6, '0')", "'WH' || :w");
    let settle = |on_hand_delta: i32, kind: &str, status: &str| {
        format!(
            "BEGIN;
SELECT status FROM reservations WHERE id = :rid FOR UPDATE;
UPDATE stock_levels SET on_hand = on_hand + ({on_hand_delta}), reserved = reserved - 1, updated_at = now()
 WHERE sku = {sku} AND warehouse = {warehouse}
RETURNING on_hand AS oh, reserved AS rs \\gset
INSERT INTO ledger (id, sku, warehouse, kind, on_hand_delta, reserved_delta, on_hand_after, reserved_after, reference)
VALUES (gen_random_uuid(), {sku}, {warehouse}, '{kind}', {on_hand_delta}, -1, :oh, :rs, 'pgbench');
UPDATE reservations SET status = '{status}', updated_at = now() WHERE id = :rid;
END;
"
        )
    };
    format!(
        "\\set r random(1, 100)
{}\\if :r <= 70
{}\\elif :r <= 90
{}\\endif
",
        reserve_script((sku, warehouse), true),
        settle(-1, "fulfil", "fulfilled"),
        settle(0, "release", "released"),
    )
}

/// The service's availability statement (`store::stock::availability`) for
/// [`AVAILABILITY_SKUS`] random SKUs; like the service, outside any transaction.
fn availability_script() -> String {
    let mut out = String::new();
    for i in 1..=AVAILABILITY_SKUS {
        out += &format!("\\set a{i} random(0, :skus - 1)\n");
    }
    let skus: Vec<String> = (1..=AVAILABILITY_SKUS).map(|i| format!("'SKU-' || lpad(:a{i}::text, 6, '0')")).collect();
    out + &format!(
        "SELECT l.sku, array_agg(l.warehouse), array_agg(l.on_hand - l.reserved)
  FROM stock_levels l
 WHERE l.sku = ANY(ARRAY[{}])
   AND l.warehouse <> ALL (ARRAY(SELECT code FROM warehouses WHERE NOT active))
 GROUP BY l.sku;
",
        skus.join(", ")
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

/// What a pgbench run measured.
#[derive(Debug)]
pub struct Baseline {
    pub workload: Workload,
    pub tps: f64,
    pub tally: Tally,
}

#[derive(Debug)]
pub struct Run<'a> {
    pub pgbench: &'a Path,
    pub url: &'a str,
    pub work_dir: &'a Path,
    pub workload: Workload,
    pub clients: usize,
    pub duration_secs: u64,
    pub skus: usize,
    pub warehouses: usize,
    pub hot_sku: &'a str,
}

/// Runs pgbench with per-transaction logging and reads its latencies back.
pub fn run(r: &Run<'_>) -> Result<Baseline, String> {
    let dir = r.work_dir.join(format!("pgbench-{}-{}", r.workload, r.clients));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let script_path = dir.join("script.sql");
    std::fs::write(&script_path, r.workload.script()).map_err(|e| e.to_string())?;
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
    Ok(Baseline { workload: r.workload, tps, tally })
}

fn logs(dir: &Path) -> Result<Vec<PathBuf>, String> {
    let entries = std::fs::read_dir(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    Ok(entries
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.file_name().is_some_and(|n| n.to_string_lossy().starts_with("log.")))
        .collect())
}
