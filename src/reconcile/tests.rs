//! The reconciler's rules, one scenario each, on views folded from real events.

use super::*;
use crate::events::*;
use crate::projections::Views;

mod deletions;
mod retention;

const T0: Millis = 1_700_000_000_000;
const MIN: Millis = 60_000;

/// Views folded from events appended one by one, and a clock.
struct World {
    views: Views,
    /// Every event applied, for rebuilding the views from scratch.
    log: Vec<Envelope>,
    seq: u64,
    now: Millis,
    started_at: Millis,
    ready: bool,
}

impl World {
    fn new() -> Self {
        Self {
            views: Views::default(),
            log: Vec::new(),
            seq: 0,
            now: T0,
            started_at: T0,
            ready: true,
        }
    }

    fn ev(&mut self, event: Event) -> &mut Self {
        self.seq += 1;
        let env = Envelope {
            seq: self.seq,
            id: uuid::Uuid::nil(),
            at: self.now,
            v: event.kind().version(),
            event,
            cause: None,
        };
        self.views.apply(&env);
        self.log.push(env);
        self
    }

    fn plan(&self) -> Vec<Planned> {
        let ctx = Context {
            process_seq: 0,
            now: self.now,
            started_at: self.started_at,
            ready: self.ready,
        };
        reconcile(&self.views, &ctx, &Policy::default())
    }

    /// Plans, records the plan in the ledger, and returns the ids planned.
    fn step(&mut self) -> Vec<String> {
        let planned = self.plan();
        let ids = planned
            .iter()
            .map(|p| p.planned.command_id.0.clone())
            .collect();
        for p in planned {
            self.ev(Event::CommandPlanned(p.planned));
        }
        ids
    }

    fn command(&self, id: &str) -> Command {
        let e = &self.views.commands.state.commands[&CommandId::from(id)];
        e.command().cloned().expect("open command keeps its body")
    }

    fn succeed(&mut self, id: &str, effect: Effect) -> &mut Self {
        let c = self.command(id);
        self.ev(Event::CommandSucceeded(CommandSucceeded {
            command_id: id.into(),
            op: c.op(),
            subject: c.subject(),
            attempt: 1,
            effect,
        }))
    }

    fn fail(&mut self, id: &str, class: ErrorClass, error: &str) -> &mut Self {
        let c = self.command(id);
        self.ev(Event::CommandFailed(CommandFailed {
            command_id: id.into(),
            op: c.op(),
            subject: c.subject(),
            attempt: 1,
            class,
            error: error.into(),
            next_attempt_at: None,
        }))
    }

    fn agent(&mut self, id: &str, title: &str) -> &mut Self {
        self.ev(Event::AgentSessionSeen(AgentSessionInfo {
            agent_session_id: id.into(),
            title: title.into(),
            directory: None,
            project: None,
            model: None,
            updated_at: self.now,
            parent_id: None,
            tag: None,
        }))
    }

    fn chat(&mut self, id: &str, agent: Option<&str>, title: &str) -> &mut Self {
        self.ev(Event::BackendSessionSeen(ChatSessionInfo {
            chat_session_id: id.into(),
            agent_session_id: agent.map(Into::into),
            title: title.into(),
            model: None,
            status: ChatStatus::Active,
            last_activity: self.now,
            project: None,
        }))
    }

    fn listed(&mut self, source: Source, complete: bool) -> &mut Self {
        self.ev(Event::ListingCompleted(ListingCompleted {
            source,
            sessions: 0,
            complete,
            as_of: None,
        }))
    }

    fn both_listed(&mut self) -> &mut Self {
        self.listed(Source::Agent, true)
            .listed(Source::Backend, true)
    }

    /// `chat_1` linked to `ses_1`, both sides listed.
    fn linked(&mut self) -> &mut Self {
        self.agent("ses_1", "A")
            .chat("chat_1", Some("ses_1"), "A")
            .both_listed()
    }

    /// The reason a planned `failMessage` carries.
    fn fail_reason(&self, id: &str) -> String {
        match self.command(id) {
            Command::FailMessage { reason, .. } => reason,
            other => panic!("unexpected {other:?}"),
        }
    }

    fn user_message(&mut self, chat: &str, id: &str, at: Millis) -> &mut Self {
        self.ev(Event::BackendMessageSeen(MessageInfo {
            chat_session_id: chat.into(),
            message_id: id.into(),
            role: Role::User,
            content: format!("question {id}"),
            completed: true,
            timestamp: at,
            reply_to: None,
            error: None,
        }))
    }
}

#[test]
fn nothing_is_planned_before_both_sides_are_listed() {
    let mut w = World::new();
    w.agent("ses_1", "A").listed(Source::Agent, true);
    assert!(w.plan().is_empty(), "backend not listed yet");
    w.listed(Source::Backend, false);
    assert!(w.plan().is_empty(), "a partial listing is not a listing");
    w.listed(Source::Backend, true);
    assert_eq!(w.step(), ["createSession:ses_1"]);
}

#[test]
fn a_new_agent_session_gets_one_chat_session_even_when_a_stale_listing_lacks_it() {
    let mut w = World::new();
    w.agent("ses_1", "A").both_listed();
    assert_eq!(w.step(), ["createSession:ses_1"]);
    assert!(w.step().is_empty(), "planned once");
    w.succeed(
        "createSession:ses_1",
        Effect::ChatSessionCreated {
            chat_session_id: "chat_1".into(),
            agent_session_id: "ses_1".into(),
            title: "A".into(),
            model: None,
        },
    );
    // A backend listing that started before the creation reports the chat gone.
    w.ev(Event::BackendSessionGone(BackendSessionGone {
        chat_session_id: "chat_1".into(),
    }));
    assert!(w.step().is_empty(), "the ledger remembers the creation");
}

#[test]
fn a_title_change_is_mirrored_once_per_change() {
    let mut w = World::new();
    w.linked();
    assert!(w.step().is_empty());
    w.agent("ses_1", "B");
    let ids = w.step();
    assert_eq!(ids.len(), 1);
    assert!(ids[0].starts_with("renameSession:chat_1@"));
    w.succeed(
        &ids[0],
        Effect::SessionRenamed {
            chat_session_id: "chat_1".into(),
            title: "B".into(),
        },
    );
    assert!(w.step().is_empty());
    // Back to "A": a new change, a new rename.
    w.agent("ses_1", "A");
    let again = w.step();
    assert_eq!(again.len(), 1);
    assert_ne!(again[0], ids[0]);
}

#[test]
fn deletions_need_a_complete_listing_newer_than_the_link_and_no_failure_since() {
    let mut w = World::new();
    w.chat("chat_1", Some("ses_gone"), "A")
        .listed(Source::Backend, true);
    // The agent side failed to list: nothing is deleted.
    w.ev(Event::ObservationFailed(ObservationFailed {
        source: Source::Agent,
        operation: "list_sessions".into(),
        error: "connection refused".into(),
    }));
    assert!(w.plan().is_empty());
    w.listed(Source::Agent, false);
    assert!(w.plan().is_empty(), "partial listing");
    w.listed(Source::Agent, true);
    let plan = w.plan();
    assert_eq!(
        plan[0].cause_seq,
        Some(w.seq),
        "caused by the complete listing"
    );
    assert_eq!(w.step(), ["markSessionDeleted:chat_1"]);
    // A failure after the complete listing holds further deletions.
    w.chat("chat_2", Some("ses_gone2"), "B");
    w.ev(Event::ObservationFailed(ObservationFailed {
        source: Source::Agent,
        operation: "list_sessions".into(),
        error: "timeout".into(),
    }));
    assert!(w.step().is_empty());
}

#[test]
fn a_link_newer_than_the_last_listing_is_not_deleted() {
    let mut w = World::new();
    w.both_listed();
    w.chat("chat_1", Some("ses_new"), "A");
    assert!(w.plan().is_empty(), "the agent listing predates the link");
}

#[test]
fn a_message_is_prompted_only_when_ready_after_lazily_ensuring_its_agent_session() {
    let mut w = World::new();
    w.chat("chat_1", None, "A").both_listed();
    w.ready = false;
    w.user_message("chat_1", "msg_1", T0);
    assert!(w.step().is_empty(), "not ready: nothing");
    w.ready = true;
    assert_eq!(w.step(), ["createAgentSession:chat_1"]);
    w.succeed(
        "createAgentSession:chat_1",
        Effect::AgentSessionCreated {
            chat_session_id: "chat_1".into(),
            agent_session_id: "ses_9".into(),
            title: "A".into(),
        },
    );
    assert_eq!(w.step(), ["linkAgentSession:chat_1:ses_9"]);
    w.succeed(
        "linkAgentSession:chat_1:ses_9",
        Effect::AgentSessionLinked {
            chat_session_id: "chat_1".into(),
            agent_session_id: "ses_9".into(),
        },
    );
    assert_eq!(w.step(), ["prompt:msg_1"]);
    w.succeed(
        "prompt:msg_1",
        Effect::PromptAnswered {
            chat_session_id: "chat_1".into(),
            message_id: "msg_1".into(),
            content: "42".into(),
        },
    );
    assert_eq!(w.step(), ["completeMessage:msg_1"]);
    match w.command("completeMessage:msg_1") {
        Command::CompleteMessage { content, .. } => assert_eq!(content, "42"),
        other => panic!("unexpected {other:?}"),
    }
}

#[test]
fn stale_messages_found_at_start_are_failed_once_and_never_prompted() {
    let mut w = World::new();
    w.linked();
    w.user_message("chat_1", "msg_old", T0 - 10 * MIN);
    w.user_message("chat_1", "msg_new", T0 - MIN);
    let mut ids = w.step();
    ids.sort();
    assert_eq!(ids, ["failMessage:msg_old", "prompt:msg_new"]);
    assert!(w.step().is_empty());
    // A prompt planned for it before (say, by the previous process) is now obsolete.
    let prompt = Command::Prompt {
        chat_session_id: "chat_1".into(),
        agent_session_id: "ses_1".into(),
        message_id: "msg_old".into(),
        text: "q".into(),
        model: None,
        agent_message_id: None,
    };
    assert!(obsolete(&w.views, &prompt).is_some());
}

#[test]
fn a_chats_messages_are_prompted_in_the_order_written_not_by_id() {
    let mut w = World::new();
    w.linked();
    // Random ids: the later message's id sorts first.
    w.user_message("chat_1", "msg_f00d", T0 - 2_000)
        .user_message("chat_1", "msg_0bad", T0 - 1_000)
        .user_message("chat_1", "msg_00aa", T0 - 1_000);
    assert_eq!(
        w.step(),
        ["prompt:msg_f00d", "prompt:msg_0bad", "prompt:msg_00aa"],
        "by time, then by when the worker saw them"
    );
}

#[test]
fn a_terminal_prompt_failure_fails_the_message_at_once() {
    let mut w = World::new();
    w.linked();
    w.user_message("chat_1", "msg_1", T0);
    assert_eq!(w.step(), ["prompt:msg_1"]);
    w.fail(
        "prompt:msg_1",
        ErrorClass::Terminal,
        "ContextOverflowError: prompt is too long",
    );
    assert_eq!(w.step(), ["failMessage:msg_1"]);
    let reason = w.fail_reason("failMessage:msg_1");
    assert!(reason.contains("ContextOverflowError"));
    assert!(w.step().is_empty(), "no retry");
}

#[test]
fn messages_of_a_deleted_session_are_failed_with_a_reason() {
    let mut w = World::new();
    w.chat("chat_1", Some("ses_gone"), "A");
    w.user_message("chat_1", "msg_1", T0);
    w.both_listed();
    w.ready = false;
    assert_eq!(w.step(), ["markSessionDeleted:chat_1"]);
    w.succeed(
        "markSessionDeleted:chat_1",
        Effect::SessionDeleted {
            chat_session_id: "chat_1".into(),
        },
    );
    assert_eq!(w.step(), ["failMessage:msg_1"]);
    let reason = w.fail_reason("failMessage:msg_1");
    assert_eq!(reason, "session deleted");
    // A message that arrives after the session ended is failed too.
    w.user_message("chat_1", "msg_2", T0);
    assert_eq!(w.step(), ["failMessage:msg_2"]);
}

#[test]
fn a_session_busy_for_six_hours_is_failed_and_aborted() {
    let mut w = World::new();
    w.linked();
    w.ev(Event::AgentSessionStatus(AgentSessionStatus {
        agent_session_id: "ses_1".into(),
        status: AgentStatus::Busy,
    }));
    w.now += 5 * 60 * MIN;
    assert!(w.step().is_empty(), "5 h is not stale yet");
    w.now += 60 * MIN;
    let mut ids = w.step();
    ids.sort();
    assert_eq!(ids.len(), 2);
    assert!(ids[0].starts_with("abortAgentSession:ses_1@"));
    assert_eq!(ids[1], "markSessionFailed:chat_1");
}

#[test]
fn commands_about_a_message_name_the_events_they_follow_from() {
    let mut w = World::new();
    w.linked();
    w.user_message("chat_1", "msg_old", T0 - 10 * MIN);
    let old_seen = w.seq;
    w.user_message("chat_1", "msg_1", T0);
    let seen = w.seq;
    let cause_of = |planned: &[Planned], id: &str| {
        planned
            .iter()
            .find(|p| p.planned.command_id.0 == id)
            .map(|p| p.cause_seq)
    };
    let planned = w.plan();
    assert_eq!(cause_of(&planned, "prompt:msg_1"), Some(Some(seen)));
    assert_eq!(
        cause_of(&planned, "failMessage:msg_old"),
        Some(Some(old_seen))
    );
    w.step();
    w.succeed(
        "prompt:msg_1",
        Effect::PromptAnswered {
            chat_session_id: "chat_1".into(),
            message_id: "msg_1".into(),
            content: "42".into(),
        },
    );
    let answered = w.seq;
    assert_eq!(
        cause_of(&w.plan(), "completeMessage:msg_1"),
        Some(Some(answered)),
        "delivering the answer follows from the prompt's success"
    );
}

impl World {
    fn dead(&mut self, id: &str, error: &str) -> &mut Self {
        let c = self.command(id);
        self.ev(Event::CommandDeadLettered(CommandDeadLettered {
            command_id: id.into(),
            op: c.op(),
            subject: c.subject(),
            attempts: 3,
            last_error: error.into(),
        }))
    }

    fn answered(&mut self) -> &mut Self {
        self.linked();
        self.user_message("chat_1", "msg_1", T0);
        assert_eq!(self.step(), ["prompt:msg_1"]);
        self.succeed(
            "prompt:msg_1",
            Effect::PromptAnswered {
                chat_session_id: "chat_1".into(),
                message_id: "msg_1".into(),
                content: "42".into(),
            },
        );
        assert_eq!(self.step(), ["completeMessage:msg_1"]);
        self
    }
}

#[test]
fn an_answer_whose_delivery_died_is_delivered_again_in_a_new_round_after_a_backoff() {
    let mut w = World::new();
    w.answered();
    w.dead("completeMessage:msg_1", "503 overloaded");
    assert_eq!(
        w.views.messages.state.undelivered.len(),
        1,
        "still owed to the backend"
    );
    assert!(w.step().is_empty(), "the first backoff has not passed");
    w.now += Policy::default().delivery_backoff(1);
    assert_eq!(w.step(), ["completeMessage:msg_1#round2"]);
    match w.command("completeMessage:msg_1#round2") {
        Command::CompleteMessage { content, .. } => assert_eq!(content, "42"),
        other => panic!("unexpected {other:?}"),
    }
    assert!(w.step().is_empty(), "one round at a time");
    w.dead("completeMessage:msg_1#round2", "503 overloaded");
    w.now += Policy::default().delivery_backoff(1);
    assert!(w.step().is_empty(), "the second wait is longer");
    w.now += Policy::default().delivery_backoff(2);
    assert_eq!(w.step(), ["completeMessage:msg_1#round3"]);
    w.succeed(
        "completeMessage:msg_1#round3",
        Effect::MessageCompleted {
            chat_session_id: "chat_1".into(),
            message_id: "msg_1".into(),
        },
    );
    assert!(w.views.messages.state.undelivered.is_empty());
    w.now += Policy::default().delivery_retry_cap_ms;
    assert!(w.step().is_empty(), "delivered: nothing more");
}

#[test]
fn an_answer_the_backend_refuses_for_good_becomes_a_failure_the_user_sees() {
    let mut w = World::new();
    w.answered();
    w.fail(
        "completeMessage:msg_1",
        ErrorClass::Terminal,
        "Value is too large",
    );
    assert_eq!(w.step(), ["failMessage:msg_1"]);
    match w.command("failMessage:msg_1") {
        Command::FailMessage { reason, .. } => {
            assert_eq!(
                reason,
                "the answer could not be delivered: Value is too large"
            )
        }
        other => panic!("unexpected {other:?}"),
    }
}

#[test]
fn a_failure_whose_delivery_failed_keeps_its_reason_in_every_round() {
    let mut w = World::new();
    w.linked();
    w.user_message("chat_1", "msg_old", T0 - 10 * MIN);
    assert_eq!(w.step(), ["failMessage:msg_old"]);
    w.fail("failMessage:msg_old", ErrorClass::Terminal, "bad request");
    w.now += Policy::default().delivery_backoff(1);
    assert_eq!(w.step(), ["failMessage:msg_old#round2"]);
    let reason = w.fail_reason("failMessage:msg_old#round2");
    assert!(reason.starts_with("still incomplete"));
}

#[test]
fn a_pending_message_is_failed_at_its_deadline_even_without_a_restart() {
    let mut w = World::new();
    w.chat("chat_1", None, "A").both_listed();
    w.ready = false; // the agent side never lets it be prompted
    w.user_message("chat_1", "msg_1", T0);
    w.now += Policy::default().message_deadline_ms - 1;
    assert!(w.step().is_empty());
    w.now += 1;
    assert_eq!(w.step(), ["failMessage:msg_1"]);
    let reason = w.fail_reason("failMessage:msg_1");
    assert_eq!(reason, "no answer within 30 min");
    let m = &w.views.messages.state.messages[&MessageId::from("msg_1")];
    assert_eq!(m.state, crate::projections::MessageState::Failed);
}

#[test]
fn listings_from_before_this_process_started_do_not_make_it_ready() {
    let mut w = World::new();
    w.chat("chat_1", Some("ses_gone"), "A").both_listed();
    let process_seq = w.seq;
    let ctx = |w: &World| Context {
        process_seq,
        now: w.now,
        started_at: w.started_at,
        ready: false,
    };
    let sessions = &w.views.sessions.state;
    assert!(!listed_in_this_process(sessions, process_seq));
    assert!(
        reconcile(&w.views, &ctx(&w), &Policy::default()).is_empty(),
        "no deletion on the strength of an old checkpoint's listing"
    );
    w.listed(Source::Agent, true);
    assert!(!listed_in_this_process(
        &w.views.sessions.state,
        process_seq
    ));
    w.listed(Source::Backend, true);
    assert!(listed_in_this_process(&w.views.sessions.state, process_seq));
    let ids: Vec<String> = reconcile(&w.views, &ctx(&w), &Policy::default())
        .into_iter()
        .map(|p| p.planned.command_id.0)
        .collect();
    assert_eq!(ids, ["markSessionDeleted:chat_1"]);
}

#[test]
fn a_session_we_created_for_a_chat_is_never_mirrored_as_another_chat() {
    let mut w = World::new();
    w.chat("chat_1", None, "A");
    w.ev(Event::AgentSessionSeen(AgentSessionInfo {
        agent_session_id: "ses_orphan".into(),
        title: "A".into(),
        directory: None,
        project: None,
        model: None,
        updated_at: w.now,
        parent_id: None,
        tag: Some(SessionTag {
            worker_id: "w".into(),
            command_id: "createAgentSession:chat_1".into(),
            chat_session_id: "chat_1".into(),
        }),
    }));
    w.agent("ses_plain", "B").both_listed();
    assert_eq!(w.step(), ["createSession:ses_plain"]);
}

#[test]
fn a_delivery_round_logged_before_the_clock_went_back_waits_from_the_restart_and_rounds_end() {
    let mut w = World::new();
    w.answered();
    w.dead("completeMessage:msg_1", "503 overloaded");
    // Restarted after the wall clock was stepped back an hour: the round "ended" in the future.
    w.now -= 60 * MIN;
    w.started_at = w.now;
    assert!(w.step().is_empty(), "the backoff counts from the restart");
    w.now += Policy::default().delivery_backoff(1);
    assert_eq!(w.step(), ["completeMessage:msg_1#round2"]);
    // A delivery the backend refuses round after round stops after the last round.
    let policy = Policy::default();
    for round in 2..=policy.max_delivery_rounds {
        w.dead(
            &format!("completeMessage:msg_1#round{round}"),
            "503 overloaded",
        );
        w.now += policy.delivery_backoff(round);
        let planned = w.step();
        if round < policy.max_delivery_rounds {
            assert_eq!(
                planned,
                [format!("completeMessage:msg_1#round{}", round + 1)]
            );
        } else {
            assert!(planned.is_empty(), "no round after the last: {planned:?}");
        }
    }
    assert_eq!(w.views.messages.state.undelivered.len(), 1, "still counted");
}

/// Seed 501 of the adversarial simulation: the last attempt of `createAgentSession` made the
/// session, its reply came past the timeout, and the command was dead-lettered; the session,
/// tagged for the chat, was then listed. It is linked to its chat rather than left a spare
/// while every later message of the chat fails for want of a session.
#[test]
fn a_session_made_by_a_creation_that_gave_up_is_adopted_by_its_chat() {
    let mut w = World::new();
    w.chat("chat_1", None, "A").both_listed();
    w.user_message("chat_1", "msg_1", T0);
    assert_eq!(w.step(), ["createAgentSession:chat_1"]);
    w.fail(
        "createAgentSession:chat_1",
        ErrorClass::Terminal,
        "createAgentSession timed out after 2000 ms",
    );
    assert_eq!(
        w.step(),
        ["failMessage:msg_1"],
        "no session: the message fails"
    );
    w.ev(Event::AgentSessionSeen(AgentSessionInfo {
        agent_session_id: "ses_late".into(),
        title: "A".into(),
        directory: None,
        project: None,
        model: None,
        updated_at: w.now,
        parent_id: None,
        tag: Some(SessionTag {
            worker_id: "w".into(),
            command_id: "createAgentSession:chat_1".into(),
            chat_session_id: "chat_1".into(),
        }),
    }));
    assert_eq!(w.step(), ["linkAgentSession:chat_1:ses_late"]);
    w.succeed(
        "linkAgentSession:chat_1:ses_late",
        Effect::AgentSessionLinked {
            chat_session_id: "chat_1".into(),
            agent_session_id: "ses_late".into(),
        },
    );
    w.user_message("chat_1", "msg_2", T0);
    assert_eq!(
        w.step(),
        ["prompt:msg_2"],
        "the next message has its session"
    );
}

#[test]
fn no_deletion_while_the_latest_agent_listing_is_partial() {
    let mut w = World::new();
    w.chat("chat_1", Some("ses_gone"), "A").both_listed();
    // The agent listing after that one came back partial: the world may hold more than it
    // says, and the older complete listing is no longer the latest word.
    w.listed(Source::Agent, false);
    assert!(w.step().is_empty(), "deleted on a partial listing's watch");
    assert!(agent_side_failing(&w.views.sessions.state));
    w.listed(Source::Agent, true);
    assert_eq!(w.step(), ["markSessionDeleted:chat_1"]);
}

#[test]
fn ready_from_reads_of_changes_deletes_nothing_until_a_complete_listing_of_this_process() {
    let mut w = World::new();
    w.chat("chat_1", Some("ses_gone"), "A").both_listed();
    let read = |feed| {
        Event::FeedRead(FeedRead {
            feed,
            cursor: "7".into(),
            reached_end: true,
        })
    };
    // The previous process listed both sides and kept the cursors; this one starts here.
    w.ev(read(Feed::AgentSessions))
        .ev(read(Feed::BackendSessions));
    let process_seq = w.seq;
    w.ev(read(Feed::AgentSessions))
        .ev(read(Feed::BackendSessions));
    w.agent("ses_new", "B");
    assert!(listed_in_this_process(&w.views.sessions.state, process_seq));
    let ctx = |w: &World| Context {
        process_seq,
        now: w.now,
        started_at: w.started_at,
        ready: true,
    };
    let ids = |w: &World| -> Vec<String> {
        reconcile(&w.views, &ctx(w), &Policy::default())
            .into_iter()
            .map(|p| p.planned.command_id.0)
            .collect()
    };
    assert_eq!(
        ids(&w),
        ["createSession:ses_new"],
        "Ready: a new agent session is mirrored, but the old listing proves nothing gone"
    );
    w.listed(Source::Agent, true);
    assert_eq!(
        ids(&w),
        ["createSession:ses_new", "markSessionDeleted:chat_1"]
    );
}

#[test]
fn a_deletion_is_obsolete_once_its_agent_session_is_listed_again() {
    let mut w = World::new();
    w.chat("chat_1", Some("ses_1"), "A").both_listed();
    let delete = Command::MarkSessionDeleted {
        chat_session_id: "chat_1".into(),
    };
    assert_eq!(
        obsolete(&w.views, &delete),
        None,
        "absent: the deletion stands"
    );
    w.agent("ses_1", "A");
    assert_eq!(
        obsolete(&w.views, &delete).as_deref(),
        Some("agent session ses_1 is listed again")
    );
}
