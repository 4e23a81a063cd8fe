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

    /// Each quantile's median over the rounds.
    fn median_of<'a>(rounds: impl Iterator<Item = &'a Latency> + Clone) -> Self {
        let of = |f: fn(&Latency) -> f64| median(rounds.clone().map(f)).unwrap_or(0.0);
        Self { p50_ms: of(|l| l.p50_ms), p99_ms: of(|l| l.p99_ms), p999_ms: of(|l| l.p999_ms) }
    }
}

/// The median of the figures (the mean of the middle two for an even count); `None` for none.
pub fn median(values: impl Iterator<Item = f64>) -> Option<f64> {
    let mut values: Vec<f64> = values.filter(|v| v.is_finite()).collect();
    values.sort_by(f64::total_cmp);
    let mid = values.len() / 2;
    match values.len() {
        0 => None,
        n if n % 2 == 1 => Some(values[mid]),
        _ => Some((values[mid - 1] + values[mid]) / 2.0),
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

    /// Several rounds of one baseline as one row: medians, transactions summed.
    fn merged<'a>(rounds: impl Iterator<Item = &'a BaselineRow> + Clone) -> Option<Self> {
        let first = rounds.clone().next()?;
        Some(Self {
            workload: first.workload,
            tps: median(rounds.clone().map(|b| b.tps)).unwrap_or(0.0),
            transactions: rounds.clone().map(|b| b.transactions).sum(),
            latency: Latency::median_of(rounds.clone().map(|b| &b.latency)),
            wal_kb_per_tx: median(rounds.filter_map(|b| b.wal_kb_per_tx)),
        })
    }
}

/// What PostgreSQL does for one-line reservations decided set-based, with no HTTP in between.
#[derive(Debug, Clone, Serialize)]
pub struct SetLimit {
    pub clients: usize,
    pub reservations_per_transaction: f64,
    pub reservations_per_sec: f64,
    pub baseline: BaselineRow,
    /// Reservations per second of each round, in the order run.
    pub rounds: Vec<f64>,
}

impl SetLimit {
    /// The rounds' medians (see [`ScenarioRow::merged`]).
    pub fn merged(rounds: Vec<SetLimit>) -> Self {
        Self {
            clients: rounds[0].clients,
            reservations_per_transaction: median(rounds.iter().map(|l| l.reservations_per_transaction)).unwrap_or(0.0),
            reservations_per_sec: median(rounds.iter().map(|l| l.reservations_per_sec)).unwrap_or(0.0),
            baseline: BaselineRow::merged(rounds.iter().map(|l| &l.baseline)).expect("at least one round"),
            rounds: rounds.iter().flat_map(|l| l.rounds.iter().copied()).collect(),
        }
    }
}

/// One round of a scenario (`--rounds`): its own figures, side by side with its own baselines.
#[derive(Debug, Clone, Serialize)]
pub struct Round {
    pub throughput: f64,
    pub p99_ms: f64,
    pub pgbench_tps: Option<f64>,
    pub ratio: Option<f64>,
    pub set_limit_ratio: Option<f64>,
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
    /// Every round's own figures, in the order run (one without `--rounds`).
    pub rounds: Vec<Round>,
}

impl ScenarioRow {
    /// The rounds of one scenario as one row: each figure is the median over the rounds, each
    /// ratio the median of the rounds' own ratios (each taken side by side within its round,
    /// not the ratio of two medians taken minutes apart); counts (`ops`, `seconds`, answers,
    /// events streamed) are summed, peaks and streams held the highest.
    pub fn merged(rounds: Vec<ScenarioRow>) -> Self {
        let of = |f: fn(&ScenarioRow) -> Option<f64>| median(rounds.iter().filter_map(f));
        let mut statuses = BTreeMap::new();
        for (status, n) in rounds.iter().flat_map(|r| &r.statuses) {
            *statuses.entry(*status).or_default() += n;
        }
        let streams = rounds.iter().filter_map(|r| r.streams).reduce(|a, b| crate::load::StreamTally {
            held: a.held.max(b.held),
            failed: a.failed + b.failed,
            events: a.events + b.events,
        });
        let first = &rounds[0];
        Self {
            scenario: first.scenario,
            unit: first.unit,
            clients: first.clients,
            seconds: rounds.iter().map(|r| r.seconds).sum(),
            ops: rounds.iter().map(|r| r.ops).sum(),
            throughput: of(|r| Some(r.throughput)).unwrap_or(0.0),
            requests: rounds.iter().map(|r| r.requests).sum(),
            requests_per_sec: of(|r| Some(r.requests_per_sec)).unwrap_or(0.0),
            latency: Latency::median_of(rounds.iter().map(|r| &r.latency)),
            statuses,
            service_peak_rss_mb: rounds.iter().filter_map(|r| r.service_peak_rss_mb).reduce(f64::max),
            pgbench: BaselineRow::merged(rounds.iter().filter_map(|r| r.pgbench.as_ref())),
            ratio: of(|r| r.ratio),
            set_limit_ratio: of(|r| r.set_limit_ratio),
            mean_batch: of(|r| r.mean_batch),
            wal_kb_per_op: of(|r| r.wal_kb_per_op),
            streams,
            max_expiry_lag_secs: rounds.iter().filter_map(|r| r.max_expiry_lag_secs).reduce(f64::max),
            rounds: rounds.into_iter().flat_map(|r| r.rounds).collect(),
        }
    }
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
            if limit.rounds.len() > 1 {
                let each: Vec<String> = limit.rounds.iter().map(|r| format!("{r:.0}")).collect();
                let _ =
                    writeln!(md, "Set-based limit, each round: {} reservations/s (medians above)\n", each.join(" / "));
            }
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
        self.rounds_markdown(&mut md);
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

    /// Every round's figures, when there was more than one: the table above gives their medians.
    fn rounds_markdown(&self, md: &mut String) {
        if self.scenarios.iter().all(|r| r.rounds.len() < 2) {
            return;
        }
        md.push_str(
            "\nEach round, in the order run (the table gives the medians; each ratio's median is taken over the \
             rounds' own ratios): service throughput, p99 ms, pgbench tps, service/pgbench, service/set-based limit\n\n",
        );
        for r in &self.scenarios {
            let each: Vec<String> = r
                .rounds
                .iter()
                .map(|x| {
                    let opt = |v: Option<f64>, f: fn(f64) -> String| v.map_or("—".to_owned(), f);
                    format!(
                        "{:.0}, {:.1}, {}, {}, {}",
                        x.throughput,
                        x.p99_ms,
                        opt(x.pgbench_tps, |v| format!("{v:.0}")),
                        opt(x.ratio, |v| format!("{v:.2}×")),
                        opt(x.set_limit_ratio, |v| format!("{v:.2}×"))
                    )
                })
                .collect();
            let _ = writeln!(md, "- {}: {}", r.scenario, each.join(" · "));
        }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_median_is_the_middle_figure_or_the_mean_of_the_middle_two() {
        assert_eq!(median([3.0, 1.0, 2.0].into_iter()), Some(2.0));
        assert_eq!(median([4.0, 1.0, 3.0, 2.0].into_iter()), Some(2.5));
        assert_eq!(median([f64::NAN, 5.0].into_iter()), Some(5.0));
        assert_eq!(median(std::iter::empty()), None);
    }

    fn round(throughput: f64, p99_ms: f64, tps: f64) -> ScenarioRow {
        let latency = Latency { p50_ms: p99_ms / 2.0, p99_ms, p999_ms: p99_ms * 2.0 };
        let pgbench = BaselineRow {
            workload: Workload::Uniform,
            tps,
            transactions: tps as u64,
            latency: latency.clone(),
            wal_kb_per_tx: None,
        };
        ScenarioRow {
            scenario: Scenario::Uniform,
            unit: "reservations",
            clients: 64,
            seconds: 1.0,
            ops: throughput as u64,
            throughput,
            requests: throughput as u64,
            requests_per_sec: throughput,
            latency,
            statuses: BTreeMap::from([(201, throughput as u64)]),
            service_peak_rss_mb: Some(throughput / 100.0),
            pgbench: Some(pgbench),
            ratio: Some(throughput / tps),
            set_limit_ratio: None,
            mean_batch: None,
            wal_kb_per_op: None,
            streams: None,
            max_expiry_lag_secs: None,
            rounds: vec![Round {
                throughput,
                p99_ms,
                pgbench_tps: Some(tps),
                ratio: Some(throughput / tps),
                set_limit_ratio: None,
            }],
        }
    }

    #[test]
    fn rounds_merge_into_medians_with_each_ratio_taken_within_its_round() {
        // The machine slowed down in the second round and sped up in the third: the ratio's
        // median comes from the rounds' own ratios (2, 2.5, 3), not from the medians' ratio.
        let merged = ScenarioRow::merged(vec![
            round(6000.0, 20.0, 3000.0),
            round(4000.0, 30.0, 1600.0),
            round(9000.0, 10.0, 3000.0),
        ]);
        assert_eq!(merged.throughput, 6000.0);
        assert_eq!(merged.ratio, Some(2.5));
        assert_eq!(merged.pgbench.as_ref().map(|b| (b.tps, b.transactions)), Some((3000.0, 7600)));
        assert_eq!(merged.latency.p99_ms, 20.0);
        assert_eq!((merged.ops, merged.statuses.get(&201).copied()), (19000, Some(19000)));
        assert_eq!(merged.service_peak_rss_mb, Some(90.0));
        assert_eq!(merged.set_limit_ratio, None);
        let throughputs: Vec<f64> = merged.rounds.iter().map(|r| r.throughput).collect();
        assert_eq!(throughputs, [6000.0, 4000.0, 9000.0], "every round, in the order run");
    }
}
