//! The results: a Markdown table for people, JSON for tools, both under `bench/results/`.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::load::Tally;
use crate::pgbench::{Baseline, Workload};
use crate::scenarios::Scenario;

#[derive(Debug, Clone, Serialize)]
pub struct Latency {
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub p999_ms: f64,
}

impl Latency {
    pub fn of(tally: &mut Tally) -> Self {
        Self { p50_ms: tally.quantile_ms(0.50), p99_ms: tally.quantile_ms(0.99), p999_ms: tally.quantile_ms(0.999) }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct BaselineRow {
    /// The script pgbench ran.
    pub workload: Workload,
    /// Script runs per second.
    pub tps: f64,
    pub transactions: u64,
    pub latency: Latency,
    /// WAL written per transaction, in KiB.
    pub wal_kb_per_tx: Option<f64>,
}

impl BaselineRow {
    pub fn of(mut b: Baseline) -> Self {
        Self {
            workload: b.workload,
            tps: b.tps,
            transactions: b.tally.ops,
            latency: Latency::of(&mut b.tally),
            wal_kb_per_tx: None,
        }
    }
}

/// What PostgreSQL does for one-line reservations decided set-based, with no HTTP in between.
#[derive(Debug, Clone, Serialize)]
pub struct SetLimit {
    pub clients: usize,
    pub reservations_per_transaction: f64,
    pub reservations_per_sec: f64,
    pub baseline: BaselineRow,
}

#[derive(Debug, Serialize)]
pub struct ScenarioRow {
    pub scenario: Scenario,
    pub unit: &'static str,
    pub clients: usize,
    pub seconds: f64,
    pub ops: u64,
    pub throughput: f64,
    pub requests: u64,
    pub requests_per_sec: f64,
    pub latency: Latency,
    /// Answers by HTTP status ("0" = no answer).
    pub statuses: BTreeMap<u16, u64>,
    pub service_peak_rss_mb: Option<f64>,
    pub pgbench: Option<BaselineRow>,
    /// Service throughput ÷ pgbench transactions per second.
    pub ratio: Option<f64>,
    /// Service throughput ÷ the set-based limit (reservations per second), for the scenarios
    /// that reserve.
    pub set_limit_ratio: Option<f64>,
    /// Reservations per batch transaction, on average.
    pub mean_batch: Option<f64>,
    /// WAL written per unit of work, in KiB (the whole cluster, background work included).
    pub wal_kb_per_op: Option<f64>,
    /// The live event streams held open during the run (`--event-streams`).
    pub streams: Option<crate::load::StreamTally>,
    /// The worst `expiry_lag_seconds` sampled once a second during the run.
    pub max_expiry_lag_secs: Option<f64>,
}

/// Uniform one-line reservations sent open-loop at a share of the closed loop's throughput.
#[derive(Debug, Serialize)]
pub struct OpenLoopRow {
    /// The share of the closed-loop maximum, in percent.
    pub percent: u32,
    pub connections: usize,
    pub offered_per_sec: f64,
    pub achieved_per_sec: f64,
    /// From the moment each request was due.
    pub latency: Latency,
    pub statuses: BTreeMap<u16, u64>,
}

#[derive(Debug, Serialize)]
pub struct ImportRow {
    pub levels: usize,
    pub seconds: f64,
    pub levels_per_sec: f64,
    pub peak_rss_mb: Option<f64>,
}

#[derive(Debug, Serialize)]
pub struct Report {
    pub started_at: String,
    pub commit: String,
    pub machine: BTreeMap<&'static str, String>,
    pub config: serde_json::Value,
    /// `None` when the data set of an earlier run was reused.
    pub import: Option<ImportRow>,
    pub scenarios: Vec<ScenarioRow>,
    /// The set-based anchor (pgbench, `SET_SIZE` reservations per statement), when it ran.
    pub set_limit: Option<SetLimit>,
    /// Open-loop runs of the uniform scenario (at 50 % and 80 % of its closed-loop throughput).
    pub open_loop: Vec<OpenLoopRow>,
    /// Broken invariants found by `inventory check` after the run (must be empty).
    pub violations: Vec<String>,
    /// Problems with the sold-out run (must be empty).
    pub sold_out_problems: Vec<String>,
}

impl Report {
    pub fn passed(&self) -> bool {
        self.violations.is_empty() && self.sold_out_problems.is_empty()
    }

    pub fn markdown(&self) -> String {
        let mut md = String::new();
        let _ = writeln!(md, "# inventory benchmark, {} (commit {})\n", self.started_at, self.commit);
        for (k, v) in &self.machine {
            let _ = writeln!(md, "- {k}: {v}");
        }
        let _ = writeln!(md, "- config: `{}`\n", self.config);
        match &self.import {
            Some(i) => {
                let _ = writeln!(
                    md,
                    "Import: {} stock levels in {:.1} s ({:.0} levels/s), importer peak RSS {}\n",
                    i.levels,
                    i.seconds,
                    i.levels_per_sec,
                    mb(i.peak_rss_mb)
                );
            }
            None => md.push_str("Import: the data set of an earlier run was reused\n\n"),
        }
        if let Some(limit) = &self.set_limit {
            let _ = writeln!(
                md,
                "Set-based limit (pgbench, {:.0} one-line reservations decided by one statement per transaction, {} \
                 clients): {:.0} reservations/s, {:.0} transactions/s, p99 {:.1} ms\n",
                limit.reservations_per_transaction,
                limit.clients,
                limit.reservations_per_sec,
                limit.baseline.tps,
                limit.baseline.latency.p99_ms
            );
        }
        md.push_str(
            "| scenario | clients | throughput | p50 ms | p99 ms | p99.9 ms | answers | orders/batch | WAL KiB/op | service peak RSS | pgbench tps | pgbench p99 ms | pgbench WAL KiB/tx | service/pgbench | service/set-based limit |\n",
        );
        md.push_str(
            "| --- | ---: | ---: | ---: | ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |\n",
        );
        for r in &self.scenarios {
            let statuses: Vec<String> = r.statuses.iter().map(|(s, n)| format!("{s}×{n}")).collect();
            let (tps, p99) = r.pgbench.as_ref().map_or(("—".to_owned(), "—".to_owned()), |b| {
                (format!("{:.0}", b.tps), format!("{:.1}", b.latency.p99_ms))
            });
            let _ = writeln!(
                md,
                "| {} | {} | {:.0} {}/s | {:.1} | {:.1} | {:.1} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
                r.scenario,
                r.clients,
                r.throughput,
                r.unit,
                r.latency.p50_ms,
                r.latency.p99_ms,
                r.latency.p999_ms,
                statuses.join(" "),
                r.mean_batch.map_or("—".to_owned(), |b| format!("{b:.1}")),
                kb(r.wal_kb_per_op),
                mb(r.service_peak_rss_mb),
                tps,
                p99,
                kb(r.pgbench.as_ref().and_then(|b| b.wal_kb_per_tx)),
                r.ratio.map_or("—".to_owned(), |x| format!("{x:.2}×")),
                r.set_limit_ratio.map_or("—".to_owned(), |x| format!("{x:.2}×")),
            );
        }
        self.baselines_markdown(&mut md);
        if !self.open_loop.is_empty() {
            md.push_str(
                "\nOpen loop, uniform one-line reservations at a fixed arrival rate (latency from the moment each \
                 request was due):\n\n| share of closed-loop max | connections | offered | achieved | p50 ms | p99 ms | \
                 p99.9 ms | answers |\n| ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |\n",
            );
            for r in &self.open_loop {
                let statuses: Vec<String> = r.statuses.iter().map(|(s, n)| format!("{s}×{n}")).collect();
                let _ = writeln!(
                    md,
                    "| {} % | {} | {:.0}/s | {:.0}/s | {:.1} | {:.1} | {:.1} | {} |",
                    r.percent,
                    r.connections,
                    r.offered_per_sec,
                    r.achieved_per_sec,
                    r.latency.p50_ms,
                    r.latency.p99_ms,
                    r.latency.p999_ms,
                    statuses.join(" ")
                );
            }
        }
        let verdict = if self.passed() { "invariants hold (`inventory check`: 0 violations)" } else { "FAILED" };
        let _ = writeln!(md, "\nAfter the run: {verdict}");
        for v in self.violations.iter().chain(&self.sold_out_problems) {
            let _ = writeln!(md, "- {v}");
        }
        md
    }

    /// One line per pgbench baseline of the table: what it ran, and for which scenarios.
    fn baselines_markdown(&self, md: &mut String) {
        let mut workloads: Vec<(Workload, Vec<String>)> = Vec::new();
        for r in &self.scenarios {
            let Some(b) = &r.pgbench else { continue };
            match workloads.iter_mut().find(|(w, _)| *w == b.workload) {
                Some((_, scenarios)) => scenarios.push(r.scenario.to_string()),
                None => workloads.push((b.workload, vec![r.scenario.to_string()])),
            }
        }
        if workloads.is_empty() {
            return;
        }
        md.push_str(
            "\npgbench baselines, with the scenario's clients on a copy of the data: its database work in plain SQL \
             (level updates, reservation and ledger inserts; not the allocation and event rows the service also \
             writes), one order per transaction. tps and p99 are per script run (a whole lifecycle in \
             `lifecycle`), the service's p99 per request:\n\n",
        );
        for (workload, scenarios) in workloads {
            let _ = writeln!(md, "- `{workload}` ({}): {}", scenarios.join(", "), workload.description());
        }
    }

    /// Writes `<dir>/<timestamp>-<commit>.{md,json}`; returns the Markdown path.
    pub fn write(&self, dir: &Path) -> Result<PathBuf, String> {
        std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        let stem = format!("{}-{}", self.started_at.replace(':', ""), self.commit);
        let md = dir.join(format!("{stem}.md"));
        std::fs::write(&md, self.markdown()).map_err(|e| format!("{}: {e}", md.display()))?;
        let json = dir.join(format!("{stem}.json"));
        let text = serde_json::to_string_pretty(self).map_err(|e| e.to_string())?;
        std::fs::write(&json, text).map_err(|e| format!("{}: {e}", json.display()))?;
        Ok(md)
    }
}

fn kb(value: Option<f64>) -> String {
    value.map_or("—".to_owned(), |v| format!("{v:.1}"))
}

fn mb(value: Option<f64>) -> String {
    value.map_or("—".to_owned(), |v| format!("{v:.0} MB"))
}
