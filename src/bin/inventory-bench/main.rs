//! `inventory-bench`: the service over HTTP against a pgbench baseline, on the same data, in one
//! invocation. Brings up its own PostgreSQL (durable commits) unless `DATABASE_URL` is set,
//! loads the data set with `inventory import`, runs the scenarios, verifies the invariants with
//! `inventory check`, and writes a table to `bench/results/`. See README, "Benchmark".

mod load;
mod pgbench;
mod report;
mod scenarios;

use std::io::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode};
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::{Duration, Instant};

use clap::Parser;
use inventory::local_pg::{Durability, LocalPostgres, find_bin_dir};
use rand::{Rng, SeedableRng};
use serde_json::json;
use sqlx::{Connection, PgConnection};

use report::{BaselineRow, ImportRow, Latency, Report, ScenarioRow, SetLimit};
use scenarios::{HOT_WAREHOUSE, HotSkus, Scenario, Shared};

#[derive(Debug, Parser)]
#[command(name = "inventory-bench", about = "Benchmark the inventory service against a pgbench baseline")]
struct Args {
    /// Seconds each scenario (and each pgbench baseline) runs.
    #[arg(long, default_value_t = 20)]
    duration_secs: u64,
    /// Concurrent clients (closed loop, one keep-alive connection each).
    #[arg(long, default_value_t = 16)]
    clients: usize,
    /// Concurrent clients of the hot-SKU scenarios.
    #[arg(long, default_value_t = 64)]
    hot_clients: usize,
    /// SKUs in the data set; each is stocked in every warehouse.
    #[arg(long, default_value_t = 250_000)]
    skus: usize,
    #[arg(long, default_value_t = 4)]
    warehouses: usize,
    /// Units on hand per stock level.
    #[arg(long, default_value_t = 1_000_000)]
    on_hand: i64,
    /// Units of the sold-out run's SKU: exactly these must be sold.
    #[arg(long, default_value_t = 10_000)]
    sold_out_stock: i64,
    /// Scenarios to run, comma-separated (default: all).
    #[arg(long, value_enum, value_delimiter = ',')]
    scenarios: Vec<Scenario>,
    /// Skip the pgbench baselines.
    #[arg(long)]
    no_pgbench: bool,
    /// A server to use instead of starting one; the benchmark (re)creates its own databases on it.
    #[arg(long, env = "DATABASE_URL")]
    database_url: Option<String>,
    /// Name of the benchmark's database (dropped and recreated; `<name>_pgbench` too).
    #[arg(long, default_value = "inventory_bench")]
    database_name: String,
    /// Where the local cluster and work files live.
    #[arg(long, default_value = ".bench")]
    data_dir: PathBuf,
    /// The `inventory` binary to benchmark (default: next to this one).
    #[arg(long)]
    inventory_bin: Option<PathBuf>,
    /// Where the results table goes.
    #[arg(long, default_value = "bench/results")]
    out: PathBuf,
    /// `RUST_LOG` of the service under test.
    #[arg(long, default_value = "info")]
    service_log: String,
    /// Keep the data set of the previous run when it has the same shape (skips the import).
    #[arg(long)]
    reuse_data: bool,
    /// Live event streams (`GET /v1/events/stream`, every fourth filtered by type) held open
    /// during every scenario, to measure what consumers of the feed cost the order path.
    #[arg(long, default_value_t = 0)]
    event_streams: usize,
    /// Skip the open-loop runs of the uniform scenario (at 50 % and 80 % of its closed-loop
    /// throughput, the median over the rounds; once, after the last round; latency from each
    /// request's due time).
    #[arg(long)]
    no_open_loop: bool,
    /// A quick run that only proves the benchmark works: 1 s per scenario, 2,000 SKUs.
    #[arg(long)]
    smoke: bool,
    /// Runs of the whole sequence (the set-based anchor, then each scenario after its pgbench
    /// baseline). The table gives each figure's median over the rounds, each ratio the median of
    /// the ratios taken side by side within a round, and lists every round's figures: on a
    /// machine whose speed drifts between minutes, one round can decide a verdict by chance.
    /// The sold-out run runs in the first round only (its SKU stays sold out).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=20))]
    rounds: u32,
}

impl Args {
    fn apply_smoke(&mut self) {
        if self.smoke {
            self.duration_secs = 1;
            self.clients = self.clients.min(8);
            self.hot_clients = self.hot_clients.min(16);
            self.skus = self.skus.min(2_000);
            self.sold_out_stock = self.sold_out_stock.min(300);
        }
        if self.scenarios.is_empty() {
            self.scenarios = Scenario::ALL.to_vec();
        }
    }
}

fn main() -> ExitCode {
    let mut args = Args::parse();
    args.apply_smoke();
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build();
    match runtime.map_err(|e| e.to_string()).and_then(|rt| rt.block_on(run(&args))) {
        Ok(report) if report.passed() => ExitCode::SUCCESS,
        Ok(_) => {
            eprintln!("BENCHMARK FAILED: the invariants did not hold (see the table above)");
            ExitCode::FAILURE
        }
        Err(err) => {
            eprintln!("inventory-bench: {err}");
            ExitCode::FAILURE
        }
    }
}

/// The server and the URLs of the two databases.
#[derive(Debug)]
struct Databases {
    local: Option<LocalPostgres>,
    admin_url: String,
    service_url: String,
    pgbench_url: String,
}

async fn run(args: &Args) -> Result<Report, String> {
    let started_at = chrono::Utc::now().format("%Y-%m-%dT%H:%M:%SZ").to_string();
    std::fs::create_dir_all(&args.data_dir).map_err(|e| format!("{}: {e}", args.data_dir.display()))?;
    let work = args.data_dir.canonicalize().map_err(|e| e.to_string())?;
    let inventory = args.inventory_bin.clone().unwrap_or_else(sibling_inventory);
    let dbs = databases(args, &work).await?;
    let result = benchmark(args, &work, &inventory, &dbs, started_at).await;
    if let Some(local) = dbs.local.filter(LocalPostgres::launched) {
        let _ = tokio::task::spawn_blocking(move || local.stop()).await;
    }
    let report = result?;
    println!("\n{}", report.markdown());
    let path = report.write(&args.out)?;
    println!("written to {}", path.display());
    Ok(report)
}

async fn benchmark(
    args: &Args,
    work: &Path,
    inventory: &Path,
    dbs: &Databases,
    started_at: String,
) -> Result<Report, String> {
    let mut config = json!({
        "duration_secs": args.duration_secs, "clients": args.clients, "hot_clients": args.hot_clients,
        "skus": args.skus, "warehouses": args.warehouses, "on_hand": args.on_hand,
        "sold_out_stock": args.sold_out_stock, "service_log": args.service_log, "rounds": args.rounds,
        "database": if args.database_url.is_some() { "DATABASE_URL" } else { "own cluster, durable commits" },
    });
    step("applying migrations");
    inventory_command(inventory, &dbs.service_url, &["migrate"])?;
    let mut admin = PgConnection::connect(&dbs.service_url).await.map_err(|e| e.to_string())?;
    let levels: i64 = sqlx::query_scalar("SELECT count(*) FROM stock_levels WHERE sku LIKE 'SKU-%'")
        .fetch_one(&mut admin)
        .await
        .map_err(|e| e.to_string())?;
    let wanted = (args.skus * args.warehouses) as i64;
    let import = if args.reuse_data && levels == wanted {
        step(&format!("reusing the {levels} stock levels already loaded"));
        None
    } else if levels == 0 {
        Some(load_data(args, work, inventory, &dbs.service_url)?)
    } else {
        return Err(format!(
            "the database holds {levels} stock levels, not {wanted}: drop it or run without --reuse-data"
        ));
    };
    let hot = HotSkus::new(&started_at);
    load_hot(args, work, inventory, &dbs.service_url, &hot)?;
    // Only the tables the import filled (the pgbench copy inherits these statistics). Analyzed
    // while still empty, the reservation tables would get seq-scan plans for their foreign-key
    // checks, cached in every pooled connection and slower as the tables grow: a fresh production
    // database never has analyzed-empty tables (autovacuum skips them).
    sqlx::query("VACUUM ANALYZE skus, warehouses, stock_levels, ledger, events")
        .execute(&mut admin)
        .await
        .map_err(|e| e.to_string())?;
    let version: String = sqlx::query_scalar("SHOW server_version").fetch_one(&mut admin).await.unwrap_or_default();
    admin.close().await.map_err(|e| e.to_string())?;
    if !args.no_pgbench {
        step("copying the data set for pgbench");
        copy_database(args, &dbs.admin_url).await?;
    }
    let pgbench = if args.no_pgbench { None } else { Some(find_pgbench()?) };

    let (mut service, addr) = start_service(args, work, inventory, &dbs.service_url).await?;
    if let Err(err) = settle(&dbs.service_url).await {
        stop(&mut service);
        return Err(err);
    }
    let target = Target { args, work, dbs, pgbench: pgbench.as_deref(), pid: service.id(), addr, hot: &hot };
    let outcome = run_scenarios(&target).await;
    let open_loop = match &outcome {
        Ok((rows, ..)) if !args.no_open_loop => open_loop_runs(args, addr, rows).await,
        _ => Vec::new(),
    };
    stop(&mut service);
    let (rows, sold_out_created, set_limit) = outcome?;

    step("verifying the invariants (inventory check)");
    let violations = match inventory_command(inventory, &dbs.service_url, &["check"]) {
        Ok(_) => Vec::new(),
        Err(report) => vec![report],
    };
    let sold_out_problems = verify_sold_out(args, &dbs.service_url, &hot.sold_out, sold_out_created).await?;
    config["postgres"] = json!(version);
    Ok(Report {
        started_at,
        commit: commit(),
        machine: machine(),
        config,
        import,
        scenarios: rows,
        set_limit,
        open_loop,
        violations,
        sold_out_problems,
    })
}

/// The uniform scenario again, open-loop, at 50 % and 80 % of the throughput its closed-loop
/// run reached (the median over the rounds), once after the last round, on as many connections
/// as it had clients.
async fn open_loop_runs(args: &Args, addr: SocketAddr, rows: &[ScenarioRow]) -> Vec<report::OpenLoopRow> {
    let Some(closed) = rows.iter().find(|r| r.scenario == Scenario::Uniform && r.throughput > 0.0) else {
        return Vec::new();
    };
    let mut runs = Vec::new();
    for percent in [50, 80] {
        let rate = closed.throughput * f64::from(percent) / 100.0;
        step(&format!("service `uniform`, open loop at {rate:.0}/s ({percent} % of the closed-loop maximum)"));
        let tag = format!("open-{}-{percent}", std::process::id());
        let mut rng = rand::rngs::SmallRng::seed_from_u64(u64::from(percent));
        let (skus, warehouses) = (args.skus, args.warehouses);
        let duration = Duration::from_secs(args.duration_secs);
        let started = Instant::now();
        let mut tally = load::open_loop(addr, rate, duration, args.clients, |n| {
            let line = json!({"sku": scenarios::sku(rng.random_range(0..skus)), "quantity": 1,
                              "warehouse": scenarios::warehouse(rng.random_range(0..warehouses))});
            let body = json!({"order_id": format!("{tag}-{n}"), "lines": [line],
                              "ttl_seconds": scenarios::UNFINISHED_TTL_SECS});
            (hyper::Method::POST, "/v1/reservations".to_owned(), Some(body.to_string()))
        })
        .await;
        let seconds = started.elapsed().as_secs_f64();
        let row = report::OpenLoopRow {
            percent,
            connections: args.clients,
            offered_per_sec: rate,
            achieved_per_sec: tally.ops as f64 / seconds,
            latency: Latency::of(&mut tally),
            statuses: tally.by_status.clone(),
        };
        println!(
            "  achieved {:.0}/s, p50 {:.1} ms, p99 {:.1} ms",
            row.achieved_per_sec, row.latency.p50_ms, row.latency.p99_ms
        );
        runs.push(row);
    }
    runs
}

/// What every scenario runs against.
#[derive(Debug, Clone, Copy)]
struct Target<'a> {
    args: &'a Args,
    work: &'a Path,
    dbs: &'a Databases,
    pgbench: Option<&'a Path>,
    /// The service's process.
    pid: u32,
    addr: SocketAddr,
    hot: &'a HotSkus,
}

async fn run_scenarios(target: &Target<'_>) -> Result<(Vec<ScenarioRow>, Option<u64>, Option<SetLimit>), String> {
    let Target { args, work, dbs, pgbench, hot, .. } = *target;
    let mut rounds: Vec<Vec<ScenarioRow>> = args.scenarios.iter().map(|_| Vec::new()).collect();
    let mut set_limits = Vec::new();
    let mut sold_out_created = None;
    for round in 0..args.rounds {
        if args.rounds > 1 {
            step(&format!("round {} of {}", round + 1, args.rounds));
        }
        // The sold-out run is over after the first round (its SKU stays sold out).
        let runs = |s: &Scenario| round == 0 || *s != Scenario::HotSoldOut;
        let set_limit = match pgbench {
            Some(pgbench) if args.scenarios.iter().filter(|s| runs(s)).any(|s| s.one_line_reservations()) => {
                Some(set_based_limit(args, work, dbs, pgbench, &hot.restocked).await?)
            }
            _ => None,
        };
        let mut baselines = std::collections::HashMap::new();
        for (i, &scenario) in args.scenarios.iter().enumerate() {
            if !runs(&scenario) {
                continue;
            }
            let tag = format!("bench-{}-{round}-{i}", std::process::id());
            let row = run_scenario(target, &mut baselines, set_limit.as_ref(), scenario, tag).await?;
            if scenario == Scenario::HotSoldOut {
                sold_out_created = Some(row.statuses.get(&201).copied().unwrap_or(0));
            }
            rounds[i].push(row);
        }
        set_limits.extend(set_limit);
    }
    let rows = rounds.into_iter().filter(|r| !r.is_empty()).map(ScenarioRow::merged).collect();
    let set_limit = (!set_limits.is_empty()).then(|| SetLimit::merged(set_limits));
    Ok((rows, sold_out_created, set_limit))
}

/// One run of one scenario, after its pgbench baseline (run now unless `baselines` has it from
/// an earlier scenario of this round).
async fn run_scenario(
    target: &Target<'_>,
    baselines: &mut std::collections::HashMap<(pgbench::Workload, usize), BaselineRow>,
    set_limit: Option<&SetLimit>,
    scenario: Scenario,
    tag: String,
) -> Result<ScenarioRow, String> {
    let Target { args, work, dbs, pgbench, pid, addr, hot } = *target;
    let clients = match scenario {
        Scenario::Hot | Scenario::HotSoldOut => args.hot_clients,
        _ => args.clients,
    };
    let workload = scenario.baseline();
    let baseline = match pgbench {
        // The hot baseline serves both hot runs.
        Some(_) if baselines.contains_key(&(workload, clients)) => baselines.get(&(workload, clients)).cloned(),
        Some(pgbench) => {
            step(&format!("pgbench baseline `{workload}`, {clients} clients, {} s", args.duration_secs));
            let run = pgbench::Run {
                pgbench,
                url: &dbs.pgbench_url,
                work_dir: work,
                workload,
                clients,
                duration_secs: args.duration_secs,
                skus: args.skus,
                warehouses: args.warehouses,
                hot_sku: &hot.restocked,
            };
            checkpoint(&dbs.admin_url).await;
            let wal = wal_bytes(&dbs.admin_url).await;
            let mut row = BaselineRow::of(pgbench::run(&run)?);
            row.wal_kb_per_tx = per_op_kb(wal, wal_bytes(&dbs.admin_url).await, row.transactions);
            baselines.insert((workload, clients), row.clone());
            Some(row)
        }
        None => None,
    };
    step(&format!("service `{scenario}`, {clients} clients, {} s", args.duration_secs));
    reset_peak_rss(pid);
    let shared = Arc::new(Shared {
        addr,
        skus: args.skus,
        warehouses: args.warehouses,
        tag,
        expire_ttl_secs: 2,
        sold_out: AtomicBool::new(false),
        hot: hot.clone(),
    });
    checkpoint(&dbs.admin_url).await;
    let batches_before = batch_totals(addr).await;
    let wal_before = wal_bytes(&dbs.admin_url).await;
    let started = Instant::now();
    // The sold-out run lasts until the row is empty, within reason.
    let duration = match scenario {
        Scenario::HotSoldOut => Duration::from_secs(args.duration_secs.max(60)),
        _ => Duration::from_secs(args.duration_secs),
    };
    let deadline = started + duration;
    // Live consumers: they start at the feed's current end, as a consumer resuming from its
    // cursor does (one starting from 0 replays the whole retained history first).
    let head = if args.event_streams > 0 { feed_head(&dbs.service_url).await } else { 0 };
    let streams: Vec<_> =
        (0..args.event_streams).map(|n| tokio::spawn(load::hold_stream(addr, n, head, deadline))).collect();
    let lag = tokio::spawn(watch_expiry_lag(addr, deadline));
    let tasks: Vec<_> =
        (0..clients).map(|c| tokio::spawn(scenarios::run_client(scenario, Arc::clone(&shared), c, deadline))).collect();
    let mut tally = load::Tally::default();
    for task in tasks {
        tally.merge(task.await.map_err(|e| e.to_string())?);
    }
    let seconds = started.elapsed().as_secs_f64();
    let max_expiry_lag_secs = lag.await.ok();
    let mut held = load::StreamTally::default();
    for stream in streams {
        let one = stream.await.map_err(|e| e.to_string())?;
        held.held += one.held;
        held.failed += one.failed;
        held.events += one.events;
    }
    let wal_kb_per_op = per_op_kb(wal_before, wal_bytes(&dbs.admin_url).await, tally.ops);
    let (sum, count) = batch_totals(addr).await;
    let mean_batch = (count > batches_before.1).then(|| (sum - batches_before.0) / (count - batches_before.1));
    let throughput = tally.ops as f64 / seconds;
    let ratio = baseline.as_ref().filter(|b| b.tps > 0.0).map(|b| throughput / b.tps);
    let set_limit_ratio = set_limit
        .filter(|l| scenario.one_line_reservations() && l.reservations_per_sec > 0.0)
        .map(|l| throughput / l.reservations_per_sec);
    let latency = Latency::of(&mut tally);
    let row = ScenarioRow {
        rounds: vec![report::Round {
            throughput,
            p99_ms: latency.p99_ms,
            pgbench_tps: baseline.as_ref().map(|b| b.tps),
            ratio,
            set_limit_ratio,
        }],
        scenario,
        unit: scenario.unit(),
        clients,
        seconds,
        ops: tally.ops,
        throughput,
        requests: tally.requests(),
        requests_per_sec: tally.requests() as f64 / seconds,
        latency,
        statuses: tally.by_status.clone(),
        service_peak_rss_mb: peak_rss_mb(pid),
        pgbench: baseline,
        ratio,
        set_limit_ratio,
        mean_batch,
        wal_kb_per_op,
        streams: (args.event_streams > 0).then_some(held),
        max_expiry_lag_secs,
    };
    println!(
        "  {:.0} {}/s, p99 {:.1} ms, answers {:?}{}",
        row.throughput,
        row.unit,
        row.latency.p99_ms,
        row.statuses,
        if tally.failures() > 0 { "  <- failures" } else { "" }
    );
    if let Some(streams) = &row.streams {
        println!(
            "  event streams: {} held, {} refused or broken, {} events delivered",
            streams.held, streams.failed, streams.events
        );
    }
    if let Some(lag) = row.max_expiry_lag_secs.filter(|l| *l > 0.0) {
        println!("  expiry lag (oldest overdue hold at a sweep), worst: {lag:.1} s");
    }
    Ok(row)
}

/// Clients of the set-based anchor: where this machine's PostgreSQL does the most of that work.
const SET_CLIENTS: usize = 16;

/// Runs the set-based anchor (see `pgbench::SET_SIZE`) once, on the pgbench copy of the data.
async fn set_based_limit(
    args: &Args,
    work: &Path,
    dbs: &Databases,
    pgbench: &Path,
    hot_sku: &str,
) -> Result<SetLimit, String> {
    step(&format!("pgbench set-based limit, {SET_CLIENTS} clients, {} s", args.duration_secs));
    let run = pgbench::Run {
        pgbench,
        url: &dbs.pgbench_url,
        work_dir: work,
        workload: pgbench::Workload::Set,
        clients: SET_CLIENTS,
        duration_secs: args.duration_secs,
        skus: args.skus,
        warehouses: args.warehouses,
        hot_sku,
    };
    checkpoint(&dbs.admin_url).await;
    let wal = wal_bytes(&dbs.admin_url).await;
    let entries = pgbench_entries(&dbs.pgbench_url).await?;
    let mut baseline = BaselineRow::of(pgbench::run(&run)?);
    baseline.wal_kb_per_tx = per_op_kb(wal, wal_bytes(&dbs.admin_url).await, baseline.transactions);
    // Reservations really made: a repeated pick, or a row without stock, takes fewer than 10.
    let made = pgbench_entries(&dbs.pgbench_url).await? - entries;
    let per_tx = made as f64 / baseline.transactions.max(1) as f64;
    let limit = SetLimit {
        rounds: vec![baseline.tps * per_tx],
        clients: SET_CLIENTS,
        reservations_per_transaction: per_tx,
        reservations_per_sec: baseline.tps * per_tx,
        baseline,
    };
    println!("  {:.0} reservations/s ({:.0} transactions/s)", limit.reservations_per_sec, limit.baseline.tps);
    Ok(limit)
}

/// Waits until the service has expired whatever holds of earlier runs are overdue by now and
/// relayed every event (the import's, one per new level, and the expiries'), then vacuums what
/// that left behind, so the scenarios measure the steady state, not a backlog. (A reused data
/// set keeps the unfinished holds of every earlier run: those of runs before the benchmark gave
/// them a week fell due 15 minutes later, and the expiry sweep released them, thousands a
/// second, during whichever scenario was running.)
async fn settle(url: &str) -> Result<(), String> {
    let mut conn = PgConnection::connect(url).await.map_err(|e| e.to_string())?;
    let overdue = "SELECT count(*) FROM reservations WHERE status = 'active' AND expires_at <= now()";
    let expired = wait_until_none(&mut conn, overdue, "overdue holds to expire").await?;
    if expired > Duration::from_secs(1) {
        step(&format!("the service expired the earlier runs' overdue holds in {:.1} s", expired.as_secs_f64()));
    }
    let relayed = wait_until_none(&mut conn, "SELECT count(*) FROM unrelayed_events()", "events to relay").await?;
    if relayed > Duration::from_secs(1) {
        step(&format!("the service relayed the backlog of events in {:.1} s", relayed.as_secs_f64()));
    }
    if expired + relayed > Duration::from_secs(1) {
        step("vacuuming");
        // The still-empty reservation tables of a new data set stay unanalyzed (see `benchmark`).
        let tables = if expired > Duration::from_secs(1) {
            "VACUUM ANALYZE reservations, reservation_allocations, stock_levels, events, event_ids"
        } else {
            "VACUUM ANALYZE events, event_ids"
        };
        sqlx::query(tables).execute(&mut conn).await.map_err(|e| e.to_string())?;
    }
    conn.close().await.map_err(|e| e.to_string())
}

/// Polls `count` (a `SELECT count(*) …`) until it answers 0, for at most 10 minutes; how long
/// that took.
async fn wait_until_none(conn: &mut PgConnection, count: &'static str, what: &str) -> Result<Duration, String> {
    let started = Instant::now();
    loop {
        let pending: i64 = sqlx::query_scalar(count).fetch_one(&mut *conn).await.map_err(|e| e.to_string())?;
        if pending == 0 {
            return Ok(started.elapsed());
        }
        if started.elapsed() > Duration::from_secs(600) {
            return Err(format!("the service still has {pending} {what} after 10 minutes"));
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// Every measured run starts right after a checkpoint, so each pays the same full-page images
/// for the pages it touches first (without one, whichever run a checkpoint lands in loses).
/// Needs a superuser or `pg_checkpoint`; without, runs simply start wherever the cycle is.
async fn checkpoint(url: &str) {
    if let Ok(mut conn) = PgConnection::connect(url).await {
        let _ = sqlx::query("CHECKPOINT").execute(&mut conn).await;
        let _ = conn.close().await;
    }
}

/// Bytes of WAL the cluster has written so far (every database, background work included).
async fn wal_bytes(url: &str) -> Option<f64> {
    let mut conn = PgConnection::connect(url).await.ok()?;
    let bytes = sqlx::query_scalar("SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), '0/0')::float8")
        .fetch_one(&mut conn)
        .await
        .ok();
    let _ = conn.close().await;
    bytes
}

/// Ledger entries pgbench has written so far.
async fn pgbench_entries(url: &str) -> Result<i64, String> {
    let mut conn = PgConnection::connect(url).await.map_err(|e| e.to_string())?;
    let n = sqlx::query_scalar("SELECT count(*) FROM ledger WHERE reference = 'pgbench'")
        .fetch_one(&mut conn)
        .await
        .map_err(|e| e.to_string())?;
    let _ = conn.close().await;
    Ok(n)
}

fn per_op_kb(before: Option<f64>, after: Option<f64>, ops: u64) -> Option<f64> {
    Some((after? - before?) / 1024.0 / (ops.max(1) as f64))
}

/// The highest event id relayed so far (0 when unknown).
async fn feed_head(url: &str) -> i64 {
    let Ok(mut conn) = PgConnection::connect(url).await else { return 0 };
    sqlx::query_scalar("SELECT coalesce(max(id), 0) FROM event_ids").fetch_one(&mut conn).await.unwrap_or(0)
}

/// The largest `inventory_expiry_lag_seconds` (the oldest overdue hold at a sweep) seen once a second
/// until `deadline`.
async fn watch_expiry_lag(addr: SocketAddr, deadline: Instant) -> f64 {
    let mut client = load::Client::new(addr);
    let mut worst: f64 = 0.0;
    while Instant::now() < deadline {
        if let Some(answer) = client.send(hyper::Method::GET, "/metrics", None).await {
            let text = String::from_utf8_lossy(&answer.body);
            let lag = text.lines().find_map(|l| {
                l.strip_prefix(inventory::metrics::EXPIRY_LAG)?.strip_prefix(' ')?.trim().parse::<f64>().ok()
            });
            worst = worst.max(lag.unwrap_or(0.0));
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    worst
}

/// `(sum, count)` of the service's reservation batch sizes so far, from `/metrics`.
async fn batch_totals(addr: SocketAddr) -> (f64, f64) {
    let mut client = load::Client::new(addr);
    let Some(answer) = client.send(hyper::Method::GET, "/metrics", None).await else { return (0.0, 0.0) };
    let text = String::from_utf8_lossy(&answer.body);
    let value = |name: &str| {
        text.lines().find_map(|l| l.strip_prefix(name).and_then(|rest| rest.trim().parse::<f64>().ok())).unwrap_or(0.0)
    };
    let name = inventory::metrics::BATCH_SIZE;
    (value(&format!("{name}_sum ")), value(&format!("{name}_count ")))
}

/// The sold-out run must have sold exactly the stock: as many 201s as units, all held.
async fn verify_sold_out(args: &Args, url: &str, sku: &str, created: Option<u64>) -> Result<Vec<String>, String> {
    let Some(created) = created else { return Ok(Vec::new()) };
    let mut conn = PgConnection::connect(url).await.map_err(|e| e.to_string())?;
    let (on_hand, reserved): (i64, i64) =
        sqlx::query_as("SELECT on_hand, reserved FROM stock_levels WHERE sku = $1 AND warehouse = $2")
            .bind(sku)
            .bind(HOT_WAREHOUSE)
            .fetch_one(&mut conn)
            .await
            .map_err(|e| e.to_string())?;
    let stock = args.sold_out_stock;
    let mut problems = Vec::new();
    if created != stock as u64 {
        problems.push(format!("sold-out run: {created} reservations created for {stock} units"));
    }
    if (on_hand, reserved) != (stock, stock) {
        problems.push(format!("sold-out run: on_hand {on_hand}, reserved {reserved}; expected {stock} of {stock}"));
    }
    Ok(problems)
}

fn step(what: &str) {
    println!("== {what}");
    let _ = std::io::stdout().flush();
}

fn sibling_inventory() -> PathBuf {
    std::env::current_exe()
        .ok()
        .and_then(|p| p.parent().map(|d| d.join("inventory")))
        .unwrap_or_else(|| PathBuf::from("inventory"))
}

/// The server: `DATABASE_URL`, or a durable cluster of our own under the data directory.
async fn databases(args: &Args, work: &Path) -> Result<Databases, String> {
    let (local, admin_url) = match &args.database_url {
        Some(url) => (None, url.clone()),
        None => {
            step("starting PostgreSQL (durable commits)");
            let dir = work.to_path_buf();
            let local = tokio::task::spawn_blocking(move || LocalPostgres::start(&dir, Durability::Durable))
                .await
                .map_err(|e| e.to_string())?
                .map_err(|e| e.to_string())?;
            let url = local.socket_url("postgres");
            (Some(local), url)
        }
    };
    let name = &args.database_name;
    let pgbench_name = format!("{name}_pgbench");
    let mut admin = PgConnection::connect(&admin_url).await.map_err(|e| format!("cannot connect: {e}"))?;
    let exists: bool = sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM pg_database WHERE datname = $1)")
        .bind(name)
        .fetch_one(&mut admin)
        .await
        .map_err(|e| e.to_string())?;
    let keep = args.reuse_data && exists;
    let drop = if keep { vec![pgbench_name.as_str()] } else { vec![name.as_str(), pgbench_name.as_str()] };
    for db in drop {
        // Identifiers cannot be bound; the names come from the command line of the operator.
        let sql = format!("DROP DATABASE IF EXISTS \"{}\" WITH (FORCE)", db.replace('"', ""));
        sqlx::query(sqlx::AssertSqlSafe(sql)).execute(&mut admin).await.map_err(|e| e.to_string())?;
    }
    if !keep {
        let sql = format!("CREATE DATABASE \"{}\"", name.replace('"', ""));
        sqlx::query(sqlx::AssertSqlSafe(sql)).execute(&mut admin).await.map_err(|e| e.to_string())?;
    }
    admin.close().await.map_err(|e| e.to_string())?;
    Ok(Databases {
        local,
        service_url: with_database(&admin_url, name),
        pgbench_url: with_database(&admin_url, &pgbench_name),
        admin_url,
    })
}

/// `url` with its database name replaced.
fn with_database(url: &str, name: &str) -> String {
    let (base, query) = url.split_once('?').map_or((url, None), |(b, q)| (b, Some(q)));
    let authority_end = base.find("://").map_or(0, |i| i + 3);
    let base = match base[authority_end..].find('/') {
        Some(i) => &base[..authority_end + i],
        None => base,
    };
    match query {
        Some(q) => format!("{base}/{name}?{q}"),
        None => format!("{base}/{name}"),
    }
}

async fn copy_database(args: &Args, admin_url: &str) -> Result<(), String> {
    let mut admin = PgConnection::connect(admin_url).await.map_err(|e| e.to_string())?;
    let name = args.database_name.replace('"', "");
    let sql = format!("CREATE DATABASE \"{name}_pgbench\" TEMPLATE \"{name}\" STRATEGY FILE_COPY");
    sqlx::query(sqlx::AssertSqlSafe(sql)).execute(&mut admin).await.map_err(|e| e.to_string())?;
    admin.close().await.map_err(|e| e.to_string())
}

fn find_pgbench() -> Result<PathBuf, String> {
    find_bin_dir()
        .map(|d| d.join("pgbench"))
        .filter(|p| p.exists())
        .ok_or_else(|| "pgbench not found (it ships with the PostgreSQL server packages); or pass --no-pgbench".into())
}

/// Runs `inventory <args>` against `url`; its output on failure.
fn inventory_command(inventory: &Path, url: &str, args: &[&str]) -> Result<String, String> {
    let output = Command::new(inventory)
        .args(args)
        .env("DATABASE_URL", url)
        .env("RUST_LOG", "warn")
        .output()
        .map_err(|e| format!("cannot run {}: {e}", inventory.display()))?;
    let text = format!("{}{}", String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr));
    if output.status.success() { Ok(text) } else { Err(format!("inventory {}: {text}", args.join(" "))) }
}

/// Imports this run's hot SKUs (a tiny CSV, through the same `inventory import`).
fn load_hot(args: &Args, work: &Path, inventory: &Path, url: &str, hot: &HotSkus) -> Result<(), String> {
    let csv = work.join("hot.csv");
    let text = format!(
        "sku,warehouse,on_hand\n{},{HOT_WAREHOUSE},1000000000\n{},{HOT_WAREHOUSE},{}\n",
        hot.restocked, hot.sold_out, args.sold_out_stock
    );
    std::fs::write(&csv, text).map_err(|e| format!("{}: {e}", csv.display()))?;
    let csv = csv.display().to_string();
    inventory_command(inventory, url, &["import", &csv, "--create-missing"]).map(drop)
}

/// Writes the data set as CSV and loads it with `inventory import`, timed.
fn load_data(args: &Args, work: &Path, inventory: &Path, url: &str) -> Result<ImportRow, String> {
    let csv = work.join(format!("levels-{}x{}.csv", args.skus, args.warehouses));
    let mut out = std::io::BufWriter::new(std::fs::File::create(&csv).map_err(|e| e.to_string())?);
    let mut write = || -> std::io::Result<()> {
        writeln!(out, "sku,warehouse,on_hand,reorder_point,reorder_quantity")?;
        for s in 0..args.skus {
            for w in 0..args.warehouses {
                writeln!(out, "{},{},{},10,100", scenarios::sku(s), scenarios::warehouse(w), args.on_hand)?;
            }
        }
        out.flush()
    };
    write().map_err(|e| format!("{}: {e}", csv.display()))?;
    let levels = args.skus * args.warehouses;
    step(&format!("importing {levels} stock levels"));
    let log = work.join("import.log");
    let started = Instant::now();
    let mut child = Command::new(inventory)
        .arg("import")
        .arg(&csv)
        .arg("--create-missing")
        .env("DATABASE_URL", url)
        .env("RUST_LOG", "warn")
        .stdout(std::fs::File::create(&log).map_err(|e| e.to_string())?)
        .spawn()
        .map_err(|e| format!("cannot run {}: {e}", inventory.display()))?;
    let mut peak = None;
    let status = loop {
        if let Some(status) = child.try_wait().map_err(|e| e.to_string())? {
            break status;
        }
        peak = peak_rss_mb(child.id()).or(peak);
        std::thread::sleep(Duration::from_millis(50));
    };
    if !status.success() {
        let output = std::fs::read_to_string(&log).unwrap_or_default();
        return Err(format!("inventory import failed ({status}):\n{}", output.chars().take(2_000).collect::<String>()));
    }
    let seconds = started.elapsed().as_secs_f64();
    println!("  {levels} levels in {seconds:.1} s");
    Ok(ImportRow { levels, seconds, levels_per_sec: levels as f64 / seconds, peak_rss_mb: peak })
}

async fn start_service(args: &Args, work: &Path, inventory: &Path, url: &str) -> Result<(Child, SocketAddr), String> {
    let addr = std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).map_err(|e| e.to_string())?;
    let log = std::fs::File::create(work.join("service.log")).map_err(|e| e.to_string())?;
    step(&format!("starting the service on {addr} (log: {})", work.join("service.log").display()));
    let mut child = Command::new(inventory)
        .args(["serve", "--listen", &addr.to_string()])
        .env("DATABASE_URL", url)
        .env("RUST_LOG", &args.service_log)
        .stdout(log.try_clone().map_err(|e| e.to_string())?)
        .stderr(log)
        .spawn()
        .map_err(|e| format!("cannot run {}: {e}", inventory.display()))?;
    if !load::wait_ready(addr, "/health/ready", Duration::from_secs(60)).await {
        stop(&mut child);
        return Err("the service did not become ready within 60 s".into());
    }
    Ok((child, addr))
}

/// SIGTERM (graceful), then wait.
fn stop(child: &mut Child) {
    let _ = Command::new("kill").args(["-TERM", &child.id().to_string()]).status();
    let _ = child.wait();
}

/// Resets the kernel's peak-RSS mark of `pid` so the next reading is this scenario's peak.
fn reset_peak_rss(pid: u32) {
    let _ = std::fs::write(format!("/proc/{pid}/clear_refs"), "5");
}

/// Peak resident set size (VmHWM) of `pid`, in MB.
fn peak_rss_mb(pid: u32) -> Option<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let kb: f64 =
        status.lines().find_map(|l| l.strip_prefix("VmHWM:"))?.trim().trim_end_matches("kB").trim().parse().ok()?;
    Some(kb / 1024.0)
}

fn commit() -> String {
    let git = |args: &[&str]| Command::new("git").args(args).output().ok().filter(|o| o.status.success());
    let Some(head) = git(&["rev-parse", "--short", "HEAD"]) else { return "unknown".into() };
    let head = String::from_utf8_lossy(&head.stdout).trim().to_owned();
    let dirty = git(&["status", "--porcelain", "--untracked-files=no"]).is_some_and(|o| !o.stdout.is_empty());
    if dirty { format!("{head}-dirty") } else { head }
}

fn machine() -> std::collections::BTreeMap<&'static str, String> {
    let read = |path: &str| std::fs::read_to_string(path).unwrap_or_default();
    let cpu = read("/proc/cpuinfo")
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .map(|m| m.trim_start_matches([' ', '\t', ':']).to_owned());
    let mem = read("/proc/meminfo").lines().find_map(|l| l.strip_prefix("MemTotal:")).map(|m| m.trim().to_owned());
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    [
        ("cpu", cpu.unwrap_or_default()),
        ("cores", cores.to_string()),
        ("memory", mem.unwrap_or_default()),
        ("kernel", read("/proc/sys/kernel/osrelease").trim().to_owned()),
    ]
    .into_iter()
    .collect()
}
