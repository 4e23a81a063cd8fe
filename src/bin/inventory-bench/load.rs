//! The closed-loop load generator: N simulated clients, each on its own keep-alive HTTP/1.1
//! connection, each sending its next request as soon as the previous answer arrived.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper::client::conn::http1::SendRequest;
use hyper::{Method, Request};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

/// What one or more clients saw.
#[derive(Debug, Default, Clone)]
pub struct Tally {
    /// Latency of every answered request, in microseconds.
    pub latencies_us: Vec<u32>,
    /// Answers by HTTP status; `0` counts requests that got no answer (connection errors).
    pub by_status: BTreeMap<u16, u64>,
    /// Units of work completed (reservations, lifecycles or reads, depending on the scenario).
    pub ops: u64,
}

impl Tally {
    pub fn merge(&mut self, other: Self) {
        self.latencies_us.extend(other.latencies_us);
        for (status, n) in other.by_status {
            *self.by_status.entry(status).or_default() += n;
        }
        self.ops += other.ops;
    }

    pub fn requests(&self) -> u64 {
        self.by_status.values().sum()
    }

    /// Requests answered 5xx or not at all.
    pub fn failures(&self) -> u64 {
        self.by_status.iter().filter(|(s, _)| **s == 0 || **s >= 500).map(|(_, n)| n).sum()
    }

    /// The `q` quantile (0..=1) of the latencies, in milliseconds.
    pub fn quantile_ms(&mut self, q: f64) -> f64 {
        if self.latencies_us.is_empty() {
            return 0.0;
        }
        self.latencies_us.sort_unstable();
        let rank = ((self.latencies_us.len() as f64 * q).ceil() as usize).clamp(1, self.latencies_us.len());
        f64::from(self.latencies_us[rank - 1]) / 1000.0
    }
}

/// One answer: status and body.
#[derive(Debug)]
pub struct Answer {
    pub status: u16,
    pub body: Bytes,
}

/// A simulated client's connection; reconnects after a failure.
#[derive(Debug)]
pub struct Client {
    addr: SocketAddr,
    sender: Option<SendRequest<Full<Bytes>>>,
    pub tally: Tally,
}

impl Client {
    pub fn new(addr: SocketAddr) -> Self {
        Self { addr, sender: None, tally: Tally::default() }
    }

    async fn connect(&mut self) -> Result<&mut SendRequest<Full<Bytes>>, String> {
        if self.sender.as_ref().is_none_or(|s| s.is_closed()) {
            let stream = TcpStream::connect(self.addr).await.map_err(|e| e.to_string())?;
            stream.set_nodelay(true).map_err(|e| e.to_string())?;
            let (sender, conn) =
                hyper::client::conn::http1::handshake(TokioIo::new(stream)).await.map_err(|e| e.to_string())?;
            tokio::spawn(conn);
            self.sender = Some(sender);
        }
        Ok(self.sender.as_mut().expect("connected above"))
    }

    /// Sends one request and records its latency and status. `None` when it got no answer.
    pub async fn send(&mut self, method: Method, path: &str, body: Option<String>) -> Option<Answer> {
        let started = Instant::now();
        let answer = self.exchange(method, path, body).await;
        let status = answer.as_ref().map_or(0, |a| a.status);
        *self.tally.by_status.entry(status).or_default() += 1;
        match answer {
            Ok(answer) => {
                self.tally.latencies_us.push(started.elapsed().as_micros().min(u128::from(u32::MAX)) as u32);
                Some(answer)
            }
            Err(_) => {
                self.sender = None;
                // Do not spin on a dead server.
                tokio::time::sleep(Duration::from_millis(10)).await;
                None
            }
        }
    }

    async fn exchange(&mut self, method: Method, path: &str, body: Option<String>) -> Result<Answer, String> {
        let addr = self.addr;
        let sender = self.connect().await?;
        sender.ready().await.map_err(|e| e.to_string())?;
        let mut request = Request::builder().method(method).uri(path).header("host", addr.to_string());
        if body.is_some() {
            request = request.header("content-type", "application/json");
        }
        let request = request.body(Full::new(body.map(Bytes::from).unwrap_or_default())).map_err(|e| e.to_string())?;
        let response = sender.send_request(request).await.map_err(|e| e.to_string())?;
        let status = response.status().as_u16();
        let body = response.into_body().collect().await.map_err(|e| e.to_string())?.to_bytes();
        Ok(Answer { status, body })
    }
}

/// Waits until `GET path` answers 200, or gives up after `timeout`.
pub async fn wait_ready(addr: SocketAddr, path: &str, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        let mut client = Client::new(addr);
        if client.send(Method::GET, path, None).await.is_some_and(|a| a.status == 200) {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    false
}

/// What the live event streams held open during a scenario received.
#[derive(Debug, Default, Clone, Copy, serde::Serialize)]
pub struct StreamTally {
    /// Streams that were answered 200 and held to the end.
    pub held: u64,
    /// Streams refused or broken.
    pub failed: u64,
    /// Events received over all streams.
    pub events: u64,
}

/// Holds one `GET /v1/events/stream?after=…` open until `deadline`, counting the events it
/// receives; every fourth stream filters for a type that rarely occurs.
pub async fn hold_stream(addr: SocketAddr, n: usize, after: i64, deadline: Instant) -> StreamTally {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut tally = StreamTally::default();
    let query = if n % 4 == 3 { format!("?after={after}&type=stock.low") } else { format!("?after={after}") };
    let Ok(mut stream) = TcpStream::connect(addr).await else {
        tally.failed = 1;
        return tally;
    };
    let request = format!("GET /v1/events/stream{query} HTTP/1.1\r\nHost: {addr}\r\nAccept: text/event-stream\r\n\r\n");
    if stream.write_all(request.as_bytes()).await.is_err() {
        tally.failed = 1;
        return tally;
    }
    let mut buf = vec![0u8; 64 * 1024];
    let mut head = Vec::new();
    let mut ok = None;
    loop {
        let read = tokio::time::timeout_at(deadline.into(), stream.read(&mut buf)).await;
        let n = match read {
            Err(_) => break,
            Ok(Ok(0) | Err(_)) => {
                ok = Some(false);
                break;
            }
            Ok(Ok(n)) => n,
        };
        if ok.is_none() {
            head.extend_from_slice(&buf[..n]);
            if head.len() >= 12 {
                ok = Some(head.starts_with(b"HTTP/1.1 200"));
                if ok == Some(false) {
                    break;
                }
            }
        }
        tally.events += buf[..n].windows(4).filter(|w| w == b"\nid:" || w == b"\rid:").count() as u64;
    }
    if ok == Some(false) {
        tally.failed = 1
    } else {
        tally.held = 1
    }
    tally
}

/// The open-loop generator: requests are due at a fixed arrival rate, whatever the answers do,
/// and each latency runs from the moment its request was due. A slow answer that holds up the
/// requests behind it (all `connections` busy) counts against every one of them, instead of
/// quietly lowering the rate as a closed loop does (coordinated omission).
pub async fn open_loop(
    addr: SocketAddr,
    rate_per_sec: f64,
    duration: Duration,
    connections: usize,
    mut next: impl FnMut(u64) -> (Method, String, Option<String>),
) -> Tally {
    use std::sync::Arc;
    use tokio::sync::{Mutex, mpsc};
    let (idle_tx, idle_rx) = mpsc::channel(connections.max(1));
    for _ in 0..connections.max(1) {
        idle_tx.send(Client::new(addr)).await.expect("the channel holds every connection");
    }
    let idle_rx = Arc::new(Mutex::new(idle_rx));
    let started = Instant::now();
    let total = (rate_per_sec * duration.as_secs_f64()).floor() as u64;
    let mut jobs = tokio::task::JoinSet::new();
    for n in 0..total {
        let due = started + Duration::from_secs_f64(n as f64 / rate_per_sec);
        tokio::time::sleep_until(due.into()).await;
        let (method, path, body) = next(n);
        let (idle_tx, idle_rx) = (idle_tx.clone(), Arc::clone(&idle_rx));
        jobs.spawn(async move {
            // Waiting for a free connection is part of the latency: the request was due.
            let mut client = idle_rx.lock().await.recv().await.expect("connections are always given back");
            let answer = client.exchange(method, &path, body).await;
            let latency = due.elapsed().as_micros().min(u128::from(u32::MAX)) as u32;
            if answer.is_err() {
                client.sender = None;
            }
            let _ = idle_tx.send(client).await;
            (answer.map_or(0, |a| a.status), latency)
        });
    }
    let mut tally = Tally::default();
    while let Some(done) = jobs.join_next().await {
        let (status, latency) = done.unwrap_or((0, u32::MAX));
        *tally.by_status.entry(status).or_default() += 1;
        if status != 0 {
            tally.latencies_us.push(latency);
        }
        if status == 201 || status == 200 {
            tally.ops += 1;
        }
    }
    tally
}
