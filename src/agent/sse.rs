//! A cap on the size of one server-sent event.
//!
//! `eventsource-stream` (the SSE parser of `GET /event`) keeps an event's bytes until the blank
//! line that ends it, with no limit: a server that sends `data: xxxx…` and never a newline
//! would grow its buffer until the worker runs out of memory. [`limit_events`] sits between
//! the HTTP body and the parser, counts the bytes received since the last blank line (the end
//! of an event, with LF, CRLF or CR line ends as the SSE grammar allows), and ends the stream
//! with [`SseError::EventTooLarge`] as soon as that count passes the cap, before the chunk
//! that passes it reaches the parser. The parser so never holds more than the cap.

use futures_core::Stream;
use futures_util::StreamExt;
use memchr::memchr2;

/// What the limited byte stream fails with.
#[derive(Debug, thiserror::Error)]
pub enum SseError<E> {
    /// An event (the bytes since the last blank line) is larger than the cap.
    #[error("event larger than {cap} bytes")]
    EventTooLarge {
        /// The cap, in bytes.
        cap: usize,
    },
    /// The underlying stream failed.
    #[error(transparent)]
    Transport(E),
}

/// Counts the bytes of the event being received. Pure, fed chunk by chunk.
#[derive(Debug, Clone)]
pub struct EventSizeLimit {
    cap: usize,
    /// Bytes of the current event's lines (line ends not counted).
    current: usize,
    /// Nothing but a line end since the last line end (or the start).
    at_line_start: bool,
    /// The last byte was a CR: an LF right after it ends the same line.
    after_cr: bool,
    /// The cap was passed: the stream is over.
    tripped: bool,
}

impl EventSizeLimit {
    /// A limit of `cap` bytes per event.
    pub fn new(cap: usize) -> Self {
        Self {
            cap,
            current: 0,
            at_line_start: true,
            after_cr: false,
            tripped: false,
        }
    }

    /// Takes the next chunk of the stream: `Err` once the event being received passes the cap
    /// (and for every chunk after that).
    pub fn feed(&mut self, chunk: &[u8]) -> Result<(), usize> {
        if self.tripped {
            return Err(self.cap);
        }
        let mut rest = chunk;
        while !rest.is_empty() {
            let text = memchr2(b'\r', b'\n', rest).unwrap_or(rest.len());
            if text > 0 {
                self.after_cr = false;
                self.at_line_start = false;
                self.current = self.current.saturating_add(text);
                if self.current > self.cap {
                    self.tripped = true;
                    return Err(self.cap);
                }
            }
            let Some(&end) = rest.get(text) else { break };
            rest = &rest[text + 1..];
            if end == b'\n' && self.after_cr {
                // The LF of a CRLF: the line already ended at the CR.
                self.after_cr = false;
                continue;
            }
            self.after_cr = end == b'\r';
            if self.at_line_start {
                // A blank line: the event is complete.
                self.current = 0;
            }
            self.at_line_start = true;
        }
        Ok(())
    }
}

/// `stream` (an SSE body) with events of at most `cap` bytes: the first chunk that would make
/// an event larger becomes [`SseError::EventTooLarge`], and the stream ends there.
pub fn limit_events<S, B, E>(stream: S, cap: usize) -> impl Stream<Item = Result<B, SseError<E>>>
where
    S: Stream<Item = Result<B, E>>,
    B: AsRef<[u8]>,
{
    stream.scan(EventSizeLimit::new(cap), |limit, item| {
        let out = match item {
            _ if limit.tripped => None,
            Ok(chunk) => Some(match limit.feed(chunk.as_ref()) {
                Ok(()) => Ok(chunk),
                Err(cap) => Err(SseError::EventTooLarge { cap }),
            }),
            Err(e) => Some(Err(SseError::Transport(e))),
        };
        std::future::ready(out)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_event_is_counted_from_the_last_blank_line_whatever_the_line_ends() {
        let mut l = EventSizeLimit::new(10);
        // Many small events, far more than the cap in all: fine.
        for _ in 0..100 {
            l.feed(b"data: 1234\n\n").unwrap();
            l.feed(b"data: 12\r\n\r\n").unwrap();
            l.feed(b"data: 12\r\r").unwrap();
        }
        // A blank line split across chunks, and a CRLF split across chunks.
        l.feed(b"data: 1234\r").unwrap();
        l.feed(b"\n").unwrap();
        l.feed(b"\r\n").unwrap();
        l.feed(b"data: 1234\n").unwrap();
        l.feed(b"\n").unwrap();
        // Two lines of one event add up: 10 + 1 > 10.
        l.feed(b"data: 1234\n").unwrap();
        assert_eq!(l.feed(b"x\n"), Err(10));
        assert_eq!(l.feed(b"\n\n"), Err(10), "over for good");
    }

    #[test]
    fn an_endless_event_without_a_newline_is_cut_at_the_cap() {
        let mut l = EventSizeLimit::new(1024);
        let chunk = [b'x'; 100];
        let fed = (0..1_000).take_while(|_| l.feed(&chunk).is_ok()).count();
        assert_eq!(fed, 10, "cut on the chunk that passes 1024 bytes");
    }

    #[tokio::test]
    async fn the_limited_stream_ends_with_the_error() {
        let chunks = futures_util::stream::iter(
            [
                "data: a\n\n",
                "data: bbbbbbbbbbbbbbbbbbbb",
                "\n\n",
                "data: c\n\n",
            ]
            .map(Ok::<_, std::convert::Infallible>),
        );
        let out: Vec<_> = limit_events(chunks, 16).collect().await;
        assert_eq!(out.len(), 2, "{out:?}");
        assert!(matches!(out[0], Ok("data: a\n\n")));
        assert!(matches!(out[1], Err(SseError::EventTooLarge { cap: 16 })));
    }
}
