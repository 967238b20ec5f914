//! What the HTTP adapters (OpenCode, Convex, the inbox client) share: naming a transport
//! failure, reading `Retry-After`, reading a reply body under a size cap ([`read_body`]), and
//! cutting a server's message to one line ([`one_line`], from [`crate::text`]).

use bytes::Bytes;
use http_body_util::{BodyExt, Limited};

use crate::clock::Millis;
use crate::ports::PortError;
pub use crate::text::one_line;

/// A request that got no answer: retryable, named by what the connection did.
/// reqwest's messages include the URL, never credentials (those travel in headers).
pub fn transport_error(what: &str, e: &reqwest::Error) -> PortError {
    let how = if e.is_connect() {
        "cannot connect"
    } else if e.is_timeout() {
        "timed out"
    } else {
        "connection failed"
    };
    PortError::retryable(format!("{what}: {how}: {}", one_line(&error_chain(e))))
}

/// The default cap on one reply body: 32 MiB. Convex returns at most 16 MiB per function, and
/// an OpenCode listing of 10,000 sessions is a few megabytes: a reply past this is an attack or
/// a broken server, never data.
pub const DEFAULT_MAX_REPLY_BYTES: usize = 32 * 1024 * 1024;

/// The cap on the body of an error reply (a 4xx or 5xx): only its first line is ever used.
pub const MAX_ERROR_BODY_BYTES: usize = 64 * 1024;

/// Why a reply body was not read.
#[derive(Debug, thiserror::Error)]
pub enum BodyError {
    /// The body (or its `Content-Length`) is larger than the cap.
    #[error("reply larger than {cap} bytes")]
    TooLarge {
        /// The cap, in bytes.
        cap: usize,
    },
    /// The connection broke, or timed out, while the body was read.
    #[error(transparent)]
    Transport(reqwest::Error),
}

impl BodyError {
    /// The failure of `what` (`GET /session`) as a port error. A body too large is terminal:
    /// the same request gets the same reply, so another attempt would download `cap` bytes
    /// again for nothing (the way out is the server, or a larger cap in the configuration). A
    /// broken connection is retryable, as any transport failure.
    pub fn into_port_error(self, what: &str) -> PortError {
        match self {
            BodyError::TooLarge { .. } => PortError::terminal(format!("{what}: {self}")),
            BodyError::Transport(e) => transport_error(&format!("{what}: reply broke off"), &e),
        }
    }
}

/// Reads a reply body of at most `cap` bytes. A `Content-Length` over the cap is refused before
/// anything is read; a body without one (chunked, or a server that lies) is read as a stream and
/// cut as soon as it passes the cap (`http_body_util::Limited`), so memory never holds more than
/// `cap` bytes of it. Dropping the response closes the connection.
pub async fn read_body(response: reqwest::Response, cap: usize) -> Result<Bytes, BodyError> {
    if response.content_length().is_some_and(|n| n > cap as u64) {
        return Err(BodyError::TooLarge { cap });
    }
    let limited = Limited::new(reqwest::Body::from(response), cap);
    match limited.collect().await {
        Ok(collected) => Ok(collected.to_bytes()),
        // `Limited` fails with the body's own error or with `LengthLimitError`.
        Err(e) => match e.downcast::<reqwest::Error>() {
            Ok(e) => Err(BodyError::Transport(*e)),
            Err(_) => Err(BodyError::TooLarge { cap }),
        },
    }
}

/// The wait a reply asks for (`Retry-After` in seconds), in ms.
pub fn retry_after_ms(headers: &reqwest::header::HeaderMap) -> Option<Millis> {
    headers
        .get(reqwest::header::RETRY_AFTER)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok())
        .map(|s| s.saturating_mul(1000))
}

/// `error: source: source…`: reqwest puts the useful part (refused, reset) in the sources.
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut source = e.source();
    while let Some(inner) = source {
        s.push_str(": ");
        s.push_str(&inner.to_string());
        source = inner.source();
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_after_is_read_in_seconds_and_a_date_or_garbage_is_ignored() {
        let mut h = reqwest::header::HeaderMap::new();
        assert_eq!(retry_after_ms(&h), None);
        h.insert(reqwest::header::RETRY_AFTER, " 7 ".parse().unwrap());
        assert_eq!(retry_after_ms(&h), Some(7_000));
        h.insert(
            reqwest::header::RETRY_AFTER,
            "Wed, 21 Oct 2015 07:28:00 GMT".parse().unwrap(),
        );
        assert_eq!(retry_after_ms(&h), None);
        assert_eq!(one_line("a\n  b\tc"), "a b c");
        assert_eq!(one_line(""), "(empty)");
    }
}
