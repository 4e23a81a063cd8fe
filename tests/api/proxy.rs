//! A TCP proxy between the service and PostgreSQL that can cut a connection right after it
//! forwarded a `COMMIT`: the server commits, the service never hears the answer. This is the
//! "connection broke while committing" fault, made on demand.

use std::sync::{Arc, Mutex};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// The simple-protocol message sqlx sends to commit: `Q`, length 11, "COMMIT\0".
const COMMIT: &[u8] = b"Q\0\0\0\x0bCOMMIT\0";

/// A proxy listening on loopback; [`CommitTrap::arm`] sets it to cut the next commit of a
/// transaction whose messages mention a marker (a bind value such as a SKU or an order id).
#[derive(Debug, Clone)]
pub struct CommitTrap {
    port: u16,
    marker: Arc<Mutex<Option<Vec<u8>>>>,
    sprung: Arc<std::sync::atomic::AtomicUsize>,
}

impl CommitTrap {
    /// Starts the proxy in front of the server of `db_url`.
    pub async fn start(db_url: &str) -> Self {
        let upstream = upstream_addr(db_url);
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let trap = Self { port: listener.local_addr().unwrap().port(), marker: Arc::default(), sprung: Arc::default() };
        let accept = trap.clone();
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let Ok(server) = TcpStream::connect(&upstream).await else { continue };
                tokio::spawn(accept.clone().pipe(client, server));
            }
        });
        trap
    }

    /// `db_url` with its host and port replaced by the proxy's.
    pub fn url(&self, db_url: &str) -> String {
        let (scheme, rest) = db_url.split_once("://").unwrap();
        let (auth, rest) = rest.rsplit_once('@').map_or(("", rest), |(a, r)| (a, r));
        let path = &rest[rest.find('/').unwrap_or(rest.len())..];
        let auth = if auth.is_empty() { String::new() } else { format!("{auth}@") };
        format!("{scheme}://{auth}127.0.0.1:{}{path}", self.port)
    }

    /// The next commit of a transaction whose client messages contain `marker` is cut.
    pub fn arm(&self, marker: &str) {
        *self.marker.lock().unwrap() = Some(marker.as_bytes().to_vec());
    }

    /// How many commits were cut so far.
    pub fn sprung(&self) -> usize {
        self.sprung.load(std::sync::atomic::Ordering::SeqCst)
    }

    async fn pipe(self, client: TcpStream, server: TcpStream) {
        let (mut client_rx, mut client_tx) = client.into_split();
        let (mut server_rx, mut server_tx) = server.into_split();
        // Once set, the server's answers are read and dropped: the commit happens, the
        // client never hears of it.
        let swallow = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let back = tokio::spawn({
            let swallow = swallow.clone();
            async move {
                let mut buf = vec![0u8; 64 * 1024];
                loop {
                    let n = match server_rx.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => n,
                    };
                    if !swallow.load(std::sync::atomic::Ordering::SeqCst)
                        && client_tx.write_all(&buf[..n]).await.is_err()
                    {
                        return;
                    }
                }
            }
        });
        // Everything the client sent since its last COMMIT: the current transaction.
        let mut window: Vec<u8> = Vec::new();
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let n = match client_rx.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            let start = window.len();
            window.extend_from_slice(&buf[..n]);
            let Some(at) = find(&window, COMMIT) else {
                if server_tx.write_all(&buf[..n]).await.is_err() {
                    break;
                }
                continue;
            };
            let end = at + COMMIT.len();
            let cut = {
                let mut marker = self.marker.lock().unwrap();
                let hit = marker.as_ref().is_some_and(|m| find(&window[..at], m).is_some());
                if hit {
                    *marker = None;
                }
                hit
            };
            if cut {
                // Forward the COMMIT, let the server answer into the void, then drop both sides.
                swallow.store(true, std::sync::atomic::Ordering::SeqCst);
                let upto = end.saturating_sub(start).min(n);
                let _ = server_tx.write_all(&buf[..upto]).await;
                let _ = server_tx.flush().await;
                tokio::time::sleep(std::time::Duration::from_millis(300)).await;
                self.sprung.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                back.abort();
                return;
            }
            if server_tx.write_all(&buf[..n]).await.is_err() {
                break;
            }
            window.drain(..end);
        }
        back.abort();
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// `host:port` of a `postgres://` URL (default port 5432).
fn upstream_addr(db_url: &str) -> String {
    let rest = db_url.split_once("://").unwrap().1;
    let rest = rest.rsplit_once('@').map_or(rest, |(_, r)| r);
    let hostport = &rest[..rest.find(['/', '?']).unwrap_or(rest.len())];
    if hostport.contains(':') { hostport.to_owned() } else { format!("{hostport}:5432") }
}
