//! Layer-4 stand-in Pods and their clients: a TCP echo and a UDP echo that name themselves in every answer, so a
//! test sees which endpoint a Service connection or datagram reached.
//!
//! The TCP echo answers each line `LINE` with `NAME PEER LINE` (`PEER` is the address the connection came from,
//! so a test sees the proxy, not the client, connected); the UDP echo answers each datagram `DATA` with
//! `NAME PEER DATA`. A [`Conn`] keeps one connection open and asks over it again and again, which is how tests
//! hold connections open (least-connections then sends the next connection elsewhere) and show an established
//! connection surviving a configuration change.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpSocket, TcpStream, UdpSocket};
use tokio::task::JoinHandle;

/// How long one exchange (connect, line out, line back) may take.
pub const EXCHANGE_TIMEOUT: Duration = Duration::from_secs(10);

/// A TCP echo server; stops accepting, and ends its connections, on drop.
#[derive(Debug)]
pub struct TcpEcho {
    name: String,
    addr: SocketAddr,
    task: JoinHandle<()>,
}

impl TcpEcho {
    /// Binds `addr` (port 0 picks one) and serves as `name`.
    pub async fn start(name: &str, addr: SocketAddr) -> std::io::Result<TcpEcho> {
        TcpEcho::serve(name, TcpListener::bind(addr).await?)
    }

    /// Serves on a listening socket bound elsewhere (e.g. inside a network namespace).
    pub fn from_std(name: &str, listener: std::net::TcpListener) -> std::io::Result<TcpEcho> {
        listener.set_nonblocking(true)?;
        TcpEcho::serve(name, TcpListener::from_std(listener)?)
    }

    fn serve(name: &str, listener: TcpListener) -> std::io::Result<TcpEcho> {
        let addr = listener.local_addr()?;
        let me = name.to_owned();
        let task = tokio::spawn(async move {
            let mut conns = tokio::task::JoinSet::new();
            loop {
                tokio::select! {
                    Some(_) = conns.join_next(), if !conns.is_empty() => {}
                    accepted = listener.accept() => match accepted {
                        Ok((stream, peer)) => {
                            conns.spawn(echo_lines(me.clone(), stream, peer));
                        }
                        Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
                    },
                }
            }
        });
        Ok(TcpEcho { name: name.to_owned(), addr, task })
    }

    /// Its name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Where it listens.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }
}

impl Drop for TcpEcho {
    fn drop(&mut self) {
        // Aborting the accept task drops its JoinSet, which aborts every connection task.
        self.task.abort();
    }
}

async fn echo_lines(me: String, stream: TcpStream, peer: SocketAddr) {
    let (r, mut w) = stream.into_split();
    let mut lines = BufReader::new(r).lines();
    while let Ok(Some(line)) = lines.next_line().await {
        if w.write_all(format!("{me} {peer} {line}\n").as_bytes()).await.is_err() {
            return;
        }
    }
    // EOF from the client: finish our side too.
    let _ = w.shutdown().await;
}

/// A UDP echo server; stops on drop.
#[derive(Debug)]
pub struct UdpEcho {
    name: String,
    addr: SocketAddr,
    task: JoinHandle<()>,
}

impl UdpEcho {
    /// Binds `addr` (port 0 picks one) and serves as `name`.
    pub async fn start(name: &str, addr: SocketAddr) -> std::io::Result<UdpEcho> {
        UdpEcho::serve(name, UdpSocket::bind(addr).await?)
    }

    /// Serves on a socket bound elsewhere (e.g. inside a network namespace).
    pub fn from_std(name: &str, socket: std::net::UdpSocket) -> std::io::Result<UdpEcho> {
        socket.set_nonblocking(true)?;
        UdpEcho::serve(name, UdpSocket::from_std(socket)?)
    }

    fn serve(name: &str, socket: UdpSocket) -> std::io::Result<UdpEcho> {
        let addr = socket.local_addr()?;
        let me = name.to_owned();
        let task = tokio::spawn(async move {
            let mut buf = vec![0u8; 65_536];
            loop {
                let Ok((n, peer)) = socket.recv_from(&mut buf).await else { continue };
                let reply = format!("{me} {peer} {}", String::from_utf8_lossy(&buf[..n]));
                let _ = socket.send_to(reply.as_bytes(), peer).await;
            }
        });
        Ok(UdpEcho { name: name.to_owned(), addr, task })
    }

    /// Its name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Where it listens.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }
}

impl Drop for UdpEcho {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// An echo's answer, parsed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Answer {
    /// The echo that answered.
    pub name: String,
    /// Where its connection (or datagram) came from.
    pub peer: SocketAddr,
    /// What it echoed.
    pub text: String,
}

impl Answer {
    fn parse(line: &str) -> anyhow::Result<Answer> {
        let mut it = line.trim_end().splitn(3, ' ');
        let (Some(name), Some(peer), text) = (it.next(), it.next(), it.next()) else {
            anyhow::bail!("not an echo answer: {line:?}");
        };
        let peer = peer.parse().map_err(|e| anyhow::anyhow!("not an echo answer ({e}): {line:?}"))?;
        Ok(Answer { name: name.to_owned(), peer, text: text.unwrap_or_default().to_owned() })
    }
}

/// One open TCP connection to an echo (usually through a Service address).
#[derive(Debug)]
pub struct Conn {
    to: SocketAddr,
    local: SocketAddr,
    lines: tokio::io::Lines<BufReader<tokio::net::tcp::OwnedReadHalf>>,
    w: tokio::net::tcp::OwnedWriteHalf,
    asked: u32,
}

impl Conn {
    /// Connects to `to` (from the default source address).
    pub async fn open(to: SocketAddr) -> anyhow::Result<Conn> {
        let stream = tokio::time::timeout(EXCHANGE_TIMEOUT, TcpStream::connect(to))
            .await
            .map_err(|_| anyhow::anyhow!("connect to {to}: timed out"))?
            .map_err(|e| anyhow::anyhow!("connect to {to}: {e}"))?;
        Ok(Conn::from_stream(to, stream))
    }

    /// Connects to `to` from the source address `from` (port chosen by the kernel): a different client IP.
    pub async fn open_from(from: std::net::IpAddr, to: SocketAddr) -> anyhow::Result<Conn> {
        let s = if to.is_ipv4() { TcpSocket::new_v4()? } else { TcpSocket::new_v6()? };
        s.bind(SocketAddr::new(from, 0))?;
        let stream = tokio::time::timeout(EXCHANGE_TIMEOUT, s.connect(to))
            .await
            .map_err(|_| anyhow::anyhow!("connect {from} → {to}: timed out"))?
            .map_err(|e| anyhow::anyhow!("connect {from} → {to}: {e}"))?;
        Ok(Conn::from_stream(to, stream))
    }

    /// Wraps a connected stream (e.g. one made inside a network namespace).
    pub fn from_stream(to: SocketAddr, stream: TcpStream) -> Conn {
        let local = stream.local_addr().unwrap_or_else(|_| SocketAddr::from(([0, 0, 0, 0], 0)));
        let (r, w) = stream.into_split();
        Conn { to, local, lines: BufReader::new(r).lines(), w, asked: 0 }
    }

    /// The client's end of the connection.
    pub fn local_addr(&self) -> SocketAddr {
        self.local
    }

    /// Sends one line and reads the echo's answer; checks it echoed the line.
    pub async fn ask(&mut self) -> anyhow::Result<Answer> {
        self.asked += 1;
        let msg = format!("hello-{}", self.asked);
        let to = self.to;
        let exchange = async {
            self.w.write_all(format!("{msg}\n").as_bytes()).await?;
            self.lines.next_line().await
        };
        let line = tokio::time::timeout(EXCHANGE_TIMEOUT, exchange)
            .await
            .map_err(|_| anyhow::anyhow!("{to}: no answer within {EXCHANGE_TIMEOUT:?}"))?
            .map_err(|e| anyhow::anyhow!("{to}: {e}"))?
            .ok_or_else(|| anyhow::anyhow!("{to}: closed without answering"))?;
        let a = Answer::parse(&line)?;
        anyhow::ensure!(a.text == msg, "{to}: {} echoed {:?}, not {msg:?}", a.name, a.text);
        Ok(a)
    }

    /// Sends EOF, and waits (bounded) for the other side to finish too.
    pub async fn close(mut self) -> anyhow::Result<()> {
        self.w.shutdown().await?;
        let to = self.to;
        match tokio::time::timeout(EXCHANGE_TIMEOUT, self.lines.next_line()).await {
            Ok(Ok(None)) => Ok(()),
            Ok(Ok(Some(l))) => anyhow::bail!("{to}: unexpected line after EOF: {l:?}"),
            Ok(Err(e)) => anyhow::bail!("{to}: closing: {e}"),
            Err(_) => anyhow::bail!("{to}: not closed within {EXCHANGE_TIMEOUT:?} after our EOF"),
        }
    }
}

/// One exchange on a fresh connection: which echo answered.
pub async fn ask_once(to: SocketAddr) -> anyhow::Result<Answer> {
    let mut c = Conn::open(to).await?;
    let a = c.ask().await?;
    c.close().await?;
    Ok(a)
}

/// Sends one datagram from `socket` to `to` and waits for one reply; returns the answer and where the reply
/// came from.
pub async fn udp_ask(
    socket: &UdpSocket,
    to: SocketAddr,
    msg: &str,
    wait: Duration,
) -> anyhow::Result<(Answer, SocketAddr)> {
    socket.send_to(msg.as_bytes(), to).await?;
    let mut buf = vec![0u8; 65_536];
    let (n, from) = tokio::time::timeout(wait, socket.recv_from(&mut buf))
        .await
        .map_err(|_| anyhow::anyhow!("udp {to}: no reply within {wait:?}"))??;
    let a = Answer::parse(&String::from_utf8_lossy(&buf[..n]))?;
    anyhow::ensure!(a.text == msg, "udp {to}: {} echoed {:?}, not {msg:?}", a.name, a.text);
    Ok((a, from))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn tcp_and_udp_echo_name_themselves() {
        let t = TcpEcho::start("pod-t", "127.0.0.1:0".parse().unwrap()).await.unwrap();
        let mut c = Conn::open(t.addr()).await.unwrap();
        let a = c.ask().await.unwrap();
        let b = c.ask().await.unwrap();
        assert_eq!((a.name.as_str(), a.text.as_str(), b.text.as_str()), ("pod-t", "hello-1", "hello-2"));
        assert_eq!(a.peer.ip().to_string(), "127.0.0.1");
        c.close().await.unwrap();

        let u = UdpEcho::start("pod-u", "127.0.0.1:0".parse().unwrap()).await.unwrap();
        let s = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let (a, from) = udp_ask(&s, u.addr(), "ping", EXCHANGE_TIMEOUT).await.unwrap();
        assert_eq!((a.name.as_str(), a.text.as_str(), from), ("pod-u", "ping", u.addr()));
        assert_eq!(a.peer, s.local_addr().unwrap());
    }
}
