//! Observations into events: what a listing says, compared with what the views already know.
//!
//! Pure functions. An observer hands over a listing and the log position at which it *started*
//! (`as_of_seq`); only what changed becomes an event. Full listings (the paced safety net) end
//! with a `listing_completed` marker; incremental reads (the sessions updated or changed since
//! a cursor) append a `feed_read` only when their cursor moved or they are the first of the
//! process to reach the end ([`feed_read`]), so polling an idle system appends nothing.
//! Absence is inferred only from a complete full listing, and only for rows the view held
//! before the listing started: a session created while a listing was in flight is not
//! "missing" from it; an incremental read never proves a session gone.
//!
//! Newer facts win: every field a listing can change is compared with the seq of the fact that
//! set it, and a listing that started before that fact (an event-stream rename, our own
//! `markSessionDeleted`, a deletion) keeps the view's value; a session gone after the listing
//! started is not brought back by it.
//!
//! Only our sessions are mirrored: a sub-agent child (`parent_id`) or a session another worker
//! tagged never enters the view.

use std::collections::HashSet;

use crate::events::*;
use crate::ports::{AgentListing, AgentObservation};
use crate::projections::{
    AgentSessionRow, ChatSessionRow, MessageState, MessagesView, SessionsView,
};

/// Whether a session is ours to mirror: not a sub-agent child, not tagged by another worker.
pub fn is_ours(info: &AgentSessionInfo, worker_id: &str) -> bool {
    info.parent_id.is_none() && info.tag.as_ref().is_none_or(|t| t.worker_id == worker_id)
}

/// When an observation was read: a listing that started at a log seq, or the event stream
/// (a report as new as anything in the log).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ReadAt {
    Listing(u64),
    Stream,
}

impl ReadAt {
    /// Whether a fact recorded at `seq` is newer than what was read.
    fn older_than(self, seq: u64) -> bool {
        matches!(self, ReadAt::Listing(as_of) if seq > as_of)
    }
}

/// The event of one agent session as seen now, if it is news to the view.
fn agent_session(view: &SessionsView, info: &AgentSessionInfo, read: ReadAt) -> Option<Event> {
    if let Some(&(gone, _)) = view.agent_gone.get(&info.agent_session_id) {
        // Gone after this was read, or reported by a stream that may deliver out of order
        // (ids are never reused): only a complete listing begun after it may say otherwise.
        if read == ReadAt::Stream || read.older_than(gone) {
            return None;
        }
    }
    match view.agent.get(&info.agent_session_id) {
        None => Some(Event::AgentSessionSeen(info.clone())),
        Some(row) => agent_row_news(row, info, read).map(Event::AgentSessionChanged),
    }
}

/// What of `info` is news to the agent session's `row`, if anything: the info to record.
fn agent_row_news(
    row: &AgentSessionRow,
    info: &AgentSessionInfo,
    read: ReadAt,
) -> Option<AgentSessionInfo> {
    let mut info = info.clone();
    if read.older_than(row.title_seq) {
        info.title.clone_from(&row.title);
    }
    let changed = row.title != info.title
        || (info.directory.is_some() && row.directory != info.directory)
        || (row.project.is_none() && info.project.is_some())
        || (row.model.is_none() && info.model.is_some())
        || info.updated_at > row.last_activity;
    changed.then_some(info)
}

/// Whether a full or incremental listing begun at `as_of_seq` tells the agent session's
/// `row` anything new: a settled pair away from memory whose row it does not is left away
/// (`log::rows`); one it does is brought back before the listing is compared.
pub fn is_news_to_agent_row(
    row: &AgentSessionRow,
    info: &AgentSessionInfo,
    as_of_seq: u64,
) -> bool {
    agent_row_news(row, info, ReadAt::Listing(as_of_seq)).is_some()
}

/// Whether a listing begun at `as_of_seq` tells the chat session's `row` anything new (see
/// [`is_news_to_agent_row`]).
pub fn is_news_to_chat_row(row: &ChatSessionRow, info: &ChatSessionInfo, as_of_seq: u64) -> bool {
    chat_row_news(row, info, ReadAt::Listing(as_of_seq)).is_some()
}

/// What of `info` is news to the chat session's `row`, if anything: the info to record.
fn chat_row_news(
    row: &ChatSessionRow,
    info: &ChatSessionInfo,
    read: ReadAt,
) -> Option<ChatSessionInfo> {
    let mut info = info.clone();
    if read.older_than(row.title_seq) {
        info.title.clone_from(&row.title);
    }
    if read.older_than(row.status_seq) {
        info.status = row.status;
    }
    let changed = row.title != info.title
        || row.status != info.status
        || (info.agent_session_id.is_some()
            && (row.agent_session_id != info.agent_session_id || !row.link_confirmed))
        || (row.project.is_none() && info.project.is_some())
        || (row.model.is_none() && info.model.is_some())
        || info.last_activity > row.last_activity;
    changed.then_some(info)
}

/// The events of one report of the agent server's event stream. Deletions reported by the
/// server itself are facts (`GoneReason::Deleted`); a reconnect yields nothing here (the
/// observer answers it with a full listing, which closes any gap).
pub fn agent_observation(
    view: &SessionsView,
    obs: &AgentObservation,
    worker_id: &str,
) -> Vec<Event> {
    match obs {
        AgentObservation::Connected { .. } => Vec::new(),
        AgentObservation::SessionUpdated(info) if is_ours(info, worker_id) => {
            agent_session(view, info, ReadAt::Stream)
                .into_iter()
                .collect()
        }
        AgentObservation::SessionUpdated(_) => Vec::new(),
        AgentObservation::SessionDeleted(id) => {
            if view.agent.contains_key(id) {
                vec![Event::AgentSessionGone(AgentSessionGone {
                    agent_session_id: id.clone(),
                    reason: GoneReason::Deleted,
                })]
            } else {
                Vec::new()
            }
        }
        AgentObservation::Status(s) => match view.agent.get(&s.agent_session_id) {
            Some(row) if row.status != s.status => vec![Event::AgentSessionStatus(s.clone())],
            _ => Vec::new(),
        },
        AgentObservation::MessageUpdated {
            agent_session_id,
            at,
            ..
        } => match view.agent.get(agent_session_id) {
            // Activity: the session's last activity moves, so it is not taken for stale.
            Some(row) if *at > row.last_activity => {
                vec![Event::AgentSessionChanged(AgentSessionInfo {
                    agent_session_id: agent_session_id.clone(),
                    title: row.title.clone(),
                    directory: row.directory.clone(),
                    project: row.project.clone(),
                    model: row.model.clone(),
                    updated_at: *at,
                    parent_id: None,
                    tag: None,
                })]
            }
            _ => Vec::new(),
        },
    }
}

/// The events of one agent-server listing.
pub fn agent_listing(
    view: &SessionsView,
    listing: &AgentListing,
    as_of_seq: u64,
    worker_id: &str,
) -> Vec<Event> {
    let ours = || listing.sessions.iter().filter(|s| is_ours(s, worker_id));
    let read = ReadAt::Listing(as_of_seq);
    let mut events: Vec<Event> = ours()
        .filter_map(|info| agent_session(view, info, read))
        .collect();
    if listing.complete {
        let listed: HashSet<&AgentSessionId> = ours().map(|s| &s.agent_session_id).collect();
        for (id, row) in &view.agent {
            if row.first_seq <= as_of_seq && !listed.contains(id) {
                events.push(Event::AgentSessionGone(AgentSessionGone {
                    agent_session_id: id.clone(),
                    reason: GoneReason::MissingFromListing,
                }));
            }
        }
    }
    events.push(Event::ListingCompleted(ListingCompleted {
        source: Source::Agent,
        sessions: ours().count() as u64,
        complete: listing.complete,
        as_of: Some(as_of_seq),
    }));
    events
}

/// The events of an incremental agent listing (`GET /session?start=T`: the sessions updated
/// since a time): what changed, never an absence (a session deleted is simply not listed) and
/// no `listing_completed` marker (its cursor is a `feed_read`, see [`feed_read`]).
pub fn agent_changes(
    view: &SessionsView,
    listing: &AgentListing,
    as_of_seq: u64,
    worker_id: &str,
) -> Vec<Event> {
    let read = ReadAt::Listing(as_of_seq);
    listing
        .sessions
        .iter()
        .filter(|s| is_ours(s, worker_id))
        .filter_map(|info| agent_session(view, info, read))
        .collect()
}

/// The highest `updated_at` of a listing: the agent feed's cursor after it.
pub fn agent_high_water(listing: &AgentListing) -> Option<crate::clock::Millis> {
    listing.sessions.iter().map(|s| s.updated_at).max()
}

/// The `feed_read` to append after a read of `feed` that ended at `cursor` (`reached_end`:
/// without a failure, to the end), if any: when the cursor moved, or when this is the first
/// read of this process (`process_seq`: the log's last seq when it opened) to reach the end,
/// which readiness needs. Otherwise nothing: an idle poll appends no event.
pub fn feed_read(
    view: &SessionsView,
    feed: Feed,
    cursor: &str,
    reached_end: bool,
    process_seq: u64,
) -> Option<Event> {
    let state = view.feeds.get(&feed);
    let moved = state.is_none_or(|f| f.cursor != cursor);
    let caught_up = state
        .and_then(|f| f.caught_up_seq)
        .is_some_and(|seq| seq > process_seq);
    (moved || (reached_end && !caught_up)).then(|| {
        Event::FeedRead(FeedRead {
            feed,
            cursor: cursor.to_owned(),
            reached_end,
        })
    })
}

/// The events of one backend session listing (all its pages; `complete` when every page came).
pub fn backend_sessions(
    view: &SessionsView,
    sessions: &[ChatSessionInfo],
    complete: bool,
    as_of: u64,
) -> Vec<Event> {
    let mut events = backend_session_changes(view, sessions, as_of);
    if complete {
        let listed: HashSet<&ChatSessionId> = sessions.iter().map(|s| &s.chat_session_id).collect();
        for (id, row) in &view.chat {
            if row.first_seq <= as_of && !listed.contains(id) {
                events.push(Event::BackendSessionGone(BackendSessionGone {
                    chat_session_id: id.clone(),
                }));
            }
        }
    }
    events.push(Event::ListingCompleted(ListingCompleted {
        source: Source::Backend,
        sessions: sessions.len() as u64,
        complete,
        as_of: Some(as_of),
    }));
    events
}

/// Whether a full listing whose only event is its `listing_completed` marker may be left
/// out of the log, so that an idle worker appends nothing (and so writes no checkpoint) when
/// its periodic safety-net listings find nothing new. Only when the marker would change no
/// decision: the listing is complete; the source's last *recorded* complete listing is of this
/// process (readiness holds without it), is not followed by a failure or a partial listing
/// (which a new complete one would clear), and is at or after `last_change_seq`, the last event
/// other than a listing marker or a checkpoint record (so every link, session and absence the
/// view holds predates it, as a deletion's `linked_seq < complete_seq` needs); and no deletion
/// hold stands (its confirmation or lifting waits for a later listing). Otherwise the marker
/// is kept, as before.
pub fn idle_listing(
    view: &SessionsView,
    source: Source,
    events: &[Event],
    last_change_seq: u64,
    process_seq: u64,
) -> bool {
    let [Event::ListingCompleted(l)] = events else {
        return false;
    };
    let Some(state) = view.listings.get(&source) else {
        return false;
    };
    l.complete
        && l.source == source
        && view.deletion_hold.is_none()
        && !state.in_trouble()
        && state
            .last_complete_seq
            .is_some_and(|seq| seq > process_seq && seq >= last_change_seq)
}

/// The events of backend chat sessions read from a change cursor (`listSessions` from a
/// cursor): what changed, never an absence, no `listing_completed` marker.
pub fn backend_session_changes(
    view: &SessionsView,
    sessions: &[ChatSessionInfo],
    as_of: u64,
) -> Vec<Event> {
    let mut events = Vec::new();
    let read = ReadAt::Listing(as_of);
    for info in sessions {
        if let Some(&(gone, _)) = view.chat_gone.get(&info.chat_session_id) {
            if read.older_than(gone) {
                continue;
            }
        }
        match view.chat.get(&info.chat_session_id) {
            None if left_the_view(view, info) => {}
            None => events.push(Event::BackendSessionSeen(info.clone())),
            Some(row) => {
                events.extend(chat_row_news(row, info, read).map(Event::BackendSessionChanged));
            }
        }
    }
    events
}

/// Whether an unknown chat session the backend lists is one that retention dropped: final,
/// last active before the last sweep's horizon, and linked to no agent session in view. Such a
/// row is final on the backend and nothing links to it, so mirroring it again would plan
/// nothing and only bring history back into the view at every full listing.
fn left_the_view(view: &SessionsView, info: &ChatSessionInfo) -> bool {
    info.status != ChatStatus::Active
        && info.last_activity < view.swept_before
        && info
            .agent_session_id
            .as_ref()
            .is_none_or(|a| !view.agent.contains_key(a))
}

/// The events of backend messages that changed: new user messages, failures, and assistant
/// replies the view does not reflect yet.
pub fn backend_messages(view: &MessagesView, messages: &[MessageInfo]) -> Vec<Event> {
    // Retention dropped only messages written before `swept_before`, and every message
    // written since the horizon was read before its sweep: an unknown one written before it
    // is one that left the view, final and delivered, never news (a full relisting of the
    // messages would otherwise prompt it again).
    let left = |m: &MessageInfo| m.timestamp < view.swept_before;
    let news = |m: &MessageInfo| -> bool {
        match m.role {
            Role::User => match view.messages.get(&m.message_id) {
                None => !left(m),
                Some(row) => m.error.is_some() && !(row.delivered && row.reason.is_some()),
            },
            Role::Assistant => {
                let Some(user) = &m.reply_to else {
                    return false;
                };
                match view.messages.get(user) {
                    None => m.completed && !left(m),
                    Some(row) if m.completed && m.error.is_none() => {
                        !(row.state == MessageState::Answered && row.delivered)
                    }
                    Some(row) => {
                        !m.completed
                            && row.state.is_pending()
                            && row.incomplete_reply.as_ref() != Some(&m.message_id)
                    }
                }
            }
        }
    };
    messages
        .iter()
        .filter(|m| news(m))
        .map(|m| Event::BackendMessageSeen(m.clone()))
        .collect()
}

/// The events of a status reply (`GET /session/status`, which lists the sessions that are not
/// idle) read when the log was at `as_of`: statuses that differ from the view, and sessions the
/// view holds as busy that the reply no longer lists (idle again). A status set by an event
/// newer than the reply stands.
pub fn agent_statuses(
    view: &SessionsView,
    statuses: Vec<AgentSessionStatus>,
    as_of: u64,
) -> Vec<Event> {
    let read = ReadAt::Listing(as_of);
    let mut events = Vec::new();
    let mut reported = HashSet::new();
    for s in statuses {
        reported.insert(s.agent_session_id.clone());
        if view
            .agent
            .get(&s.agent_session_id)
            .is_some_and(|row| row.status != s.status && !read.older_than(row.status_seq))
        {
            events.push(Event::AgentSessionStatus(s));
        }
    }
    for (id, row) in &view.agent {
        if row.status != AgentStatus::Idle
            && !reported.contains(id)
            && !read.older_than(row.status_seq)
        {
            events.push(Event::AgentSessionStatus(AgentSessionStatus {
                agent_session_id: id.clone(),
                status: AgentStatus::Idle,
            }));
        }
    }
    events
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::projections::{Projection, SessionsView};

    fn info(id: &str, title: &str) -> AgentSessionInfo {
        AgentSessionInfo {
            agent_session_id: id.into(),
            title: title.into(),
            directory: None,
            project: None,
            model: None,
            updated_at: 1,
            parent_id: None,
            tag: None,
        }
    }

    fn fold(view: &mut SessionsView, events: Vec<Event>, first_seq: u64) {
        fold_at(view, events, first_seq, 1)
    }

    fn fold_at(view: &mut SessionsView, events: Vec<Event>, first_seq: u64, at: u64) {
        for (i, event) in events.into_iter().enumerate() {
            view.apply(&Envelope {
                seq: first_seq + i as u64,
                id: uuid::Uuid::nil(),
                at,
                v: 1,
                event,
                cause: None,
            });
        }
    }

    #[test]
    fn a_full_listing_that_finds_nothing_new_is_left_out_only_when_its_marker_decides_nothing() {
        let mut view = SessionsView::default();
        let listing = AgentListing {
            sessions: vec![info("a", "A")],
            complete: true,
        };
        // Process opened at seq 0; the first listing (seq 1, 2) is recorded.
        let first = agent_listing(&view, &listing, 0, "w");
        assert!(
            !idle_listing(&view, Source::Agent, &first, 0, 0),
            "none yet"
        );
        fold(&mut view, first, 1);
        let again = agent_listing(&view, &listing, 2, "w");
        assert_eq!(again.len(), 1, "only the marker");
        assert!(idle_listing(&view, Source::Agent, &again, 2, 0));
        // A change after the recorded listing (a link, a session seen...): recorded again.
        assert!(!idle_listing(&view, Source::Agent, &again, 3, 0));
        // The recorded listing is of an earlier process: recorded, for readiness.
        assert!(!idle_listing(&view, Source::Agent, &again, 2, 2));
        // Not complete: it is recorded as partial.
        let partial = AgentListing {
            complete: false,
            ..listing.clone()
        };
        let cut = agent_listing(&view, &partial, 2, "w");
        assert!(!idle_listing(&view, Source::Agent, &cut, 2, 0));
        // A failure since the recorded listing: the new complete one clears it, so recorded.
        let mut troubled = view.clone();
        let failed = Event::ObservationFailed(ObservationFailed {
            source: Source::Agent,
            operation: "list_sessions".into(),
            error: "down".into(),
        });
        fold(&mut troubled, vec![failed], 3);
        assert!(!idle_listing(&troubled, Source::Agent, &again, 2, 0));
        // A deletion hold waits for a later listing: recorded.
        let mut held = view.clone();
        let hold = Event::DeletionsHeld(DeletionsHeld {
            listing_seq: 2,
            candidates: 30,
            limit: 20,
        });
        fold(&mut held, vec![hold], 3);
        assert!(held.deletion_hold.is_some());
        assert!(!idle_listing(&held, Source::Agent, &again, 2, 0));
        // A listing with a change in it is never left out.
        let renamed = AgentListing {
            sessions: vec![info("a", "A2")],
            complete: true,
        };
        let changed = agent_listing(&view, &renamed, 2, "w");
        assert!(!idle_listing(&view, Source::Agent, &changed, 2, 0));
    }

    #[test]
    fn only_changes_become_events_and_only_complete_listings_prove_absence() {
        let mut view = SessionsView::default();
        let first = AgentListing {
            sessions: vec![info("a", "A"), info("b", "B")],
            complete: true,
        };
        let events = agent_listing(&view, &first, 0, "w");
        assert_eq!(events.len(), 3, "two seen + listing_completed");
        fold(&mut view, events, 1);
        // The same listing again: nothing but the marker.
        assert_eq!(agent_listing(&view, &first, 3, "w").len(), 1);
        // A partial listing without `b` proves nothing.
        let partial = AgentListing {
            sessions: vec![info("a", "A2")],
            complete: false,
        };
        let events = agent_listing(&view, &partial, 3, "w");
        assert!(matches!(events[0], Event::AgentSessionChanged(_)));
        assert!(!events
            .iter()
            .any(|e| matches!(e, Event::AgentSessionGone(_))));
        // A complete one does, but not for a row newer than the listing's start.
        let complete = AgentListing {
            sessions: vec![info("a", "A")],
            complete: true,
        };
        let gone = |as_of| {
            agent_listing(&view, &complete, as_of, "w")
                .into_iter()
                .filter(|e| matches!(e, Event::AgentSessionGone(_)))
                .count()
        };
        assert_eq!(gone(3), 1);
        assert_eq!(
            gone(1),
            0,
            "b first appeared at seq 2, after a listing from seq 1"
        );
    }

    #[test]
    fn an_incremental_read_never_proves_absence_and_a_full_listing_still_does() {
        let mut view = SessionsView::default();
        let both = AgentListing {
            sessions: vec![info("a", "A"), info("b", "B")],
            complete: true,
        };
        let events = agent_listing(&view, &both, 0, "w");
        fold(&mut view, events, 1);
        let only_a = AgentListing {
            sessions: vec![info("a", "A2")],
            complete: true,
        };
        let changes = agent_changes(&view, &only_a, 3, "w");
        assert_eq!(
            changes.len(),
            1,
            "the rename, no absence, no marker: {changes:?}"
        );
        assert!(matches!(changes[0], Event::AgentSessionChanged(_)));
        let full = agent_listing(&view, &only_a, 3, "w");
        assert!(full.iter().any(|e| matches!(e, Event::AgentSessionGone(_))));
        // The backend likewise.
        let chat = |id: &str| ChatSessionInfo {
            chat_session_id: id.into(),
            agent_session_id: None,
            title: "T".into(),
            model: None,
            status: ChatStatus::Active,
            last_activity: 1,
            project: None,
        };
        let listed = backend_sessions(&view, &[chat("c"), chat("d")], true, 4);
        fold(&mut view, listed, 5);
        assert!(backend_session_changes(&view, &[chat("c")], 9).is_empty());
        let full = backend_sessions(&view, &[chat("c")], true, 9);
        assert!(full
            .iter()
            .any(|e| matches!(e, Event::BackendSessionGone(_))));
    }

    #[test]
    fn a_feed_read_is_appended_only_when_its_cursor_moves_or_first_reaches_the_end_in_a_process() {
        let mut view = SessionsView::default();
        let feed = Feed::BackendMessages;
        let first = feed_read(&view, feed, "7", true, 0).expect("a new cursor");
        fold(&mut view, vec![first], 1);
        assert_eq!(feed_read(&view, feed, "7", true, 0), None, "idle: nothing");
        assert!(feed_read(&view, feed, "8", false, 0).is_some(), "moved");
        // A new process (the log was at seq 5 when it opened) has not caught up yet.
        let again = feed_read(&view, feed, "7", true, 5).expect("caught up in this process");
        fold(&mut view, vec![again], 6);
        assert_eq!(feed_read(&view, feed, "7", true, 5), None);
        assert_eq!(
            feed_read(&view, feed, "7", false, 9),
            None,
            "a failed read proves nothing"
        );
    }

    fn seqs_after(view: &SessionsView) -> u64 {
        view.agent
            .values()
            .map(|r| r.title_seq.max(r.status_seq))
            .chain(view.chat.values().map(|c| c.title_seq.max(c.status_seq)))
            .max()
            .unwrap_or(0)
    }

    #[test]
    fn a_listing_read_before_a_newer_fact_does_not_undo_it() {
        let mut view = SessionsView::default();
        fold(
            &mut view,
            vec![Event::AgentSessionSeen(info("a", "Old"))],
            1,
        );
        // The stream reports a rename at seq 5, after a listing began at seq 3.
        let renamed = AgentObservation::SessionUpdated(Box::new(info("a", "New")));
        let events = agent_observation(&view, &renamed, "w");
        fold(&mut view, events, 5);
        assert_eq!(view.agent[&AgentSessionId::from("a")].title, "New");
        let stale = AgentListing {
            sessions: vec![info("a", "Old")],
            complete: true,
        };
        let events = agent_listing(&view, &stale, 3, "w");
        assert!(
            !events
                .iter()
                .any(|e| matches!(e, Event::AgentSessionChanged(_))),
            "{events:?}"
        );
        // A listing that began after the rename is believed.
        let fresh = agent_listing(&view, &stale, 6, "w");
        assert!(matches!(fresh[0], Event::AgentSessionChanged(ref i) if i.title == "Old"));
        // A status reply read before the stream's busy report does not idle it.
        let busy = AgentObservation::Status(AgentSessionStatus {
            agent_session_id: "a".into(),
            status: AgentStatus::Busy,
        });
        let events = agent_observation(&view, &busy, "w");
        fold(&mut view, events, 8);
        assert!(agent_statuses(&view, vec![], 7).is_empty());
        assert_eq!(
            agent_statuses(&view, vec![], 8).len(),
            1,
            "a newer reply idles it"
        );
        assert_eq!(seqs_after(&view), 8);
    }

    #[test]
    fn a_session_gone_after_a_listing_began_is_not_brought_back_by_it() {
        let mut view = SessionsView::default();
        fold(&mut view, vec![Event::AgentSessionSeen(info("a", "A"))], 1);
        let deleted = AgentObservation::SessionDeleted("a".into());
        let events = agent_observation(&view, &deleted, "w");
        fold(&mut view, events, 4);
        let stale = AgentListing {
            sessions: vec![info("a", "A")],
            complete: true,
        };
        let events = agent_listing(&view, &stale, 2, "w");
        assert!(!events
            .iter()
            .any(|e| matches!(e, Event::AgentSessionSeen(_))));
        // Nor by a stream report that arrives out of order.
        let late = AgentObservation::SessionUpdated(Box::new(info("a", "A")));
        assert!(agent_observation(&view, &late, "w").is_empty());
        // A complete listing begun after the deletion that lacks it clears the tombstone, once
        // it is old enough that no late report is still on its way.
        let empty = AgentListing {
            sessions: vec![],
            complete: true,
        };
        let events = agent_listing(&view, &empty, 5, "w");
        fold(&mut view, events, 6);
        assert_eq!(view.agent_gone.len(), 1, "too recent to forget");
        let late = AgentObservation::SessionUpdated(Box::new(info("a", "A")));
        assert!(agent_observation(&view, &late, "w").is_empty());
        let events = agent_listing(&view, &empty, 7, "w");
        fold_at(&mut view, events, 8, 1 + crate::projections::TOMBSTONE_MS);
        assert!(view.agent_gone.is_empty());
    }

    #[test]
    fn our_own_deletion_wins_over_a_backend_listing_read_before_it() {
        let mut view = SessionsView::default();
        let chat = ChatSessionInfo {
            chat_session_id: "c".into(),
            agent_session_id: Some("a".into()),
            title: "T".into(),
            model: None,
            status: ChatStatus::Active,
            last_activity: 1,
            project: None,
        };
        fold(&mut view, vec![Event::BackendSessionSeen(chat.clone())], 1);
        let deleted = Event::CommandSucceeded(CommandSucceeded {
            command_id: "markSessionDeleted:c".into(),
            op: Op::MarkSessionDeleted,
            subject: Subject::default(),
            attempt: 1,
            effect: Effect::SessionDeleted {
                chat_session_id: "c".into(),
            },
        });
        fold(&mut view, vec![deleted], 5);
        let stale = backend_sessions(&view, std::slice::from_ref(&chat), true, 3);
        assert_eq!(stale.len(), 1, "only the marker: {stale:?}");
        let fresh = backend_sessions(&view, &[chat], true, 5);
        assert!(
            matches!(fresh[0], Event::BackendSessionChanged(ref c) if c.status == ChatStatus::Active)
        );
    }

    #[test]
    fn children_and_other_workers_sessions_are_not_mirrored() {
        let view = SessionsView::default();
        let mut child = info("child", "C");
        child.parent_id = Some("a".into());
        let mut theirs = info("theirs", "T");
        theirs.tag = Some(SessionTag {
            worker_id: "other".into(),
            command_id: "createAgentSession:x".into(),
            chat_session_id: "x".into(),
        });
        let mut ours = info("ours", "O");
        ours.tag = Some(SessionTag {
            worker_id: "w".into(),
            command_id: "createAgentSession:y".into(),
            chat_session_id: "y".into(),
        });
        let listing = AgentListing {
            sessions: vec![child.clone(), theirs, ours],
            complete: true,
        };
        let events = agent_listing(&view, &listing, 0, "w");
        let seen: Vec<&str> = events
            .iter()
            .filter_map(|e| match e {
                Event::AgentSessionSeen(i) => Some(i.agent_session_id.as_str()),
                _ => None,
            })
            .collect();
        assert_eq!(seen, ["ours"]);
        let created = AgentObservation::SessionUpdated(Box::new(child));
        assert!(agent_observation(&view, &created, "w").is_empty());
    }
}
