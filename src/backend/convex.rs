//! The Convex client: the contract's functions over Convex's Functions HTTP API.
//!
//! `POST {url}/api/query|mutation` with `{"path": "MODULE:NAME", "args": {...}, "format":
//! "json"}` and `Authorization: Convex <deploy key>` when a key is configured. Answers are
//! `{"status":"success","value":...}` or `{"status":"error","errorMessage":...}`.
//!
//! Error classes: a function that threw (`status: "error"`, HTTP 560) and any other 4xx are
//! terminal; 5xx, 429 (waiting as long as `Retry-After` says) and connection failures are
//! retryable; a reply larger than `max_reply_bytes` is terminal (the same call gets it again). A value that does not match the contract is an error naming the field: the
//! observer records it as a failed observation, never as an empty listing.

use std::time::Duration;

use serde::Deserialize;

use super::contract::{self, ChatSession, CreatedValue, FunctionKind, Message, PageValue};
use crate::events::{ChatSessionId, ChatSessionInfo, Command, CommandId, MessageInfo};
use crate::ports::{Backend, MutationReply, Page, PortError, PortFuture, PortResult};
use crate::secret::Secret;
use crate::text::one_line_bytes;
use crate::transport::{
    read_body, retry_after_ms, transport_error, BodyError, DEFAULT_MAX_REPLY_BYTES,
    MAX_ERROR_BODY_BYTES,
};

/// How to reach a Convex deployment.
#[derive(Debug, Clone)]
pub struct ConvexConfig {
    /// `https://happy-otter-123.convex.cloud`.
    pub url: String,
    /// The deploy key, when the functions want one.
    pub deploy_key: Option<Secret>,
    /// The module the functions live in (`agentsync` -> `agentsync:listSessions`).
    pub module: String,
    /// This worker's id, sent with listings and `createSession`.
    pub worker_id: String,
    /// The limit of every call.
    pub timeout: Duration,
    /// The largest page asked for, whatever the caller asks.
    pub max_page: u32,
    /// The largest reply body read: a larger one fails the call with `POST /api/query
    /// agentsync:listSessions: reply larger than N bytes`. Default 32 MiB (Convex itself
    /// returns at most 16 MiB).
    pub max_reply_bytes: usize,
}

impl ConvexConfig {
    /// Defaults for a deployment at `url`: module `agentsync`, 30 s calls, pages of at most 500,
    /// replies of at most 32 MiB.
    pub fn new(url: impl Into<String>, worker_id: impl Into<String>) -> Self {
        Self {
            url: url.into(),
            deploy_key: None,
            module: "agentsync".into(),
            worker_id: worker_id.into(),
            timeout: Duration::from_secs(30),
            max_page: 500,
            max_reply_bytes: DEFAULT_MAX_REPLY_BYTES,
        }
    }
}

/// The Convex client.
#[derive(Debug)]
pub struct ConvexClient {
    http: reqwest::Client,
    config: ConvexConfig,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Reply {
    status: String,
    #[serde(default)]
    value: serde_json::Value,
    #[serde(default)]
    error_message: Option<String>,
}

impl ConvexClient {
    /// A client for `config`.
    pub fn new(config: ConvexConfig) -> Result<Self, PortError> {
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(5))
            .timeout(config.timeout)
            .build()
            .map_err(|e| PortError::terminal(format!("cannot build the HTTP client: {e}")))?;
        Ok(Self { http, config })
    }

    /// Calls one function and returns its value.
    pub async fn call(
        &self,
        kind: FunctionKind,
        name: &str,
        args: serde_json::Value,
    ) -> PortResult<serde_json::Value> {
        let url = format!(
            "{}/api/{}",
            self.config.url.trim_end_matches('/'),
            kind.as_str()
        );
        let path = format!("{}:{name}", self.config.module);
        let mut request = self.http.post(&url).json(&serde_json::json!({
            "path": path,
            "args": args,
            "format": "json",
        }));
        if let Some(key) = &self.config.deploy_key {
            request = request.header(
                reqwest::header::AUTHORIZATION,
                format!("Convex {}", key.expose()),
            );
        }
        let response = request
            .send()
            .await
            .map_err(|e| transport_error(&path, &e))?;
        let status = response.status();
        let retry_after = retry_after_ms(response.headers());
        // An answer is read up to the configured cap; an error reply is classified by its
        // status and only its start is read.
        let cap = if status.as_u16() == 200 {
            self.config.max_reply_bytes
        } else {
            MAX_ERROR_BODY_BYTES
        };
        let (bytes, too_large) = match read_body(response, cap).await {
            Ok(bytes) => (bytes, None),
            Err(e @ BodyError::TooLarge { .. }) if status.as_u16() != 200 => {
                (Default::default(), Some(e.to_string()))
            }
            Err(e) => {
                let what = format!("POST /api/{} {path}", kind.as_str());
                return Err(e.into_port_error(&what));
            }
        };
        let reply = serde_json::from_slice::<Reply>(&bytes).ok();
        let message = reply
            .as_ref()
            .and_then(|r| r.error_message.clone())
            .or(too_large)
            .unwrap_or_else(|| one_line_bytes(&bytes));
        match status.as_u16() {
            200 => {}
            // The function threw: it will throw again.
            560 => return Err(PortError::terminal(format!("{path}: {message}"))),
            429 => {
                let e = PortError::retryable(format!("{path}: HTTP 429: {message}"));
                return Err(match retry_after {
                    Some(ms) => e.with_retry_after(ms),
                    None => e,
                });
            }
            s if status.is_server_error() => {
                return Err(PortError::retryable(format!("{path}: HTTP {s}: {message}")))
            }
            s => return Err(PortError::terminal(format!("{path}: HTTP {s}: {message}"))),
        }
        let reply = reply.ok_or_else(|| {
            PortError::retryable(format!(
                "{path}: the reply is not a Convex answer: {message}"
            ))
        })?;
        match reply.status.as_str() {
            "success" => Ok(reply.value),
            "error" => Err(PortError::terminal(format!("{path}: {message}"))),
            other => Err(PortError::retryable(format!(
                "{path}: unknown answer status {other:?}"
            ))),
        }
    }

    async fn page<W, T>(
        &self,
        name: &'static str,
        cursor: Option<&str>,
        limit: u32,
    ) -> PortResult<Page<T>>
    where
        W: serde::de::DeserializeOwned,
        T: From<W>,
    {
        let args = serde_json::to_value(contract::ListArgs {
            worker_id: self.config.worker_id.clone(),
            cursor: cursor.map(str::to_owned),
            limit: limit.clamp(1, self.config.max_page),
        })
        .expect("plain struct");
        let value = self.call(FunctionKind::Query, name, args).await?;
        let page: PageValue<W> = contract::read_value(value).map_err(|e| {
            PortError::retryable(format!(
                "{}:{name}: value does not match the contract: {e}",
                self.config.module
            ))
        })?;
        Ok(page.into_page())
    }
}

/// Reads a mutation's value: `createSession` gives the chat session's id, the others `null`.
pub fn mutation_reply(name: &str, value: serde_json::Value) -> PortResult<MutationReply> {
    let mismatch =
        |e: String| PortError::retryable(format!("{name}: value does not match the contract: {e}"));
    if name == "createSession" {
        let created: CreatedValue = contract::read_value(value).map_err(mismatch)?;
        return Ok(MutationReply::Created(ChatSessionId(
            created.chat_session_id,
        )));
    }
    if value.is_null() {
        Ok(MutationReply::Done)
    } else {
        Err(mismatch(format!("expected null, got {value}")))
    }
}

impl Backend for ConvexClient {
    fn list_sessions<'a>(
        &'a self,
        cursor: Option<&'a str>,
        limit: u32,
    ) -> PortFuture<'a, Page<ChatSessionInfo>> {
        Box::pin(self.page::<ChatSession, ChatSessionInfo>("listSessions", cursor, limit))
    }

    fn list_messages<'a>(
        &'a self,
        cursor: Option<&'a str>,
        limit: u32,
    ) -> PortFuture<'a, Page<MessageInfo>> {
        Box::pin(self.page::<Message, MessageInfo>("listMessages", cursor, limit))
    }

    fn mutate<'a>(
        &'a self,
        command_id: &'a CommandId,
        command: &'a Command,
    ) -> PortFuture<'a, MutationReply> {
        Box::pin(async move {
            let (name, args) = contract::mutation_for(command_id, command, &self.config.worker_id)?;
            let value = self.call(FunctionKind::Mutation, name, args).await?;
            mutation_reply(name, value)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mutation_values_are_read_against_the_contract() {
        assert_eq!(
            mutation_reply("createSession", serde_json::json!({"chatSessionId": "c9"})).unwrap(),
            MutationReply::Created("c9".into())
        );
        assert_eq!(
            mutation_reply("renameSession", serde_json::Value::Null).unwrap(),
            MutationReply::Done
        );
        let err = mutation_reply("createSession", serde_json::json!({"id": "c9"})).unwrap_err();
        assert!(err.message.contains("chatSessionId"), "{err}");
        assert!(mutation_reply("renameSession", serde_json::json!(1)).is_err());
    }

    #[test]
    fn the_deploy_key_never_prints() {
        let cfg = ConvexConfig {
            deploy_key: Some(Secret::new("prod:abc123")),
            ..ConvexConfig::new("https://x.convex.cloud", "w1")
        };
        assert!(!format!("{cfg:?}").contains("abc123"));
    }
}
