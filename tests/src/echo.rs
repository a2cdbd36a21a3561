//! An HTTP echo backend: a stand-in Pod that says who it is.

use std::convert::Infallible;
use std::net::SocketAddr;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

/// An HTTP/1.1 and HTTP/2 server on `127.0.0.1:0` answering every request `200` with the body
/// `backend=NAME path=PATH host=HOST\n` (and the header `x-backend: NAME`). Stops accepting on drop.
#[derive(Debug)]
pub struct EchoBackend {
    name: String,
    addr: SocketAddr,
    task: JoinHandle<()>,
}

impl EchoBackend {
    /// Starts a backend called `name` on a free loopback port.
    pub async fn start(name: &str) -> std::io::Result<EchoBackend> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let me = name.to_owned();
        let task = tokio::spawn(async move {
            loop {
                let stream = match listener.accept().await {
                    Ok((stream, _)) => stream,
                    Err(_) => {
                        // Out of file descriptors and the like: pause rather than spin.
                        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
                        continue;
                    }
                };
                let me = me.clone();
                tokio::spawn(async move {
                    let svc = service_fn(move |req: Request<Incoming>| {
                        let me = me.clone();
                        async move { Ok::<_, Infallible>(answer(&me, &req)) }
                    });
                    let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
        Ok(EchoBackend { name: name.to_owned(), addr, task })
    }

    /// Its name, as it appears in answers.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Where it listens.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Its port.
    pub fn port(&self) -> u16 {
        self.addr.port()
    }
}

impl Drop for EchoBackend {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn answer(me: &str, req: &Request<Incoming>) -> Response<Full<Bytes>> {
    let host = req
        .headers()
        .get(hyper::header::HOST)
        .and_then(|h| h.to_str().ok())
        .or_else(|| req.uri().authority().map(|a| a.as_str()))
        .unwrap_or("-");
    let body = format!("backend={me} path={} host={host}\n", req.uri().path());
    let mut resp = Response::new(Full::new(Bytes::from(body)));
    if let Ok(v) = hyper::header::HeaderValue::from_str(me) {
        resp.headers_mut().insert("x-backend", v);
    }
    resp
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::http::http_get;

    #[tokio::test]
    async fn answers_with_its_name_path_and_host() {
        let echo = EchoBackend::start("pod-1").await.unwrap();
        let r = http_get(echo.addr(), "shop.example", "/a/b").await.unwrap();
        assert_eq!(r.status, 200);
        assert_eq!(r.body, "backend=pod-1 path=/a/b host=shop.example\n");
        assert_eq!(r.backend(), Some("pod-1"));
        assert_eq!(r.headers.get("x-backend").unwrap(), "pod-1");
    }
}
