//! What the HTTP adapters (OpenCode, Convex) share: naming a transport failure, reading
//! `Retry-After`, and cutting a server's message to one line ([`one_line`], from
//! [`crate::text`]).

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
