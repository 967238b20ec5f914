//! The scheduler's rules, driven with injected time.

use super::*;

fn rename(chat: &str) -> Command {
    Command::RenameSession {
        chat_session_id: chat.into(),
        title: "t".into(),
    }
}

fn fail_message(chat: &str, msg: &str) -> Command {
    Command::FailMessage {
        chat_session_id: chat.into(),
        message_id: msg.into(),
        reason: "r".into(),
    }
}

fn create(agent: &str) -> Command {
    Command::CreateSession {
        agent_session_id: agent.into(),
        title: "t".into(),
        model: None,
    }
}

fn started(actions: Vec<Action>) -> Vec<Attempt> {
    actions
        .into_iter()
        .filter_map(|a| match a {
            Action::Start(s) => Some(s),
            _ => None,
        })
        .collect()
}

fn apply(views: &mut Views, events: Vec<Event>, at: Millis) {
    for event in events {
        let seq = views.min_seq() + 1;
        views.apply(&Envelope {
            seq,
            id: uuid::Uuid::nil(),
            at,
            v: event.kind().version(),
            event,
            cause: None,
        });
    }
}

fn config(concurrency: usize) -> DispatchConfig {
    DispatchConfig {
        concurrency,
        ..DispatchConfig::default()
    }
}

#[test]
fn answering_users_goes_first_but_waiting_work_ages_and_is_not_starved() {
    let views = Views::default();
    let mut d = Dispatcher::new(config(1), 0);
    d.enqueue("rename".into(), rename("chat_r"), 0);
    let mut now = 0;
    let mut order = Vec::new();
    for i in 0..15 {
        // A steady stream of user work, one new message every second.
        d.enqueue(
            format!("fail:{i}").into(),
            fail_message(&format!("c{i}"), &format!("m{i}")),
            now,
        );
        let s = started(d.select(&views, now));
        assert_eq!(s.len(), 1, "concurrency 1");
        order.push(s[0].id.0.clone());
        let events = d.finished(
            &s[0].id,
            1,
            Ok(Effect::AgentSessionAborted {
                agent_session_id: "x".into(),
            }),
            now,
        );
        assert_eq!(events.len(), 1);
        now += 2_000;
    }
    let at = order
        .iter()
        .position(|id| id == "rename")
        .expect("rename ran");
    assert!(at > 0, "a fresh prompt outranks a fresh rename: {order:?}");
    // Priority 2 x 10 s of ageing: the rename runs once it has waited 20 s, whatever arrives.
    assert!(at <= 11, "{order:?}");
}

#[test]
fn never_two_commands_for_the_same_session_at_once() {
    let views = Views::default();
    let mut d = Dispatcher::new(config(10), 0);
    d.enqueue("a".into(), rename("chat_1"), 0);
    d.enqueue("b".into(), fail_message("chat_1", "m1"), 0);
    d.enqueue("c".into(), rename("chat_2"), 0);
    let s = started(d.select(&views, 0));
    let ids: Vec<_> = s.iter().map(|a| a.id.0.as_str()).collect();
    assert_eq!(ids, ["b", "c"], "b outranks a; a waits for chat_1");
    assert!(started(d.select(&views, 1)).is_empty());
    d.finished(
        &"b".into(),
        1,
        Ok(Effect::SessionDeleted {
            chat_session_id: "chat_1".into(),
        }),
        2,
    );
    let s = started(d.select(&views, 2));
    assert_eq!(s.len(), 1);
    assert_eq!(s[0].id.0, "a");
}

#[test]
fn retryable_failures_back_off_with_jitter_block_the_key_and_end_in_a_dead_letter() {
    let views = Views::default();
    let mut d = Dispatcher::new(config(10), 0);
    d.enqueue("a".into(), rename("chat_1"), 0);
    let mut now = 0;
    for attempt in 1..=3u32 {
        let s = started(d.select(&views, now));
        assert_eq!(s.len(), 1);
        assert_eq!(s[0].attempt, attempt);
        // The backend's listings keep working: the failures are this command's.
        d.observed(Source::Backend, true, now);
        let events = d.finished(&s[0].id, attempt, Err(PortError::retryable("503")), now);
        if attempt < 3 {
            let Event::CommandFailed(f) = &events[0] else {
                panic!("{events:?}")
            };
            let next = f.next_attempt_at.expect("a next attempt");
            let ceiling = 1_000u64 << (attempt - 1);
            assert!(
                next >= now && next <= now + ceiling,
                "full jitter within {ceiling} ms"
            );
            // Another command for the same session waits out the backoff too.
            d.enqueue(format!("other{attempt}").into(), rename("chat_1"), now);
            if next > now {
                assert!(
                    started(d.select(&views, now)).is_empty(),
                    "key is backing off"
                );
            }
            if next > now {
                assert_eq!(d.next_wakeup(now), Some(next));
            }
            now = next;
            // Run the other one out of the way first if it is picked.
            d.queue.retain(|id, _| id.0 == "a");
        } else {
            assert!(
                matches!(events[1], Event::CommandDeadLettered(_)),
                "{events:?}"
            );
        }
    }
    assert_eq!(d.stats().dead_letters, 1);
    assert_eq!(d.queued(), 0);
}

#[test]
fn a_cooldown_once_over_is_forgotten_so_wakeups_do_not_walk_history() {
    let views = Views::default();
    let mut d = Dispatcher::new(config(10), 0);
    d.enqueue("a".into(), rename("chat_1"), 0);
    let s = started(d.select(&views, 0));
    d.observed(Source::Backend, true, 0);
    let events = d.finished(&s[0].id, 1, Err(PortError::terminal("400")), 0);
    assert!(matches!(events[0], Event::CommandFailed(_)), "{events:?}");
    // Another key fails and retries: its cooldown is the wakeup while it waits.
    d.enqueue("b".into(), rename("chat_2"), 0);
    let s = started(d.select(&views, 0));
    let events = d.finished(&s[0].id, 1, Err(PortError::retryable("503")), 0);
    let Event::CommandFailed(f) = &events[0] else {
        panic!("{events:?}")
    };
    let next = f.next_attempt_at.expect("a retry");
    assert!(next > 0, "the seeded jitter waits");
    assert_eq!(d.next_wakeup(0), Some(next));
    // Past it, `select` forgets every cooldown that is over: none is kept for history.
    let s = started(d.select(&views, next));
    assert_eq!(s.len(), 1, "b runs again");
    assert!(
        d.key_not_before.values().all(|t| *t > next),
        "{:?}",
        d.key_not_before
    );
}

#[test]
fn an_outage_is_waited_out_not_charged_to_the_commands() {
    let views = Views::default();
    let mut d = Dispatcher::new(config(10), 0);
    d.enqueue("a".into(), rename("chat_1"), 0);
    let mut now = 0;
    let mut attempts = 0;
    while attempts < 8 {
        // The listings fail too: the backend is down.
        d.observed(Source::Backend, false, now);
        let s = started(d.select(&views, now));
        assert!(s.len() <= 1, "a probe at most");
        if let Some(a) = s.first() {
            attempts += 1;
            let events = d.finished(&a.id, attempts, Err(PortError::retryable("refused")), now);
            assert_eq!(
                events.len(),
                1,
                "never dead-lettered by an outage: {events:?}"
            );
        }
        now = d.next_wakeup(now).expect("waits for the breaker");
    }
    d.observed(Source::Backend, true, now);
    let s = started(d.select(&views, now));
    let events = d.finished(
        &s[0].id,
        9,
        Ok(Effect::SessionRenamed {
            chat_session_id: "chat_1".into(),
            title: "t".into(),
        }),
        now,
    );
    assert!(matches!(events[0], Event::CommandSucceeded(_)));
    assert!(
        now <= 8 * 30_000 + 31_000,
        "probes at most every 30 s: {now}"
    );
}

#[test]
fn a_terminal_failure_is_not_retried() {
    let views = Views::default();
    let mut d = Dispatcher::new(config(10), 0);
    d.enqueue("a".into(), rename("chat_1"), 0);
    let s = started(d.select(&views, 0));
    let events = d.finished(&s[0].id, 1, Err(PortError::terminal("400 bad title")), 0);
    assert!(matches!(&events[0], Event::CommandFailed(f) if f.class == ErrorClass::Terminal));
    assert_eq!(d.queued(), 0);
}

#[test]
fn a_megabyte_error_from_a_server_enters_the_events_as_one_bounded_line() {
    let views = Views::default();
    let mut d = Dispatcher::new(config(10), 0);
    d.enqueue("a".into(), rename("chat_1"), 0);
    let body = "HTTP 502 from the proxy\n<html>\r\n\x1b[2J".repeat(30_000);
    assert!(body.len() > 1_000_000);
    let mut now = 0;
    let mut errors = Vec::new();
    for attempt in 1..=3u32 {
        d.observed(Source::Backend, true, now);
        let s = started(d.select(&views, now));
        let events = d.finished(&s[0].id, attempt, Err(PortError::retryable(&*body)), now);
        for e in &events {
            match e {
                Event::CommandFailed(f) => {
                    errors.push(f.error.clone());
                    now = f.next_attempt_at.unwrap_or(now);
                }
                Event::CommandDeadLettered(dl) => errors.push(dl.last_error.clone()),
                _ => {}
            }
        }
    }
    assert_eq!(errors.len(), 4, "three failures and the dead letter");
    for e in errors {
        assert_eq!(e.chars().count(), crate::text::MAX_LINE_CHARS, "{e}");
        assert!(!e.contains(['\n', '\r', '\x1b']), "{e}");
        assert!(
            e.starts_with("HTTP 502 from the proxy <html> \\u{1b}[2J"),
            "{e}"
        );
    }
}

#[test]
fn the_global_limit_and_the_breaker_hold() {
    let views = Views::default();
    let mut cfg = config(3);
    cfg.breaker = BreakerPolicy {
        failures: 2,
        open_ms: 5_000,
        max_open_ms: 5_000,
    };
    let mut d = Dispatcher::new(cfg, 0);
    for i in 0..6 {
        d.enqueue(format!("r{i}").into(), rename(&format!("chat_{i}")), 0);
    }
    let s = started(d.select(&views, 0));
    assert_eq!(s.len(), 3);
    for a in &s {
        d.finished(
            &a.id,
            1,
            Err(PortError::retryable("connection refused")),
            10,
        );
    }
    // Open: nothing goes to the backend until the breaker lets one probe through.
    assert!(started(d.select(&views, 4_000)).is_empty());
    let probe = started(d.select(&views, 5_010));
    assert_eq!(probe.len(), 1, "one probe");
    d.finished(
        &probe[0].id,
        2,
        Ok(Effect::SessionRenamed {
            chat_session_id: "x".into(),
            title: "t".into(),
        }),
        5_020,
    );
    assert_eq!(started(d.select(&views, 5_030)).len(), 3, "closed again");
}

#[test]
fn many_creations_cost_one_model_fetch() {
    let mut views = Views::default();
    let mut d = Dispatcher::new(config(10), 0);
    for i in 0..20 {
        d.enqueue(format!("c{i}").into(), create(&format!("ses_{i}")), 0);
    }
    let actions = d.select(&views, 0);
    assert_eq!(actions.len(), 1, "{actions:?}");
    let Action::FetchModels(fetch) = &actions[0] else {
        panic!("{actions:?}")
    };
    assert!(
        d.select(&views, 1).is_empty(),
        "single flight: the others wait"
    );
    let model = ModelRef::parse("mock/small");
    let events = d.models_fetched(
        fetch.generation,
        Ok(ModelList {
            models: vec![model.clone()],
            default: None,
        }),
        2,
    );
    apply(&mut views, events, 2);
    let s = started(d.select(&views, 3));
    assert_eq!(s.len(), 10);
    assert!(s.iter().all(
        |a| matches!(&a.command, Command::CreateSession { model: Some(m), .. } if m == "mock/small")
    ));
    assert_eq!(d.stats().model_fetches, 1);
    // A restarted agent server (a new generation) invalidates the list.
    apply(
        &mut views,
        vec![Event::AgentServerStarted(AgentServerStarted {
            generation: 2,
            url: "u".into(),
            pid: None,
        })],
        4,
    );
    for a in &s {
        d.finished(
            &a.id,
            1,
            Ok(Effect::AgentSessionAborted {
                agent_session_id: "x".into(),
            }),
            5,
        );
    }
    let again = d.select(&views, 6);
    assert!(
        matches!(again.as_slice(), [Action::FetchModels(f)] if f.generation == 2),
        "{again:?}"
    );
}

#[test]
fn resumed_commands_keep_their_ids_and_an_interrupted_attempt_is_made_again() {
    let mut views = Views::default();
    let planned = Event::CommandPlanned(CommandPlanned {
        command_id: "renameSession:chat_1@3".into(),
        command: rename("chat_1"),
        reason: "r".into(),
    });
    let started_ev = Event::AttemptStarted(AttemptStarted {
        command_id: "renameSession:chat_1@3".into(),
        op: Op::RenameSession,
        subject: rename("chat_1").subject(),
        attempt: 1,
    });
    apply(&mut views, vec![planned, started_ev], 0);
    let mut d = Dispatcher::new(config(10), 0);
    assert_eq!(d.resume(&views.commands.state, 0), 1);
    let s = started(d.select(&views, 0));
    assert_eq!(s[0].id.0, "renameSession:chat_1@3");
    assert_eq!(
        s[0].attempt, 1,
        "the interrupted attempt is not counted as failed"
    );
    assert!(
        s[0].uncertain,
        "the process died during it: the next attempt looks before it acts"
    );
}

#[test]
fn an_attempt_after_a_failure_that_may_have_taken_effect_looks_first() {
    let views = Views::default();
    let mut d = Dispatcher::new(config(10), 0);
    d.enqueue("a".into(), rename("chat_1"), 0);
    let s = started(d.select(&views, 0));
    assert!(!s[0].uncertain, "a first attempt has nothing to look for");
    d.observed(Source::Backend, true, 0);
    let events = d.finished(&s[0].id, 1, Err(PortError::retryable("reply lost")), 0);
    let Event::CommandFailed(f) = &events[0] else {
        panic!("{events:?}")
    };
    let s = started(d.select(&views, f.next_attempt_at.unwrap()));
    assert!(s[0].uncertain);
}

#[test]
fn a_terminal_failure_does_not_close_an_open_breaker() {
    let views = Views::default();
    let mut d = Dispatcher::new(config(10), 0);
    for t in 0..3 {
        d.observed(Source::Backend, false, t);
    }
    assert!(!d.backend.breaker.allows(3), "open after three failures");
    let probe_at = d.backend.breaker.reopens_at().unwrap();
    d.enqueue("a".into(), rename("chat_1"), probe_at);
    let s = started(d.select(&views, probe_at));
    assert_eq!(s.len(), 1, "the probe");
    d.finished(&s[0].id, 1, Err(PortError::terminal("400 bad")), probe_at);
    assert_ne!(
        d.backend.breaker.state(),
        BreakerState::Closed,
        "an error is no proof of health"
    );
    assert!(d.backend.breaker.allows(probe_at), "another probe may go");
}

#[test]
fn a_deletion_waits_while_the_agent_sides_latest_observation_failed() {
    let listing = || {
        Event::ListingCompleted(ListingCompleted {
            source: Source::Agent,
            sessions: 0,
            complete: true,
            as_of: Some(0),
        })
    };
    let failure = Event::ObservationFailed(ObservationFailed {
        source: Source::Agent,
        operation: "list_sessions".into(),
        error: "500".into(),
    });
    let mut views = Views::default();
    apply(&mut views, vec![listing(), failure], 0);
    let mut d = Dispatcher::new(config(10), 0);
    let delete = Command::MarkSessionDeleted {
        chat_session_id: "c".into(),
    };
    d.enqueue("delete".into(), delete, 0);
    assert!(
        started(d.select(&views, 0)).is_empty(),
        "held after the failure"
    );
    apply(&mut views, vec![listing()], 1);
    assert_eq!(
        started(d.select(&views, 1)).len(),
        1,
        "a complete listing releases it"
    );
}

/// An agent whose model fails once with an error the provider calls retryable (OpenCode
/// answers 200 with `info.error = APIError{isRetryable: true}` and keeps the failed reply in
/// the session), then answers.
#[derive(Default)]
struct OverloadedOnce {
    runs: std::sync::atomic::AtomicU32,
    /// The reply the server holds for the user message, as `prompt_outcome` reads it back.
    held: std::sync::Mutex<Option<crate::ports::PromptOutcome>>,
}

impl crate::ports::AgentServer for OverloadedOnce {
    fn health(&self) -> crate::ports::PortFuture<'_, ()> {
        Box::pin(async { unimplemented!() })
    }
    fn list_sessions(
        &self,
        _: Option<Millis>,
    ) -> crate::ports::PortFuture<'_, crate::ports::AgentListing> {
        Box::pin(async { unimplemented!() })
    }
    fn create_session<'a>(
        &'a self,
        _: &'a str,
        _: Option<&'a SessionTag>,
    ) -> crate::ports::PortFuture<'a, AgentSessionInfo> {
        Box::pin(async { unimplemented!() })
    }
    fn find_session<'a>(
        &'a self,
        _: &'a SessionTag,
    ) -> crate::ports::PortFuture<'a, Option<AgentSessionInfo>> {
        Box::pin(async { unimplemented!() })
    }
    fn rename_session<'a>(
        &'a self,
        _: &'a AgentSessionId,
        _: &'a str,
    ) -> crate::ports::PortFuture<'a, ()> {
        Box::pin(async { unimplemented!() })
    }
    fn delete_session<'a>(&'a self, _: &'a AgentSessionId) -> crate::ports::PortFuture<'a, ()> {
        Box::pin(async { unimplemented!() })
    }
    fn prompt<'a>(
        &'a self,
        _: &'a AgentSessionId,
        _: crate::ports::PromptRequest<'a>,
    ) -> crate::ports::PortFuture<'a, String> {
        Box::pin(async move {
            let run = self.runs.fetch_add(1, std::sync::atomic::Ordering::SeqCst) + 1;
            if run == 1 {
                let e = PortError::retryable("prompt failed: APIError: Overloaded");
                *self.held.lock().unwrap() = Some(crate::ports::PromptOutcome::Failed(e.clone()));
                return Err(e);
            }
            *self.held.lock().unwrap() =
                Some(crate::ports::PromptOutcome::Answered("the answer".into()));
            Ok("the answer".into())
        })
    }
    fn prompt_outcome<'a>(
        &'a self,
        _: &'a AgentSessionId,
        _: &'a str,
    ) -> crate::ports::PortFuture<'a, crate::ports::PromptOutcome> {
        Box::pin(async move {
            Ok(self
                .held
                .lock()
                .unwrap()
                .clone()
                .unwrap_or(crate::ports::PromptOutcome::NotSent))
        })
    }
    fn forget_prompt<'a>(
        &'a self,
        _: &'a AgentSessionId,
        _: &'a str,
    ) -> crate::ports::PortFuture<'a, ()> {
        Box::pin(async move {
            *self.held.lock().unwrap() = None;
            Ok(())
        })
    }
    fn abort<'a>(&'a self, _: &'a AgentSessionId) -> crate::ports::PortFuture<'a, ()> {
        Box::pin(async { unimplemented!() })
    }
    fn status(&self) -> crate::ports::PortFuture<'_, Vec<AgentSessionStatus>> {
        Box::pin(async { unimplemented!() })
    }
    fn list_models(&self) -> crate::ports::PortFuture<'_, ModelList> {
        Box::pin(async { unimplemented!() })
    }
}

/// A retryable failure is retried so that the retry may succeed. For a prompt whose answer was
/// a retryable provider error, every retry is `uncertain` (`finished` pushes retryable failures
/// with `uncertain: true`), so `prompt_once` reads the failed reply back and returns the same
/// error without asking the model again: all attempts are spent reading one failure, and the
/// message is failed ("gave up after 3 attempts") by an error the provider said would pass.
#[tokio::test]
async fn a_prompt_whose_answer_was_a_retryable_error_is_asked_again_on_retry() {
    let agent = OverloadedOnce::default();
    let clock: std::sync::Arc<dyn crate::clock::Clock> =
        std::sync::Arc::new(crate::clock::SystemClock);
    let backend = crate::sim::SimBackend::new(clock, crate::sim::Faults::default());
    let mut views = Views::default();
    let seen = agent_seen("ses_1");
    apply(&mut views, vec![seen], 0);
    let mut d = Dispatcher::new(config(10), 0);
    let prompt = Command::Prompt {
        chat_session_id: "chat_1".into(),
        agent_session_id: "ses_1".into(),
        message_id: "m1".into(),
        text: "hello".into(),
        model: None,
        agent_message_id: Some("msg_0000000000010000000000000A".into()),
    };
    d.enqueue("prompt:m1".into(), prompt, 0);
    let mut now = 0;
    let mut result = None;
    for attempt in 1..=3 {
        let s = started(d.select(&views, now));
        assert_eq!(s.len(), 1, "attempt {attempt} starts");
        let r = execute(&agent, &backend, &s[0], "w").await;
        let events = d.finished(&s[0].id, s[0].attempt, r.clone(), now);
        result = Some(r);
        match &events[0] {
            Event::CommandFailed(f) if f.next_attempt_at.is_some() => {
                now = f.next_attempt_at.unwrap();
            }
            _ => break,
        }
    }
    assert_eq!(
        agent.runs.load(std::sync::atomic::Ordering::SeqCst),
        2,
        "the model was not asked again after its retryable failure: {result:?}"
    );
    assert_eq!(
        result,
        Some(Ok(Effect::PromptAnswered {
            chat_session_id: "chat_1".into(),
            message_id: "m1".into(),
            content: "the answer".into(),
        }))
    );
}

#[test]
fn a_resumed_deletion_waits_for_a_complete_agent_listing_of_this_process() {
    let listing = Event::ListingCompleted(ListingCompleted {
        source: Source::Agent,
        sessions: 0,
        complete: true,
        as_of: Some(0),
    });
    let mut views = Views::default();
    // The listing the deletion was planned on, seen by the previous process (seq 1).
    apply(&mut views, vec![listing.clone()], 0);
    let mut d = Dispatcher::new(config(10), 0);
    d.hold_until_agent_listed_after(views.min_seq());
    let delete = Command::MarkSessionDeleted {
        chat_session_id: "c".into(),
    };
    d.enqueue("delete".into(), delete, 0);
    assert!(
        started(d.select(&views, 0)).is_empty(),
        "a listing of a previous process proves nothing now"
    );
    apply(&mut views, vec![listing], 1);
    assert_eq!(
        started(d.select(&views, 1)).len(),
        1,
        "a complete listing of this process releases it"
    );
}

#[test]
fn a_command_planned_past_the_retention_horizon_is_cancelled_not_sent_again() {
    let mut views = Views::default();
    let planned = Event::CommandPlanned(CommandPlanned {
        command_id: "renameSession:chat_1@1".into(),
        command: rename("chat_1"),
        reason: "r".into(),
    });
    apply(&mut views, vec![planned], 0);
    let horizon = DispatchConfig::default().retry_horizon_ms;
    // Resumed within the horizon: it is attempted.
    let mut d = Dispatcher::new(config(1), 0);
    d.set_ready(true);
    d.resume(&views.commands.state, horizon - 1);
    assert_eq!(started(d.select(&views, horizon - 1)).len(), 1);
    // Resumed at the horizon (a worker down for that long): the backend may have pruned the
    // record of an earlier attempt, so the id is not sent again.
    let mut d = Dispatcher::new(config(1), 0);
    d.set_ready(true);
    d.resume(&views.commands.state, horizon);
    let actions = d.select(&views, horizon);
    assert!(
        matches!(&actions[..], [Action::Cancel(Event::CommandCancelled(c))] if c.reason.contains("retention horizon")),
        "{actions:?}"
    );
}

#[test]
fn the_line_starts_what_a_sort_of_the_whole_queue_puts_first() {
    // The oracle is the selection this dispatcher made before it kept a line: every queued
    // command past its backoff, sorted by (waiting_since + priority x ageing, enqueue order).
    let views = Views::default();
    let mut d = Dispatcher::new(config(1), 0);
    // Each command on sessions of its own, so that no key holds one back.
    let link = |chat: &str| Command::LinkAgentSession {
        chat_session_id: chat.into(),
        agent_session_id: format!("ses_{chat}").into(),
    };
    for i in 0..90u64 {
        let chat = format!("chat_{i}");
        let command = match i % 3 {
            0 => fail_message(&chat, &format!("m{i}")),
            1 => link(&chat),
            _ => rename(&chat),
        };
        d.enqueue(format!("k{i}").into(), command, (i * 7_919) % 20_000);
    }
    // And commands a previous process left failed, each resumed to wait out its backoff.
    let mut views = views;
    for i in 0..30u64 {
        let (id, command) = (
            CommandId::from(format!("r{i}")),
            rename(&format!("old_{i}")),
        );
        let (op, subject) = (command.op(), command.subject());
        let planned = CommandPlanned {
            command_id: id.clone(),
            command,
            reason: "r".into(),
        };
        let failed = CommandFailed {
            command_id: id,
            op,
            subject,
            attempt: 1,
            class: ErrorClass::Retryable,
            error: "HTTP 503".into(),
            next_attempt_at: Some(20_000 + (i * 3_571) % 30_000),
        };
        let events = vec![Event::CommandPlanned(planned), Event::CommandFailed(failed)];
        apply(&mut views, events, 0);
    }
    assert_eq!(d.resume(&views.commands.state, 20_000), 30);
    let views = views;
    let (mut now, mut started_n, mut failed_n) = (20_000, 0, 0);
    for turn in 0..5_000u64 {
        let expected = d
            .queue
            .iter()
            .filter(|(_, q)| q.not_before <= now)
            .filter(|(_, q)| {
                let cooling = |k: &String| d.key_not_before.get(k).is_some_and(|t| *t > now);
                !q.keys.iter().any(cooling)
            })
            .min_by_key(|(_, q)| {
                let rank = u64::from(priority(q.command.op())) * d.cfg.aging_ms;
                (q.waiting_since + rank, q.order)
            })
            .map(|(id, _)| id.clone());
        let s = started(d.select(&views, now));
        if let Some(a) = s.first() {
            assert_eq!(Some(&a.id), expected.as_ref(), "turn {turn} at {now}");
            started_n += 1;
            // One attempt in five fails and waits out a backoff in the line's other half.
            let result = match turn % 5 {
                0 => {
                    failed_n += 1;
                    Err(PortError::retryable("HTTP 503"))
                }
                _ => Ok(Effect::SessionRenamed {
                    chat_session_id: "x".into(),
                    title: "t".into(),
                }),
            };
            d.finished(&a.id, a.attempt, result, now + 5);
        }
        now += 50;
        if d.queued() == 0 && d.in_flight() == 0 {
            break;
        }
    }
    assert_eq!(d.queued(), 0, "everything started in the end");
    assert!(failed_n > 0 && started_n == 120 + failed_n - d.stats().dead_letters as usize);
    assert_eq!(d.oldest_waiting_since(), None);
}

#[test]
fn a_prompt_waits_while_its_agent_session_is_not_in_view() {
    let mut views = Views::default();
    let mut d = Dispatcher::new(config(10), 0);
    let prompt = Command::Prompt {
        chat_session_id: "chat_1".into(),
        agent_session_id: "ses_1".into(),
        message_id: "m1".into(),
        text: "hello".into(),
        model: None,
        agent_message_id: None,
    };
    d.enqueue("prompt:m1".into(), prompt, 0);
    assert!(
        started(d.select(&views, 0)).is_empty(),
        "a session the last listing did not show: a 404 would fail the message for good"
    );
    assert_eq!(d.queued(), 1, "waiting, not cancelled");
    let seen = agent_seen("ses_1");
    apply(&mut views, vec![seen], 1);
    assert_eq!(started(d.select(&views, 1)).len(), 1, "back in view: sent");
}

/// The agent server listed session `id`.
fn agent_seen(id: &str) -> Event {
    Event::AgentSessionSeen(AgentSessionInfo {
        agent_session_id: id.into(),
        title: "t".into(),
        directory: None,
        project: None,
        model: None,
        updated_at: 0,
        parent_id: None,
        tag: None,
    })
}
