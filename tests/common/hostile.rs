//! Hostile servers on loopback (issue 13, "untrusted replies"): bodies that never end, a
//! `Content-Length` of a gigabyte, an event stream whose event never ends. Each is an attack the
//! clients must survive with a clear error.

use std::convert::Infallible;
use std::net::SocketAddr;

use axum::body::Body;
use axum::Router;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::task::JoinHandle;

/// One GiB.
pub const GIB: u64 = 1 << 30;

/// A server on a free loopback port, stopped when dropped.
pub struct Hostile {
    /// `http://127.0.0.1:PORT`.
    pub url: String,
    task: JoinHandle<()>,
}

impl Drop for Hostile {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Serves `router`.
pub async fn serve(router: Router) -> Hostile {
    let listener = tokio::net::TcpListener::bind(SocketAddr::from(([127, 0, 0, 1], 0)))
        .await
        .unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let task = tokio::spawn(async move {
        let _ = axum::serve(listener, router).await;
    });
    Hostile { url, task }
}

/// A body of zeros that never ends and names no length (chunked): gigabytes, if read.
pub fn endless_zeros() -> Body {
    endless(vec![0u8; 64 * 1024])
}

/// `chunk` again and again, forever.
pub fn endless(chunk: Vec<u8>) -> Body {
    let chunk = bytes::Bytes::from(chunk);
    Body::from_stream(futures_util::stream::repeat_with(move || {
        Ok::<_, Infallible>(chunk.clone())
    }))
}

/// A raw TCP server answering every request with `HTTP/1.1 {status}` and `Content-Length: 1
/// GiB`, then sending nothing (an HTTP library would refuse to promise a length it does not
/// send). A client that tried to read the body would wait for its timeout.
pub async fn huge_content_length(status: u16) -> Hostile {
    let listener = tokio::net::TcpListener::bind(SocketAddr::from(([127, 0, 0, 1], 0)))
        .await
        .unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let task = tokio::spawn(async move {
        while let Ok((mut socket, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut request = Vec::new();
                let mut buf = [0u8; 4096];
                while !request.windows(4).any(|w| w == b"\r\n\r\n") {
                    match socket.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => request.extend_from_slice(&buf[..n]),
                    }
                }
                let head = format!(
                    "HTTP/1.1 {status} Whatever\r\nContent-Type: application/json\r\nContent-Length: {GIB}\r\n\r\n"
                );
                if socket.write_all(head.as_bytes()).await.is_ok() {
                    // Hold the connection open, sending nothing.
                    let _ = socket.read(&mut buf).await;
                }
            });
        }
    });
    Hostile { url, task }
}
