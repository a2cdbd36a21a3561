//! Steady HTTP/1.1 load with requests held in flight, for drain tests: stand-in Pods whose slow answers wait
//! at a [`Gate`] the test opens, and keep-alive clients that number every request, so a test can tell apart a
//! request that reached a Pod (it must then be answered in full, drain or not) from one that never left the
//! client's side of the proxy (a new connection refused, or a keep-alive connection the draining proxy closed
//! before reading the request: HTTP's usual retry case).
//!
//! Requests: `GET /fast/ID` is answered at once with `pod NAME request ID\n`; `GET /slow/ID` is answered with a
//! `Content-Length` for the whole body, its first part `pod NAME request ID begins\n` at once, and its second
//! part `request ID ends\n` only when the gate opens. So while the gate is shut, every slow request is in flight
//! on an established connection, with half its body delivered: exactly what a drain must let finish.

use std::collections::BTreeSet;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper::Request;
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// How long one request may take (a slow one: from the gate opening).
const REQUEST_TIMEOUT: Duration = Duration::from_secs(20);

/// Shared by the stand-in Pods of a test: the gate slow answers wait at, how many wait there now, and the id
/// of every request any Pod received.
#[derive(Debug)]
pub struct Gate {
    open: watch::Sender<bool>,
    held: AtomicUsize,
    seen: Mutex<BTreeSet<u64>>,
}

impl Gate {
    /// A shut gate.
    pub fn new() -> Arc<Gate> {
        Arc::new(Gate { open: watch::Sender::new(false), held: AtomicUsize::new(0), seen: Mutex::default() })
    }

    /// Lets every slow answer (waiting now or later) finish.
    pub fn open(&self) {
        self.open.send_replace(true);
    }

    /// Slow answers waiting at the gate now (their first half sent).
    pub fn held(&self) -> usize {
        self.held.load(Ordering::SeqCst)
    }

    /// The ids of every request a Pod received.
    pub fn seen(&self) -> BTreeSet<u64> {
        self.seen.lock().unwrap_or_else(PoisonError::into_inner).clone()
    }
}

/// A stand-in Pod answering `/fast/ID` and `/slow/ID` (see the module doc); stops on drop.
#[derive(Debug)]
pub struct GatedPod {
    addr: SocketAddr,
    task: JoinHandle<()>,
}

impl GatedPod {
    /// Serves as `name` on `addr` (port 0 picks one).
    pub async fn start(name: &str, addr: SocketAddr, gate: Arc<Gate>) -> std::io::Result<GatedPod> {
        GatedPod::serve(name, TcpListener::bind(addr).await?, gate)
    }

    /// Serves on a listening socket bound elsewhere (e.g. inside a network namespace).
    pub fn from_std(name: &str, l: std::net::TcpListener, gate: Arc<Gate>) -> std::io::Result<GatedPod> {
        l.set_nonblocking(true)?;
        GatedPod::serve(name, TcpListener::from_std(l)?, gate)
    }

    fn serve(name: &str, listener: TcpListener, gate: Arc<Gate>) -> std::io::Result<GatedPod> {
        let addr = listener.local_addr()?;
        let name: Arc<str> = name.into();
        let task = tokio::spawn(async move {
            let mut conns = tokio::task::JoinSet::new();
            loop {
                tokio::select! {
                    Some(_) = conns.join_next(), if !conns.is_empty() => {}
                    accepted = listener.accept() => match accepted {
                        Ok((s, _)) => {
                            conns.spawn(answer(name.clone(), s, gate.clone()));
                        }
                        Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
                    },
                }
            }
        });
        Ok(GatedPod { addr, task })
    }

    /// Where it listens.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }
}

impl Drop for GatedPod {
    fn drop(&mut self) {
        // Dropping the accept task's JoinSet aborts every connection task too.
        self.task.abort();
    }
}

/// Serves the requests of one connection (bodiless GETs; keep-alive unless the client says close).
async fn answer(name: Arc<str>, s: TcpStream, gate: Arc<Gate>) -> std::io::Result<()> {
    s.set_nodelay(true)?;
    let mut r = BufReader::new(s);
    let mut line = String::new();
    loop {
        line.clear();
        if r.read_line(&mut line).await? == 0 {
            return Ok(());
        }
        let target = line.split_whitespace().nth(1).unwrap_or_default().to_owned();
        let mut close = false;
        loop {
            line.clear();
            if r.read_line(&mut line).await? == 0 {
                return Ok(());
            }
            let h = line.trim_end();
            if h.is_empty() {
                break;
            }
            if let Some((k, v)) = h.split_once(':') {
                close |= k.eq_ignore_ascii_case("connection") && v.trim().eq_ignore_ascii_case("close");
            }
        }
        let (slow, id) = match target.rsplit_once('/') {
            Some(("/slow", id)) => (true, id.parse::<u64>().ok()),
            Some(("/fast", id)) => (false, id.parse::<u64>().ok()),
            _ => (false, None),
        };
        let Some(id) = id else {
            let s = r.get_mut();
            s.write_all(b"HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\nconnection: close\r\n\r\n").await?;
            return s.shutdown().await;
        };
        gate.seen.lock().unwrap_or_else(PoisonError::into_inner).insert(id);
        let (first, second) = if slow {
            (format!("pod {name} request {id} begins\n"), format!("request {id} ends\n"))
        } else {
            (format!("pod {name} request {id}\n"), String::new())
        };
        let head = format!(
            "HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: {}\r\n{}\r\n",
            first.len() + second.len(),
            if close { "connection: close\r\n" } else { "" }
        );
        let s = r.get_mut();
        // One write for the head and the first part (two small writes would wait out a delayed ACK).
        s.write_all(format!("{head}{first}").as_bytes()).await?;
        if slow {
            gate.held.fetch_add(1, Ordering::SeqCst);
            let mut open = gate.open.subscribe();
            let opened = open.wait_for(|o| *o).await.is_ok();
            gate.held.fetch_sub(1, Ordering::SeqCst);
            if !opened {
                return Ok(());
            }
            s.write_all(second.as_bytes()).await?;
        }
        if close {
            return s.shutdown().await;
        }
    }
}

/// Makes a new connection to the proxy under test (from a network namespace, or plain `TcpStream::connect`).
pub type Connect = Arc<dyn Fn() -> Pin<Box<dyn Future<Output = anyhow::Result<TcpStream>> + Send>> + Send + Sync>;

/// [`Connect`] for a plain connect to `to` from this namespace.
pub fn connect_to(to: SocketAddr) -> Connect {
    Arc::new(move || {
        Box::pin(async move {
            tokio::time::timeout(REQUEST_TIMEOUT, TcpStream::connect(to))
                .await
                .map_err(|_| anyhow::anyhow!("connect to {to}: timed out"))?
                .map_err(|e| anyhow::Error::new(e).context(format!("connect to {to}")))
        })
    })
}

/// What the test shares with its clients: request ids, when to stop, and whether SIGTERM was sent yet (every
/// failure is stamped with it).
#[derive(Debug, Default)]
pub struct Control {
    next_id: AtomicU64,
    answered: AtomicU64,
    stop: AtomicBool,
    terminated: AtomicBool,
}

impl Control {
    /// A fresh control, shared by the clients of one run.
    pub fn new() -> Arc<Control> {
        Arc::new(Control::default())
    }

    /// Marks that SIGTERM is about to be sent: failures seen from now on are stamped `after_term`.
    pub fn terminating(&self) {
        self.terminated.store(true, Ordering::SeqCst);
    }

    /// Tells the steady clients to finish (each closes its connection after its current request).
    pub fn stop(&self) {
        self.stop.store(true, Ordering::SeqCst);
    }

    /// Requests answered in full so far, by every client: a test waits on this to know the load is flowing.
    pub fn answered(&self) -> u64 {
        self.answered.load(Ordering::SeqCst)
    }

    fn terminated(&self) -> bool {
        self.terminated.load(Ordering::SeqCst)
    }

    fn id(&self) -> u64 {
        self.next_id.fetch_add(1, Ordering::SeqCst)
    }
}

/// A request that got no full, correct answer; or a connect that failed.
#[derive(Debug, Clone)]
pub struct Failure {
    /// The request's id (`None`: the connect failed, no request was sent).
    pub id: Option<u64>,
    /// Whether SIGTERM had been sent when the failure was seen. (Stamped when seen, not when the request started:
    /// a request started just before SIGTERM may well be on the wire when the drain begins, while a failure seen
    /// before SIGTERM was sent cannot be the drain's doing.)
    pub after_term: bool,
    /// Whether the connect was refused (nothing listens any more).
    pub refused: bool,
    /// What went wrong.
    pub error: String,
}

/// What one client did.
#[derive(Debug, Default, Clone)]
pub struct Report {
    /// Requests answered in full and correctly.
    pub ok: u64,
    /// Slow requests answered in full.
    pub slow_ok: u64,
    /// Connections it made.
    pub connections: u64,
    /// What failed.
    pub failures: Vec<Failure>,
}

impl Report {
    /// Adds another client's report to this one.
    pub fn merge(&mut self, other: Report) {
        self.ok += other.ok;
        self.slow_ok += other.slow_ok;
        self.connections += other.connections;
        self.failures.extend(other.failures);
    }
}

/// A keep-alive HTTP/1.1 connection of a client.
struct Client {
    sender: SendRequest<Empty<Bytes>>,
    conn: JoinHandle<()>,
}

impl Drop for Client {
    fn drop(&mut self) {
        self.conn.abort();
    }
}

async fn open(connect: &Connect) -> anyhow::Result<Client> {
    let stream = connect().await?;
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    let conn = tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok(Client { sender, conn })
}

/// One request on `c`; checks the whole body is the one the Pod sends for it.
async fn request(c: &mut Client, host: &str, id: u64, slow: bool) -> anyhow::Result<()> {
    let path = format!("/{}/{id}", if slow { "slow" } else { "fast" });
    let exchange = async {
        let req = Request::get(&path).header(hyper::header::HOST, host).body(Empty::<Bytes>::new())?;
        let resp = c.sender.send_request(req).await?;
        let status = resp.status();
        let body = resp.into_body().collect().await?.to_bytes();
        let body = String::from_utf8_lossy(&body);
        anyhow::ensure!(status == 200, "{path}: status {status}: {body}");
        let pod = body.strip_prefix("pod ").and_then(|b| b.split_whitespace().next()).unwrap_or("?");
        let expected = if slow {
            format!("pod {pod} request {id} begins\nrequest {id} ends\n")
        } else {
            format!("pod {pod} request {id}\n")
        };
        anyhow::ensure!(body == expected, "{path}: a wrong or cut body: {body:?}");
        Ok(())
    };
    tokio::time::timeout(if slow { Duration::from_secs(600) } else { REQUEST_TIMEOUT }, exchange)
        .await
        .map_err(|_| anyhow::anyhow!("{path}: no full answer in time"))?
}

/// A steady client: requests `/fast/ID` one after another on a keep-alive connection until told to stop; when
/// the proxy closes the connection after an answer (a draining HTTP proxy does), it connects again; a
/// refused connect ends it (the proxy no longer accepts).
pub fn steady(connect: Connect, host: &str, control: Arc<Control>) -> JoinHandle<Report> {
    let host = host.to_owned();
    tokio::spawn(async move {
        let mut report = Report::default();
        let mut client: Option<Client> = None;
        while !control.stop.load(Ordering::SeqCst) {
            // A connection the proxy closed after its last answer is not a failure: connect again.
            if let Some(c) = client.as_mut()
                && c.sender.ready().await.is_err()
            {
                client = None;
            }
            let c = match client.as_mut() {
                Some(c) => c,
                None => match open(&connect).await {
                    Ok(c) => {
                        report.connections += 1;
                        client.insert(c)
                    }
                    Err(e) => {
                        let refused = crate::net::is_refused(&e);
                        report.failures.push(Failure {
                            id: None,
                            after_term: control.terminated(),
                            refused,
                            error: format!("{e:#}"),
                        });
                        break;
                    }
                },
            };
            let id = control.id();
            match request(c, &host, id, false).await {
                Ok(()) => {
                    report.ok += 1;
                    control.answered.fetch_add(1, Ordering::SeqCst);
                }
                Err(e) => {
                    report.failures.push(Failure {
                        id: Some(id),
                        after_term: control.terminated(),
                        refused: false,
                        error: format!("{e:#}"),
                    });
                    client = None;
                }
            }
        }
        report
    })
}

/// A long-running request on an established keep-alive connection: connects, makes `warmup` fast requests on
/// the connection, then one slow request, whose answer the Pod holds at the gate.
pub fn slow(connect: Connect, host: &str, control: Arc<Control>, warmup: u32) -> JoinHandle<Report> {
    let host = host.to_owned();
    tokio::spawn(async move {
        let mut report = Report::default();
        let mut c = match open(&connect).await {
            Ok(c) => c,
            Err(e) => {
                let refused = crate::net::is_refused(&e);
                report.failures.push(Failure {
                    id: None,
                    after_term: control.terminated(),
                    refused,
                    error: format!("{e:#}"),
                });
                return report;
            }
        };
        report.connections += 1;
        for i in 0..=warmup {
            let id = control.id();
            let slow = i == warmup;
            match request(&mut c, &host, id, slow).await {
                Ok(()) => {
                    report.ok += 1;
                    control.answered.fetch_add(1, Ordering::SeqCst);
                    report.slow_ok += u64::from(slow);
                }
                Err(e) => {
                    report.failures.push(Failure {
                        id: Some(id),
                        after_term: control.terminated(),
                        refused: false,
                        error: format!("{e:#}"),
                    });
                    break;
                }
            }
        }
        report
    })
}
