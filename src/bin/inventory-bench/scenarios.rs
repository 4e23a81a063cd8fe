//! What each simulated client does in each scenario.

use std::fmt;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use hyper::Method;
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use serde_json::{Value, json};

use crate::load::{Client, Tally};
use crate::pgbench::Workload;

/// The one warehouse holding the hot SKUs.
pub const HOT_WAREHOUSE: &str = "WH0";

/// Lines of a `multi5` order (1 unit each of a random SKU).
pub const MULTI5_LINES: usize = 5;

/// SKUs of one availability read.
pub const AVAILABILITY_SKUS: usize = 10;

/// This run's hot SKUs (new in every run, so a reused data set starts them afresh).
#[derive(Debug, Clone)]
pub struct HotSkus {
    /// What every client of the `hot` scenario reserves; stocked so it never runs out.
    pub restocked: String,
    /// The SKU of the sold-out run: exactly its stock must be sold.
    pub sold_out: String,
}

impl HotSkus {
    pub fn new(run: &str) -> Self {
        let tag: String = run.chars().filter(char::is_ascii_digit).collect();
        Self { restocked: format!("HOT-RESTOCKED-{tag}"), sold_out: format!("HOT-SOLDOUT-{tag}") }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Scenario {
    /// 1-line reservations, each pinned to a random one of the stock levels.
    Uniform,
    /// 5-line orders over random SKUs, allocated across warehouses by priority.
    Multi5,
    /// Every client reserves 1 unit of the same SKU-warehouse row, which never runs out.
    Hot,
    /// Every client reserves 1 unit of the same row until it is sold out.
    HotSoldOut,
    /// reserve → 70% fulfil / 20% release / 10% left to expire.
    Lifecycle,
    /// Availability reads of 10 random SKUs per request.
    Availability,
    /// 90% availability reads, 10% lifecycles.
    Mixed,
}

impl Scenario {
    pub const ALL: [Self; 7] =
        [Self::Uniform, Self::Multi5, Self::Hot, Self::HotSoldOut, Self::Lifecycle, Self::Availability, Self::Mixed];

    /// What one unit of `ops` is.
    pub fn unit(self) -> &'static str {
        match self {
            Self::Uniform | Self::Hot | Self::HotSoldOut => "reservations",
            Self::Multi5 => "orders",
            Self::Lifecycle => "lifecycles",
            Self::Availability => "reads",
            Self::Mixed => "requests",
        }
    }

    /// Whether the scenario makes one-line reservations (and so is measured against the
    /// set-based limit, which makes the same).
    pub fn one_line_reservations(self) -> bool {
        matches!(self, Self::Uniform | Self::Hot | Self::HotSoldOut)
    }

    /// What pgbench runs for comparison: the same database work in plain SQL.
    pub fn baseline(self) -> Workload {
        match self {
            Self::Uniform => Workload::Uniform,
            Self::Multi5 => Workload::Multi5,
            Self::Hot | Self::HotSoldOut => Workload::Hot,
            Self::Lifecycle => Workload::Lifecycle,
            Self::Availability => Workload::Availability,
            Self::Mixed => Workload::Mixed,
        }
    }
}

impl fmt::Display for Scenario {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let name = serde_json::to_value(self).ok().and_then(|v| v.as_str().map(str::to_owned)).unwrap_or_default();
        f.write_str(&name)
    }
}

/// The shape of the data set, shared by every client.
#[derive(Debug)]
pub struct Shared {
    pub addr: SocketAddr,
    pub skus: usize,
    pub warehouses: usize,
    /// Prefix of this run's order ids, so runs never collide.
    pub tag: String,
    /// Time-to-live of the holds the lifecycle leaves to expire.
    pub expire_ttl_secs: i64,
    /// Set once a client of the sold-out run is refused: the row is empty, everyone stops.
    pub sold_out: AtomicBool,
    pub hot: HotSkus,
}

/// Time-to-live of every hold the benchmark makes, but the lifecycle's that are left to expire:
/// the contract's longest, a week. Those of `uniform`, `multi5`, `hot`, `hot-sold-out` and the
/// open loop are never finished; with the default 15 minutes they fell due during later runs
/// on the same data, and the expiry sweep releasing them, thousands a second, weighed on
/// whatever was being measured then. (The lifecycle's others are finished at once; should a
/// fulfil or release fail, theirs does not fall due in a later run either.)
pub const UNFINISHED_TTL_SECS: i64 = 604_800;

pub fn sku(n: usize) -> String {
    format!("SKU-{n:06}")
}

pub fn warehouse(n: usize) -> String {
    format!("WH{n}")
}

/// One simulated client, running until `deadline` (or the sold-out signal).
pub async fn run_client(scenario: Scenario, shared: Arc<Shared>, client_no: usize, deadline: Instant) -> Tally {
    let mut rng = SmallRng::seed_from_u64(client_no as u64 ^ 0x5eed);
    let mut client = Client::new(shared.addr);
    let mut sim = Sim { shared: &shared, client_no, orders: 0 };
    while Instant::now() < deadline {
        let done = match scenario {
            Scenario::Uniform => {
                let line = json!({"sku": sku(rng.random_range(0..shared.skus)), "quantity": 1,
                                  "warehouse": warehouse(rng.random_range(0..shared.warehouses))});
                sim.reserve(&mut client, vec![line], UNFINISHED_TTL_SECS).await.is_some()
            }
            Scenario::Multi5 => {
                let lines =
                    (0..MULTI5_LINES).map(|_| json!({"sku": sku(rng.random_range(0..shared.skus)), "quantity": 1}));
                sim.reserve(&mut client, lines.collect(), UNFINISHED_TTL_SECS).await.is_some()
            }
            Scenario::Hot => {
                let line = json!({"sku": shared.hot.restocked, "quantity": 1});
                sim.reserve(&mut client, vec![line], UNFINISHED_TTL_SECS).await.is_some()
            }
            Scenario::HotSoldOut => {
                if shared.sold_out.load(Ordering::Relaxed) {
                    break;
                }
                let line = json!({"sku": shared.hot.sold_out, "quantity": 1});
                let created = sim.reserve(&mut client, vec![line], UNFINISHED_TTL_SECS).await.is_some();
                if client.tally.by_status.contains_key(&409) {
                    shared.sold_out.store(true, Ordering::Relaxed);
                }
                created
            }
            Scenario::Lifecycle => sim.lifecycle(&mut client, &mut rng).await,
            Scenario::Availability => sim.availability(&mut client, &mut rng).await,
            Scenario::Mixed => {
                if rng.random_bool(0.1) {
                    sim.lifecycle(&mut client, &mut rng).await
                } else {
                    sim.availability(&mut client, &mut rng).await
                }
            }
        };
        if done {
            client.tally.ops += 1;
        }
    }
    client.tally
}

struct Sim<'a> {
    shared: &'a Shared,
    client_no: usize,
    orders: u64,
}

impl Sim<'_> {
    /// Places one order; the reservation id when it was held (201).
    async fn reserve(&mut self, client: &mut Client, lines: Vec<Value>, ttl_seconds: i64) -> Option<String> {
        self.orders += 1;
        let order_id = format!("{}-{}-{}", self.shared.tag, self.client_no, self.orders);
        let body = json!({"order_id": order_id, "lines": lines, "ttl_seconds": ttl_seconds});
        let answer = client.send(Method::POST, "/v1/reservations", Some(body.to_string())).await?;
        if answer.status != 201 {
            return None;
        }
        let value: Value = serde_json::from_slice(&answer.body).ok()?;
        value["id"].as_str().map(str::to_owned)
    }

    /// reserve → fulfil (70%), release (20%) or leave to expire (10%); true when every step
    /// the client asked for succeeded.
    async fn lifecycle(&mut self, client: &mut Client, rng: &mut SmallRng) -> bool {
        let roll = rng.random_range(0..10);
        let line = json!({"sku": sku(rng.random_range(0..self.shared.skus)), "quantity": 1,
                          "warehouse": warehouse(rng.random_range(0..self.shared.warehouses))});
        // Only the holds left to expire get a short time-to-live.
        let ttl = if roll == 9 { self.shared.expire_ttl_secs } else { UNFINISHED_TTL_SECS };
        let Some(id) = self.reserve(client, vec![line], ttl).await else {
            return false;
        };
        let action = match roll {
            0..7 => "fulfil",
            7..9 => "release",
            _ => return true,
        };
        let path = format!("/v1/reservations/{id}/{action}");
        client.send(Method::POST, &path, None).await.is_some_and(|a| a.status == 200)
    }

    async fn availability(&mut self, client: &mut Client, rng: &mut SmallRng) -> bool {
        let query: Vec<String> =
            (0..AVAILABILITY_SKUS).map(|_| format!("sku={}", sku(rng.random_range(0..self.shared.skus)))).collect();
        let path = format!("/v1/availability?{}", query.join("&"));
        client.send(Method::GET, &path, None).await.is_some_and(|a| a.status == 200)
    }
}
