//! Retention: final rows leave the views after the horizon, and nothing they held back is
//! planned again, whatever the sides show afterwards.

use super::*;
use crate::observe;
use crate::reconcile::retention::{sweep, RetentionPolicy};

const DAY: Millis = 24 * 60 * MIN;

impl World {
    /// Sweeps at `now` (the message feed read just now) and appends what it drops. Returns it.
    fn sweep(&mut self) -> Option<RetentionSwept> {
        let swept = sweep(
            &self.views,
            self.now,
            self.now,
            &RetentionPolicy::default(),
            &super::super::retention::NothingAway,
        );
        if let Some(s) = &swept {
            self.ev(Event::RetentionSwept(s.clone()));
        }
        swept
    }

    /// Appends what observing `messages` yields (as the worker does).
    fn observe_messages(&mut self, messages: &[MessageInfo]) {
        for e in observe::backend_messages(&self.views.messages.state, messages) {
            self.ev(e);
        }
    }

    fn observe_chats(&mut self, chats: &[ChatSessionInfo]) {
        let as_of = self.seq;
        for e in observe::backend_sessions(&self.views.sessions.state, chats, true, as_of) {
            self.ev(e);
        }
    }

    /// Every id planned so far, in the log.
    fn planned_ids(&self) -> Vec<String> {
        self.log
            .iter()
            .filter_map(|e| match &e.event {
                Event::CommandPlanned(p) => Some(p.command_id.0.clone()),
                _ => None,
            })
            .collect()
    }
}

/// What the backend lists for `msg_1` once answered: the user message and its reply.
fn answered_listing(w: &World) -> Vec<MessageInfo> {
    let _ = w;
    vec![
        MessageInfo {
            chat_session_id: "chat_1".into(),
            message_id: "msg_1".into(),
            role: Role::User,
            content: "question msg_1".into(),
            completed: true,
            timestamp: T0,
            reply_to: None,
            error: None,
        },
        MessageInfo {
            chat_session_id: "chat_1".into(),
            message_id: "reply_1".into(),
            role: Role::Assistant,
            content: "42".into(),
            completed: true,
            timestamp: T0 + 1_000,
            reply_to: Some("msg_1".into()),
            error: None,
        },
    ]
}

fn delivered(w: &mut World) {
    w.answered();
    w.succeed(
        "completeMessage:msg_1",
        Effect::MessageCompleted {
            chat_session_id: "chat_1".into(),
            message_id: "msg_1".into(),
        },
    );
}

#[test]
fn a_delivered_message_and_its_commands_leave_the_views_after_the_horizon() {
    let mut w = World::new();
    delivered(&mut w);
    w.now += DAY;
    assert_eq!(w.sweep(), None, "within the horizon nothing leaves");
    w.now += 7 * DAY;
    let swept = w.sweep().expect("past the horizon");
    assert_eq!(swept.messages, [MessageId::from("msg_1")]);
    let mut ids: Vec<_> = swept.commands.iter().map(|c| c.0.as_str()).collect();
    ids.sort();
    assert_eq!(ids, ["completeMessage:msg_1", "prompt:msg_1"]);
    assert!(w.views.messages.state.messages.is_empty());
    assert!(w.views.commands.state.commands.is_empty());
    assert!(w.step().is_empty(), "nothing to plan once they left");
}

#[test]
fn a_message_that_left_is_not_news_when_the_backend_lists_it_again() {
    let mut w = World::new();
    delivered(&mut w);
    w.now += 8 * DAY;
    w.sweep().expect("past the horizon");
    // A full relisting of the messages, one page at a time: the user message alone first.
    let listing = answered_listing(&w);
    w.observe_messages(&listing[..1]);
    assert!(w.views.messages.state.messages.is_empty(), "not news");
    assert!(w.step().is_empty(), "never prompted again");
    w.observe_messages(&listing[1..]);
    assert!(w.step().is_empty());
    let planned = w.planned_ids();
    let mut unique = planned.clone();
    unique.sort();
    unique.dedup();
    assert_eq!(
        planned.len(),
        unique.len(),
        "no id planned twice: {planned:?}"
    );
}

#[test]
fn an_undelivered_outcome_keeps_its_message_and_every_delivery_round() {
    let mut w = World::new();
    w.answered();
    w.dead("completeMessage:msg_1", "backend down");
    w.now += 8 * DAY;
    let policy = Policy::default();
    let mut rounds = 1;
    // Every later round dies too, until the rounds run out.
    loop {
        let planned = w.step();
        let Some(id) = planned.first().cloned() else {
            w.now += policy.delivery_retry_cap_ms;
            if w.step().is_empty() {
                break;
            }
            continue;
        };
        w.dead(&id, "backend down");
        rounds += 1;
        w.now += policy.delivery_retry_cap_ms;
    }
    assert_eq!(rounds, policy.max_delivery_rounds);
    w.now += 8 * DAY;
    let swept = w.sweep();
    let swept_ids: Vec<_> = swept.iter().flat_map(|s| s.commands.clone()).collect();
    assert_eq!(
        swept_ids,
        [CommandId::from("prompt:msg_1")],
        "only the prompt goes"
    );
    assert!(w
        .views
        .messages
        .state
        .undelivered
        .contains_key(&MessageId::from("msg_1")));
    assert!(w.step().is_empty(), "no round is planned again");
}

#[test]
fn a_deleted_chat_leaves_only_once_its_agent_session_is_gone_and_is_not_mirrored_again() {
    let mut w = World::new();
    w.linked();
    // The person deleted the chat session; its agent session still exists.
    let deleted = ChatSessionInfo {
        chat_session_id: "chat_1".into(),
        agent_session_id: Some("ses_1".into()),
        title: "A".into(),
        model: None,
        status: ChatStatus::Deleted,
        last_activity: T0,
        project: None,
    };
    w.ev(Event::BackendSessionChanged(deleted.clone()));
    assert!(w.step().is_empty());
    w.now += 8 * DAY;
    assert_eq!(w.sweep(), None, "kept while its agent session exists");
    assert!(w.step().is_empty(), "so no chat session is created for it");
    w.ev(Event::AgentSessionGone(AgentSessionGone {
        agent_session_id: "ses_1".into(),
        reason: GoneReason::Deleted,
    }));
    w.now += 8 * DAY;
    let swept = w.sweep().expect("gone and past the horizon");
    assert!(swept.chats.is_empty(), "the tombstone goes first");
    assert!(w.views.sessions.state.agent_gone.is_empty());
    let swept = w.sweep().expect("then the chat session");
    assert_eq!(swept.chats, [ChatSessionId::from("chat_1")]);
    // Every full listing of the backend still shows it: it stays out of the views.
    w.observe_chats(std::slice::from_ref(&deleted));
    assert!(w.views.sessions.state.chat.is_empty());
    assert!(w.step().is_empty());
}

#[test]
fn a_creation_that_gave_up_leaves_the_ledger_and_its_row_keeps_it_from_being_retried() {
    let mut w = World::new();
    w.agent("ses_1", "A").both_listed();
    assert_eq!(w.step(), ["createSession:ses_1"]);
    w.fail("createSession:ses_1", ErrorClass::Terminal, "HTTP 400");
    w.now += 30 * DAY;
    let swept = w.sweep().expect("final and past the horizon");
    assert_eq!(swept.commands, [CommandId::from("createSession:ses_1")]);
    assert!(w.views.sessions.state.agent[&AgentSessionId::from("ses_1")].mirror_planned);
    assert!(w.step().is_empty(), "never planned twice");
}

#[test]
fn a_creation_entry_stays_while_its_live_agent_session_row_lacks_the_mark() {
    let mut w = World::new();
    w.agent("ses_1", "A").both_listed();
    assert_eq!(w.step(), ["createSession:ses_1"]);
    w.fail("createSession:ses_1", ErrorClass::Terminal, "HTTP 400");
    // A row without the mark (as no history of ours makes one): only the entry stops a
    // second creation, so it stays.
    let row = w
        .views
        .sessions
        .state
        .agent
        .get_mut(&AgentSessionId::from("ses_1"));
    row.expect("in view").mirror_planned = false;
    w.now += 30 * DAY;
    assert_eq!(w.sweep(), None);
}

#[test]
fn a_sweep_drops_only_rows_that_are_final_when_it_is_applied() {
    let mut w = World::new();
    w.linked();
    w.user_message("chat_1", "msg_1", T0);
    assert_eq!(w.step(), ["prompt:msg_1"]);
    // A sweep naming live rows (as a corrupt or hand-made log might) drops none of them.
    w.ev(Event::RetentionSwept(RetentionSwept {
        horizon_ms: DAY,
        before: T0 + DAY,
        commands: vec!["prompt:msg_1".into()],
        messages: vec!["msg_1".into()],
        chats: vec!["chat_1".into()],
    }));
    assert!(w
        .views
        .commands
        .state
        .commands
        .contains_key(&CommandId::from("prompt:msg_1")));
    assert!(w
        .views
        .messages
        .state
        .messages
        .contains_key(&MessageId::from("msg_1")));
    assert!(w
        .views
        .sessions
        .state
        .chat
        .contains_key(&ChatSessionId::from("chat_1")));
}

#[test]
fn replaying_a_log_with_sweeps_gives_the_same_views() {
    let mut w = World::new();
    delivered(&mut w);
    w.now += 8 * DAY;
    w.sweep().expect("past the horizon");
    let mut replayed = Views::default();
    for e in &w.log {
        replayed.apply(e);
    }
    assert_eq!(replayed, w.views);
}

#[test]
fn a_long_history_leaves_in_sweeps_of_bounded_size() {
    use crate::reconcile::retention::MAX_ROWS_PER_SWEEP;
    let mut w = World::new();
    w.linked();
    let n = MAX_ROWS_PER_SWEEP + 5;
    for i in 0..n {
        // Each message failed by the backend itself: final and delivered, one row each.
        w.ev(Event::BackendMessageSeen(MessageInfo {
            chat_session_id: "chat_1".into(),
            message_id: format!("msg_{i}").into(),
            role: Role::User,
            content: "q".into(),
            completed: true,
            timestamp: T0,
            reply_to: None,
            error: Some("refused".into()),
        }));
    }
    w.now += 8 * DAY;
    let first = w.sweep().expect("past the horizon");
    assert_eq!(first.messages.len(), MAX_ROWS_PER_SWEEP);
    let second = w.sweep().expect("the rest");
    assert_eq!(second.messages.len(), 5);
    assert!(w.views.messages.state.messages.is_empty());
}

#[test]
fn a_mirrored_title_stays_planned_so_a_later_rename_by_a_person_stands() {
    let mut w = World::new();
    w.linked();
    w.agent("ses_1", "B");
    let ids = w.step();
    assert_eq!(ids.len(), 1);
    w.succeed(
        &ids[0],
        Effect::SessionRenamed {
            chat_session_id: "chat_1".into(),
            title: "B".into(),
        },
    );
    w.now += 8 * DAY;
    w.sweep();
    // A person renames the chat session in the app; the agent's title has not changed.
    w.chat("chat_1", Some("ses_1"), "mine");
    assert!(w.step().is_empty(), "the person's title stands");
}

#[test]
fn a_chat_session_the_backend_lost_is_not_created_again_after_the_horizon() {
    let mut w = World::new();
    w.agent("ses_1", "A").both_listed();
    assert_eq!(w.step(), ["createSession:ses_1"]);
    w.succeed(
        "createSession:ses_1",
        Effect::ChatSessionCreated {
            chat_session_id: "chat_1".into(),
            agent_session_id: "ses_1".into(),
            title: "A".into(),
            model: None,
        },
    );
    w.now += 8 * DAY;
    let swept = w
        .sweep()
        .expect("the creation is final and past the horizon");
    assert_eq!(swept.commands, [CommandId::from("createSession:ses_1")]);
    // Deleted from the backend for good: a complete listing lacks it.
    w.ev(Event::BackendSessionGone(BackendSessionGone {
        chat_session_id: "chat_1".into(),
    }));
    w.now += 8 * DAY;
    w.sweep();
    assert!(
        w.step().is_empty(),
        "the agent session's row still remembers the creation"
    );
    assert_eq!(w.planned_ids(), ["createSession:ses_1"]);
}
