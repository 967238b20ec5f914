//! The Convex client: the contract's functions over Convex's Functions HTTP API.
//!
//! `POST {url}/api/query|mutation` with `{"path": "MODULE:NAME", "args": {...}, "format":
//! "json"}` and `Authorization: Convex <deploy key>` when a key is configured. Answers are
//! `{"status":"success","value":...}` or `{"status":"error","errorMessage":...}`.
//!
//! Error classes ([`classify`], with the backend source of each): a function's error
//! (`status: "error"`, HTTP 200, or 560 from older backends) is retryable when the backend
//! says it is paused, disabled, suspended, deploying, timed out or overloaded, and terminal
//! when the function refused the call; 408, 421, 425, 429, 5xx and connection failures are
//! retryable with the dispatcher's own backoff (Convex sends no `Retry-After`); 401/403 say
//! the deploy key is wrong; a reply larger than `max_reply_bytes` is terminal (the same call
//! gets it again). A value that does not match the contract is an error naming the field: the
//! observer records it as a failed observation, never as an empty listing.

use std::time::Duration;

use serde::Deserialize;

use super::contract::{self, ChatSession, CreatedValue, FunctionKind, Message, PageValue};
use crate::events::{ChatSessionId, ChatSessionInfo, Command, CommandId, MessageInfo};
use crate::ports::{Backend, MutationReply, Page, PortError, PortFuture, PortResult};
use crate::secret::Secret;
use crate::text::{one_line, one_line_bytes};
use crate::transport::{
    read_body, transport_error, BodyError, DEFAULT_MAX_REPLY_BYTES, MAX_ERROR_BODY_BYTES,
};

/// How long the reference Convex module remembers an applied command id
/// (`APPLIED_RETENTION_MS` in `examples/convex/agentsync.ts`, pruned by its hourly cron). The
/// worker never retries a command past a day less than this against Convex, whatever
/// `--retention-days` says: a retry past the window could apply a creation twice.
pub const MODULE_APPLIED_WINDOW_MS: u64 = 8 * 24 * 60 * 60 * 1000;

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

/// A function's answer (`crates/local_backend/src/public_api.rs`, `UdfResponse`, lines
/// 131-156): `{"status":"success","value",...}` or `{"status":"error","errorMessage",...}`, each
/// with `logLines` when the function logged; an error thrown as a `ConvexError` adds
/// `errorData`. Unknown fields are ignored, so whatever a newer backend adds is tolerated.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Reply {
    status: String,
    #[serde(default)]
    value: serde_json::Value,
    #[serde(default)]
    error_message: Option<String>,
    /// Read only to be tolerated: any JSON (`ConvexError` data).
    #[serde(default)]
    #[allow(dead_code)]
    error_data: serde_json::Value,
    /// Read only to be tolerated: the function's console output.
    #[serde(default)]
    #[allow(dead_code)]
    log_lines: serde_json::Value,
}

/// Any other failure of the HTTP API: `{"code": "BadDeployKey", "message": "..."}`
/// (`crates/errors/src/lib.rs`, `ErrorMetadata`, answered by `HttpResponseError`).
#[derive(Debug, Deserialize)]
struct ApiError {
    #[serde(default)]
    code: Option<String>,
    #[serde(default)]
    message: Option<String>,
}

/// What a function's `errorMessage` says about trying again, by the backend's own texts. Each
/// row is a message the backend writes *before or instead of* running the function's code, or
/// a limit it may not hit next time; anything else is the function's own refusal (an argument
/// that fails its validator, an `Error` it threw) and will be refused again.
///
/// Sources are `get-convex/convex-backend` at 94a42c3 (2026-08-22).
pub const TRANSIENT_FUNCTION_ERRORS: &[(&str, &str)] = &[
    (
        // The owner paused the deployment; resuming it lets the same call through.
        "Cannot run functions while this deployment is paused",
        "crates/udf/src/validation.rs:117 (PAUSED_ERROR_MESSAGE)",
    ),
    (
        "Cannot run functions while this deployment is suspended",
        "crates/udf/src/validation.rs:120 (SUSPENDED_ERROR_MESSAGE)",
    ),
    (
        // Spending or usage limits: lifted by the owner or when the limits reset.
        "so your deployments have been disabled",
        "crates/udf/src/validation.rs:107-112 (DISABLED_ERROR_MESSAGE_*)",
    ),
    (
        "This deployment has been disabled because it exceeded a configured usage limit",
        "crates/udf/src/validation.rs:113 (USAGE_LIMIT_DISABLED_ERROR_MESSAGE)",
    ),
    (
        // While `npx convex deploy` pushes a new version, and for a function not pushed yet.
        // Also what an internal function says to a caller without a deploy key: `classify`
        // makes that terminal when no key was sent.
        "Could not find public function",
        "crates/udf/src/validation.rs:353-365 (missing_or_internal_error)",
    ),
    (
        // The 1 s user-code limit of queries and mutations: load-dependent.
        "Function execution timed out",
        "crates/isolate/src/termination.rs:350; limit crates/common/src/knobs.rs:907 (DATABASE_UDF_USER_TIMEOUT)",
    ),
    (
        "Too many concurrent requests",
        "crates/application/src/application_function_runner/mod.rs:539-549 (TooManyConcurrentRequests)",
    ),
    (
        // A mutation that lost every optimistic-concurrency retry (usually a 503; the text is
        // recognised wherever it arrives).
        "changed while this mutation was being run and on every subsequent retry",
        "crates/errors/src/lib.rs:378-382 (OCC)",
    ),
    (
        "Data read or written in this mutation changed while it was being run",
        "crates/errors/src/lib.rs:1104 (OCC_ERROR_MSG)",
    ),
    (
        // What a function's error says when the backend itself failed (the details stay in
        // its logs): an operational error, worth another attempt.
        "Your request couldn't be completed. Try again later.",
        "crates/errors/src/lib.rs:1102 (INTERNAL_SERVER_ERROR_MSG)",
    ),
];

/// Whether a function's error message is one of [`TRANSIENT_FUNCTION_ERRORS`].
pub fn transient_function_error(message: &str) -> Option<&'static str> {
    TRANSIENT_FUNCTION_ERRORS
        .iter()
        .find(|(text, _)| message.contains(text))
        .map(|(_, source)| *source)
}

/// Classes one answer of the Functions HTTP API: the value, or the error the dispatcher
/// retries (with its own backoff) or gives up on.
///
/// - HTTP 200 (`crates/local_backend/src/public_api.rs`: every handler ends `Ok(Json(response))`,
///   lines 265, 361, 442, 500, ...) or 560 (older backends; `get-convex/convex-js`,
///   `src/browser/http_client.ts:29-32`, `STATUS_CODE_UDF_FAILED`, accepted at line 316) carry
///   `{"status": ...}`: success is the value; an error is retryable when its message is one of
///   [`TRANSIENT_FUNCTION_ERRORS`], terminal otherwise (argument validation, a thrown error).
/// - 408, 421, 425, 429 and every 5xx are retryable (`crates/errors/src/lib.rs:712-732`:
///   ClientDisconnect, MisdirectedRequest, TooEarly, RateLimited, OCC/Overloaded/
///   RejectedBeforeExecution -> 503). Convex sends no `Retry-After`: the dispatcher's backoff
///   decides the wait.
/// - 401 (`BadAdminKey`, `crates/authentication/src/application_auth.rs:47-50`) and 403
///   (`BadDeployKey`, `crates/keybroker/src/operations.rs:118-125`) are terminal, saying the
///   deploy key is wrong; a 404 "Could not find public function" (`UDF_404_ON_BAD_PATH`,
///   `crates/udf/src/validation.rs:360`) is a deploy in progress, like its 200 form; any
///   other 4xx is terminal.
/// - A 200 whose body is not a Convex answer (a proxy's page) is retryable.
///
/// `keyed` says whether a deploy key was sent: without one, "Could not find public function"
/// is what every internal function answers (`crates/udf/src/validation.rs:342-350`,
/// `require_admin_identity`), so it is terminal and says the key is missing.
pub fn classify(
    path: &str,
    status: u16,
    body: &[u8],
    keyed: bool,
) -> PortResult<serde_json::Value> {
    let not_found = |message: &str| -> PortError {
        if keyed {
            PortError::retryable(format!(
                "{path}: HTTP {status}: {message} (a deploy in progress?)"
            ))
        } else {
            PortError::terminal(format!(
                "{path}: HTTP {status}: {message} (the module's functions are internal: set the \
                 deploy key with --convex-key-env)"
            ))
        }
    };
    let reply = serde_json::from_slice::<Reply>(body).ok();
    let text = || one_line_bytes(body);
    if matches!(status, 200 | 560) {
        let Some(reply) = reply else {
            return Err(PortError::retryable(format!(
                "{path}: HTTP {status}: the reply is not a Convex answer: {}",
                text()
            )));
        };
        return match reply.status.as_str() {
            "success" if status == 200 => Ok(reply.value),
            "error" => {
                let message = one_line(reply.error_message.as_deref().unwrap_or("(no message)"));
                if message.contains("Could not find public function") {
                    Err(not_found(&message))
                } else if transient_function_error(&message).is_some() {
                    Err(PortError::retryable(format!("{path}: {message}")))
                } else {
                    Err(PortError::terminal(format!("{path}: {message}")))
                }
            }
            other => Err(PortError::retryable(format!(
                "{path}: HTTP {status}: unknown answer status {other:?}"
            ))),
        };
    }
    let api = serde_json::from_slice::<ApiError>(body).ok();
    let message = match api {
        Some(ApiError {
            code,
            message: Some(message),
        }) => match code {
            Some(code) => format!("{code}: {}", one_line(&message)),
            None => one_line(&message),
        },
        _ => text(),
    };
    match status {
        401 | 403 => Err(PortError::terminal(format!(
            "{path}: HTTP {status}: the deploy key is wrong for this deployment (check the \
             variable --convex-key-env names): {message}"
        ))),
        404 if message.contains("Could not find public function") => Err(not_found(&message)),
        408 | 421 | 425 | 429 | 500..=599 => Err(PortError::retryable(format!(
            "{path}: HTTP {status}: {message}"
        ))),
        _ => Err(PortError::terminal(format!(
            "{path}: HTTP {status}: {message}"
        ))),
    }
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
        // An error reply too large to read is classed by its status, with the cap's words.
        let body: &[u8] = match &too_large {
            Some(words) => words.as_bytes(),
            None => &bytes,
        };
        classify(
            &path,
            status.as_u16(),
            body,
            self.config.deploy_key.is_some(),
        )
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

    fn error(message: &str) -> Vec<u8> {
        serde_json::to_vec(&serde_json::json!({"status": "error", "errorMessage": message}))
            .unwrap()
    }

    #[test]
    fn function_errors_are_classed_by_what_they_say_at_200_and_560() {
        let p = "agentsync:completeMessage";
        for status in [200, 560] {
            for transient in [
                "Cannot run functions while this deployment is paused. Resume the deployment in the dashboard settings to allow functions to run.",
                "Cannot run functions while this deployment is suspended. Please contact Convex if you believe this is a mistake.",
                "You have exceeded the free plan limits, so your deployments have been disabled. Please upgrade",
                "This deployment has been disabled because it exceeded a configured usage limit. Update",
                "Function execution timed out (maximum duration: 1s)",
                "Too many concurrent requests. Your backend is limited to 16 concurrent mutations.",
                "Your request couldn't be completed. Try again later.",
                "Could not find public function for 'agentsync:completeMessage'.",
            ] {
                let err = classify(p, status, &error(transient), true).unwrap_err();
                assert!(err.is_retryable(), "{status} {transient}: {err}");
                assert!(err.message.starts_with(p), "{err}");
                assert_eq!(err.retry_after_ms, None);
            }
            for terminal in [
                "ArgumentValidationError: Object is missing the required field `content`.",
                "Uncaught Error: no chat session chat_ghost",
                "Uncaught ConvexError: refused",
                "Too many bytes read in a single function execution (limit: 16777216 bytes).",
            ] {
                let err = classify(p, status, &error(terminal), true).unwrap_err();
                assert!(!err.is_retryable(), "{status} {terminal}: {err}");
                assert!(
                    err.message.contains(terminal.split(':').next().unwrap()),
                    "{err}"
                );
            }
        }
        // Without a key an internal function is "not found": the key is missing, for good.
        let err = classify(
            p,
            200,
            &error("Could not find public function for 'x'."),
            false,
        )
        .unwrap_err();
        assert!(!err.is_retryable());
        assert!(err.message.contains("--convex-key-env"), "{err}");
        // errorData and logLines are tolerated on both answers.
        let ok = br#"{"status":"success","value":{"a":1.0},"logLines":["[LOG] hi"]}"#;
        assert_eq!(
            classify(p, 200, ok, true).unwrap(),
            serde_json::json!({"a": 1.0})
        );
        let thrown = br#"{"status":"error","errorMessage":"Uncaught ConvexError: x","errorData":{"why":"x"},"logLines":[]}"#;
        assert!(!classify(p, 200, thrown, true).unwrap_err().is_retryable());
        // A success under 560 or a page that is no Convex answer is not believed.
        assert!(classify(p, 560, ok, true).unwrap_err().is_retryable());
        assert!(classify(p, 200, b"<html>proxy</html>", true)
            .unwrap_err()
            .is_retryable());
    }

    #[test]
    fn http_errors_retry_on_408_421_425_429_5xx_and_401_403_blame_the_key() {
        let p = "agentsync:listSessions";
        let body = |code: &str, message: &str| {
            serde_json::to_vec(&serde_json::json!({"code": code, "message": message})).unwrap()
        };
        for status in [408, 421, 425, 429, 500, 502, 503, 504] {
            let err = classify(p, status, &body("Overloaded", "busy"), true).unwrap_err();
            assert!(err.is_retryable(), "{status}: {err}");
            assert_eq!(err.retry_after_ms, None, "our own backoff");
            assert!(
                err.message
                    .contains(&format!("HTTP {status}: Overloaded: busy")),
                "{err}"
            );
        }
        for (status, code) in [(401, "BadAdminKey"), (403, "BadDeployKey")] {
            let err = classify(
                p,
                status,
                &body(
                    code,
                    "The provided deploy key was invalid for this deployment.",
                ),
                true,
            )
            .unwrap_err();
            assert!(!err.is_retryable(), "{status}");
            assert!(err.message.contains("the deploy key is wrong"), "{err}");
            assert!(!err.message.contains('\n'));
        }
        for status in [400, 404, 413] {
            assert!(!classify(p, status, &body("BadRequest", "no"), true)
                .unwrap_err()
                .is_retryable());
        }
        let err = classify(
            p,
            404,
            &body(
                "FunctionPathNotFound",
                "Could not find public function for 'agentsync:listSessions'.",
            ),
            true,
        )
        .unwrap_err();
        assert!(err.is_retryable(), "a deploy in progress: {err}");
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

#[cfg(test)]
mod module_window_tests {
    use super::MODULE_APPLIED_WINDOW_MS;

    #[test]
    fn the_applied_window_is_the_reference_modules_own() {
        let module = include_str!("../../examples/convex/agentsync.ts");
        let line = module
            .lines()
            .find(|l| l.starts_with("export const APPLIED_RETENTION_MS ="))
            .expect("the module declares its window");
        let product: u64 = line
            .trim_end_matches(';')
            .split('=')
            .nth(1)
            .expect("a value")
            .split('*')
            .map(|n| n.trim().replace('_', "").parse::<u64>().expect("a number"))
            .product();
        assert_eq!(product, MODULE_APPLIED_WINDOW_MS);
    }
}
