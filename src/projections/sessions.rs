//! `sessions`: the active-session view — both sides of every session and the links between them.
//!
//! A deleted or failed chat session stays until a `retention_swept` names it (only once its
//! agent session is gone: see `reconcile::retention`); tombstones go at the same sweeps.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::index::SessionIndex;
use super::margin::AgentMargin;
use super::Projection;
use crate::clock::Millis;
use crate::events::{
    AgentSessionId, AgentSessionInfo, AgentStatus, ChatSessionId, ChatSessionInfo, ChatStatus,
    Command, Effect, Envelope, Event, Feed, Key, ModelRef, Source,
};

/// The agent server's sessions, the backend's chat sessions, how they link, and how fresh each
/// source's knowledge is.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct SessionsView {
    /// Agent sessions that exist (as last observed), by id.
    pub agent: BTreeMap<AgentSessionId, AgentSessionRow>,
    /// Chat sessions known to the backend (any status), by id.
    pub chat: BTreeMap<ChatSessionId, ChatSessionRow>,
    /// Per source: its last complete listing and last failure. A deletion is only ever derived
    /// from a complete listing newer than the link it breaks.
    pub listings: BTreeMap<Source, ListingState>,
    /// Deletions held because a listing called for more than one listing may cause, until a
    /// later listing confirms them or the hold is lifted (`reconcile::deletion_hold`). Absent
    /// from checkpoints written before `deletions_held` existed, whose logs hold none: no
    /// version bump, no rebuild.
    #[serde(default)]
    pub deletion_hold: Option<DeletionHold>,
    /// The agent server's model list, as last fetched.
    pub models: Option<ModelCache>,
    /// The running agent server's generation (bumped on every restart): a model list of an
    /// older generation is stale.
    pub agent_generation: u64,
    /// The last model-list fetch started: (generation, when). Within the TTL it is the
    /// window's one fetch, whatever became of it, across restarts of the worker too.
    pub models_requested: Option<(u64, Millis)>,
    /// Agent sessions gone, with the seq and time that said so: a listing that started before
    /// the deletion, or a stream report (which may come late or twice), cannot bring one back.
    /// Kept until a complete listing that started after it, and at least [`TOMBSTONE_MS`]
    /// later, confirms it: so they are few, the deletions of the last minutes.
    #[serde(default)]
    pub agent_gone: BTreeMap<AgentSessionId, (u64, Millis)>,
    /// Chat sessions gone from the backend, likewise.
    #[serde(default)]
    pub chat_gone: BTreeMap<ChatSessionId, (u64, Millis)>,
    /// Per feed of changes, where the next incremental read starts (`feed_read`). Absent from
    /// checkpoints written before feeds existed: the first start after them lists in full.
    #[serde(default)]
    pub feeds: BTreeMap<Feed, FeedState>,
    /// The latest `before` of a `retention_swept` (0: none yet): a final chat session the
    /// backend lists, unknown here, last active before it and linked to no agent session in
    /// view, is one that left the view (`observe::backend_session_changes`).
    #[serde(default)]
    pub swept_before: Millis,
    /// The infos last folded of the agent sessions an incremental listing reads again (those
    /// updated within its margin of the newest update): one listed again unchanged is left
    /// out without reading its row from disk (`margin`).
    #[serde(default)]
    pub agent_margin: AgentMargin,
    /// Lookups the fold keeps in step with the rows (chat sessions by agent session, agent
    /// sessions by tag, links to absent agent sessions): derived, so not stored, and rebuilt
    /// when a checkpoint is loaded.
    #[serde(skip)]
    pub index: SessionIndex,
}

/// Where one feed's incremental reads stand.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FeedState {
    /// Where the next read starts.
    pub cursor: String,
    /// The seq of the last `feed_read` that reached the end.
    pub caught_up_seq: Option<u64>,
}

/// How long a tombstone outlives the deletion it records, at least: longer than any stream
/// report or listing can be late.
pub const TOMBSTONE_MS: Millis = 10 * 60 * 1000;

/// A hold on deletions, as recorded by `deletions_held`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeletionHold {
    /// The seq of the held listing's `listing_completed`.
    pub listing_seq: u64,
    /// The seq of the `deletions_held` event.
    pub seq: u64,
    /// When the hold was recorded: the confirming listing must end at least the policy's
    /// wait after this.
    pub at: Millis,
    /// How many deletions the held listing called for.
    pub candidates: u64,
    /// The limit then.
    pub limit: u64,
}

/// One agent session.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AgentSessionRow {
    /// Its title.
    pub title: String,
    /// The seq of the event that set the title: a rename is planned once per title change.
    pub title_seq: u64,
    /// The seq of the event that first put it in the view: a listing that started before it
    /// cannot prove it gone.
    pub first_seq: u64,
    /// Its directory.
    pub directory: Option<String>,
    /// Its project (filled once, never overwritten).
    pub project: Option<String>,
    /// Its model (filled once, never overwritten).
    pub model: Option<ModelRef>,
    /// What it is doing.
    pub status: AgentStatus,
    /// Since when it has been busy without a break, if busy.
    pub busy_since: Option<Millis>,
    /// Its last activity (the agent server's `updated_at`; status reports are not progress).
    pub last_activity: Millis,
    /// The seq of the event that set its status: an older status reply cannot undo it.
    #[serde(default)]
    pub status_seq: u64,
    /// The chat session our `createAgentSession` made it for (its tag): such a session is
    /// never mirrored as a chat session of its own.
    #[serde(default)]
    pub created_for: Option<ChatSessionId>,
    /// Our `createSession` was planned for it: it is mirrored once, whatever became of that
    /// chat session (deleted from the backend for good, or given up), and never again. The
    /// row, not the ledger entry, is what stops a second one, so that entry can leave the
    /// ledger after the horizon while the session lives (`reconcile::retention`), and goes to
    /// disk with its settled pair.
    #[serde(default)]
    pub mirror_planned: bool,
}

/// One chat session.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ChatSessionRow {
    /// The seq of the event that first put it in the view (see [`AgentSessionRow::first_seq`]).
    pub first_seq: u64,
    /// The agent session it is linked to (in the backend, or created for it and not yet linked).
    pub agent_session_id: Option<AgentSessionId>,
    /// Whether the backend is known to hold that link.
    pub link_confirmed: bool,
    /// The seq of the event that established the current link.
    pub linked_seq: Option<u64>,
    /// Its title in the backend.
    pub title: String,
    /// Its model, `provider/model` (filled once, never overwritten).
    pub model: Option<String>,
    /// Its status.
    pub status: ChatStatus,
    /// Its last activity.
    pub last_activity: Millis,
    /// Its project (filled once, never overwritten).
    pub project: Option<String>,
    /// The seq of the event that set its title.
    #[serde(default)]
    pub title_seq: u64,
    /// The seq of the event that set its status (our own `markSessionDeleted` among them).
    #[serde(default)]
    pub status_seq: u64,
    /// When (the worker's clock) that event was appended: a final status's final moment.
    #[serde(default)]
    pub status_at: Millis,
}

/// What is known about one source's listings.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ListingState {
    /// The seq of the last complete, successful listing.
    pub last_complete_seq: Option<u64>,
    /// When it finished.
    pub last_complete_at: Option<Millis>,
    /// The seq of the last failed observation.
    pub last_failure_seq: Option<u64>,
    /// Its error.
    pub last_error: Option<String>,
    /// The seq of the last listing known to be partial (a page failed, a limit was hit).
    #[serde(default)]
    pub last_partial_seq: Option<u64>,
}

impl ListingState {
    /// Whether the source's latest observation failed or was partial (none complete since):
    /// then no absence may be derived from it, and no deletion may go.
    pub fn in_trouble(&self) -> bool {
        let since_complete =
            |seq: Option<u64>| seq.is_some_and(|f| self.last_complete_seq.is_none_or(|c| f > c));
        since_complete(self.last_failure_seq) || since_complete(self.last_partial_seq)
    }
}

/// The cached model list.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelCache {
    /// The agent-server generation it was fetched from.
    pub generation: u64,
    /// When it was fetched.
    pub fetched_at: Millis,
    /// The models.
    pub models: Vec<ModelRef>,
    /// The server's default.
    pub default: Option<ModelRef>,
}

/// The `operation` of an `observation_failed` for the model list.
pub const MODELS_OPERATION: &str = "list_models";

/// Sets `slot` from `observed` only when `slot` is empty: a later observation backfills a
/// missing field but never overwrites a known one.
fn backfill<T: Clone>(slot: &mut Option<T>, observed: &Option<T>) {
    if slot.is_none() {
        slot.clone_from(observed);
    }
}

impl SessionsView {
    /// The chat session linked to an agent session, if any (the first by id, from the index).
    pub fn chat_for_agent(&self, id: &AgentSessionId) -> Option<(&ChatSessionId, &ChatSessionRow)> {
        let chats = self.index.chats_by_agent.get(id)?;
        chats.iter().find_map(|c| self.chat.get_key_value(c))
    }

    fn observe_agent(&mut self, info: &AgentSessionInfo, seq: u64) {
        let row = self
            .agent
            .entry(info.agent_session_id.clone())
            .or_insert_with(|| AgentSessionRow {
                title: String::new(),
                title_seq: seq,
                first_seq: seq,
                directory: None,
                project: None,
                model: None,
                status: AgentStatus::Idle,
                busy_since: None,
                last_activity: 0,
                status_seq: seq,
                created_for: None,
                mirror_planned: false,
            });
        if row.title != info.title {
            row.title.clone_from(&info.title);
            row.title_seq = seq;
        }
        if info.directory.is_some() {
            row.directory.clone_from(&info.directory);
        }
        backfill(&mut row.project, &info.project);
        backfill(&mut row.model, &info.model);
        let made_for = info.tag.as_ref().map(|t| t.chat_session_id.clone());
        backfill(&mut row.created_for, &made_for);
        row.last_activity = row.last_activity.max(info.updated_at);
        self.agent_gone.remove(&info.agent_session_id);
    }

    fn observe_chat(&mut self, info: &ChatSessionInfo, seq: u64, at: Millis) {
        let row = self
            .chat
            .entry(info.chat_session_id.clone())
            .or_insert_with(|| ChatSessionRow {
                first_seq: seq,
                agent_session_id: None,
                link_confirmed: false,
                linked_seq: None,
                title: String::new(),
                model: None,
                status: info.status,
                last_activity: 0,
                project: None,
                title_seq: seq,
                status_seq: seq,
                status_at: at,
            });
        if let Some(agent) = &info.agent_session_id {
            if row.agent_session_id.as_ref() != Some(agent) {
                row.agent_session_id = Some(agent.clone());
                row.linked_seq = Some(seq);
            }
            row.link_confirmed = true;
        }
        if row.title != info.title {
            row.title.clone_from(&info.title);
            row.title_seq = seq;
        }
        if row.status != info.status {
            row.status = info.status;
            row.status_seq = seq;
            row.status_at = at;
        }
        row.last_activity = row.last_activity.max(info.last_activity);
        backfill(&mut row.model, &info.model);
        backfill(&mut row.project, &info.project);
        self.chat_gone.remove(&info.chat_session_id);
    }

    fn apply_effect(&mut self, effect: &Effect, e: &Envelope) {
        match effect {
            Effect::ChatSessionCreated {
                chat_session_id,
                agent_session_id,
                title,
                model,
            } => {
                let row =
                    self.chat
                        .entry(chat_session_id.clone())
                        .or_insert_with(|| ChatSessionRow {
                            first_seq: e.seq,
                            agent_session_id: None,
                            link_confirmed: false,
                            linked_seq: None,
                            title: title.clone(),
                            model: None,
                            status: ChatStatus::Active,
                            last_activity: e.at,
                            project: None,
                            title_seq: e.seq,
                            status_seq: e.seq,
                            status_at: e.at,
                        });
                if row.agent_session_id.as_ref() != Some(agent_session_id) {
                    row.agent_session_id = Some(agent_session_id.clone());
                    row.linked_seq = Some(e.seq);
                }
                row.link_confirmed = true;
                backfill(&mut row.model, model);
            }
            Effect::AgentSessionCreated {
                chat_session_id,
                agent_session_id,
                title,
            } => {
                self.agent
                    .entry(agent_session_id.clone())
                    .or_insert_with(|| AgentSessionRow {
                        title: title.clone(),
                        title_seq: e.seq,
                        first_seq: e.seq,
                        directory: None,
                        project: None,
                        model: None,
                        status: AgentStatus::Idle,
                        busy_since: None,
                        last_activity: e.at,
                        status_seq: e.seq,
                        created_for: Some(chat_session_id.clone()),
                        mirror_planned: false,
                    });
                if let Some(row) = self.chat.get_mut(chat_session_id) {
                    row.agent_session_id = Some(agent_session_id.clone());
                    row.link_confirmed = false;
                    row.linked_seq = Some(e.seq);
                }
            }
            Effect::AgentSessionLinked {
                chat_session_id,
                agent_session_id,
            } => {
                if let Some(row) = self.chat.get_mut(chat_session_id) {
                    if row.agent_session_id.as_ref() != Some(agent_session_id) {
                        row.linked_seq = Some(e.seq);
                    }
                    row.agent_session_id = Some(agent_session_id.clone());
                    row.link_confirmed = true;
                }
            }
            Effect::SessionRenamed {
                chat_session_id,
                title,
            } => {
                if let Some(row) = self.chat.get_mut(chat_session_id) {
                    row.title.clone_from(title);
                    row.title_seq = e.seq;
                }
            }
            Effect::SessionDeleted { chat_session_id } => {
                if let Some(row) = self.chat.get_mut(chat_session_id) {
                    row.status = ChatStatus::Deleted;
                    row.status_seq = e.seq;
                    row.status_at = e.at;
                }
            }
            Effect::SessionFailed {
                chat_session_id, ..
            } => {
                if let Some(row) = self.chat.get_mut(chat_session_id) {
                    row.status = ChatStatus::Failed;
                    row.status_seq = e.seq;
                    row.status_at = e.at;
                }
            }
            Effect::PromptAnswered {
                chat_session_id, ..
            } => {
                if let Some(row) = self.chat.get_mut(chat_session_id) {
                    row.last_activity = row.last_activity.max(e.at);
                }
            }
            Effect::MessageCompleted { .. }
            | Effect::MessageFailed { .. }
            | Effect::AgentSessionAborted { .. } => {}
        }
    }
}

/// A linked agent session and chat session that plan nothing (`reconcile::settled_pairs`):
/// the unit that may leave memory and come back (`log::rows`).
#[derive(Debug, Clone, PartialEq)]
pub struct SettledPair {
    /// The agent session's id.
    pub agent_id: AgentSessionId,
    /// Its row.
    pub agent: AgentSessionRow,
    /// The chat session's id.
    pub chat_id: ChatSessionId,
    /// Its row.
    pub chat: ChatSessionRow,
}

/// The agent and chat session rows an event may change or whose planning it may call for:
/// what must be in memory before it is folded (a settled pair away from memory is brought
/// back first, `log::rows`). The rows the fold touches (`index::touched`), the sessions its
/// keys name, its subject's, and a message's chat session.
pub fn rows_named(event: &Event) -> (Vec<AgentSessionId>, Vec<ChatSessionId>) {
    let (mut agents, mut chats) = (Vec::new(), Vec::new());
    let (chat, agent) = super::index::touched(event);
    chats.extend(chat.cloned());
    agents.extend(agent.cloned());
    for key in event.keys() {
        match key {
            Key::Agent(a) => agents.push(a),
            Key::Chat(c) => chats.push(c),
            Key::Deletions | Key::Message(_) => {}
        }
    }
    let subject = match event {
        Event::CommandPlanned(b) => Some(b.command.subject()),
        Event::AttemptStarted(b) => Some(b.subject.clone()),
        Event::CommandSucceeded(b) => Some(b.subject.clone()),
        Event::CommandFailed(b) => Some(b.subject.clone()),
        Event::CommandDeadLettered(b) => Some(b.subject.clone()),
        Event::CommandCancelled(b) => Some(b.subject.clone()),
        _ => None,
    };
    if let Some(s) = subject {
        chats.extend(s.chat_session_id);
        agents.extend(s.agent_session_id);
    }
    match event {
        Event::BackendMessageSeen(m) => chats.push(m.chat_session_id.clone()),
        Event::BackendSessionSeen(b) | Event::BackendSessionChanged(b) => {
            agents.extend(b.agent_session_id.clone())
        }
        _ => {}
    }
    agents.sort();
    agents.dedup();
    chats.sort();
    chats.dedup();
    (agents, chats)
}

impl SessionsView {
    /// Brings a settled pair back into the view, as it was when it left (no event touched it
    /// while away: the worker wakes what an event names before folding it). `false`, and
    /// nothing changed, when a row of it is here already (then it was not away).
    pub fn wake(&mut self, pair: SettledPair) -> bool {
        if self.agent.contains_key(&pair.agent_id) || self.chat.contains_key(&pair.chat_id) {
            return false;
        }
        self.index.woke(
            &pair.agent_id,
            &pair.chat_id,
            pair.agent.created_for.as_ref(),
        );
        self.agent.insert(pair.agent_id, pair.agent);
        self.chat.insert(pair.chat_id, pair.chat);
        true
    }

    /// Takes a settled pair out of the view (it stays in `index.active_chats`: it is active,
    /// only not resident). `None` when either row is gone.
    pub fn evict(
        &mut self,
        agent_id: &AgentSessionId,
        chat_id: &ChatSessionId,
    ) -> Option<SettledPair> {
        if !self.agent.contains_key(agent_id) || !self.chat.contains_key(chat_id) {
            return None;
        }
        let agent = self.agent.remove(agent_id)?;
        let chat = self.chat.remove(chat_id)?;
        self.index
            .evicted(agent_id, chat_id, agent.created_for.as_ref());
        Some(SettledPair {
            agent_id: agent_id.clone(),
            agent,
            chat_id: chat_id.clone(),
            chat,
        })
    }

    /// Drops the named chat sessions that are final, and the tombstones older than `before`
    /// (no listing or stream report is that late), and remembers the horizon.
    fn sweep(&mut self, chats: &[ChatSessionId], before: Millis) {
        for id in chats {
            if self
                .chat
                .get(id)
                .is_some_and(|c| c.status != ChatStatus::Active)
            {
                self.chat.remove(id);
            }
        }
        self.agent_gone.retain(|_, &mut (_, at)| at >= before);
        self.chat_gone.retain(|_, &mut (_, at)| at >= before);
        self.swept_before = self.swept_before.max(before);
    }
}

impl Projection for SessionsView {
    const NAME: &'static str = "sessions";
    // v2: `title_seq`, `first_seq`, `agent_generation`, `models_requested`; status reports no longer count as activity.
    // v3: the seq of each field a listing can change (titles, statuses), tombstones of gone
    // sessions, and the chat session a tagged agent session was made for.
    // v4: `status_at`, `swept_before`; `retention_swept` drops final chat sessions and old
    // tombstones.
    // v5: `identity_adopted` clears the feeds' cursors of the sides that changed.
    // v6: `mirror_planned`, folded from `command_planned` of a `createSession`; `agent_margin`.
    const VERSION: u32 = 6;

    fn apply(&mut self, e: &Envelope) {
        let before = SessionIndex::before(self, &e.event);
        self.fold(e);
        let mut index = std::mem::take(&mut self.index);
        index.after(self, before);
        self.index = index;
    }

    fn loaded(&mut self) {
        self.index = SessionIndex::build(self);
        self.agent_margin.loaded();
    }
}

impl SessionsView {
    fn fold(&mut self, e: &Envelope) {
        match &e.event {
            Event::AgentSessionSeen(info) | Event::AgentSessionChanged(info) => {
                self.observe_agent(info, e.seq);
                self.agent_margin.record(info);
            }
            Event::AgentSessionGone(b) => {
                self.agent.remove(&b.agent_session_id);
                self.agent_margin.forget(&b.agent_session_id);
                self.agent_gone
                    .insert(b.agent_session_id.clone(), (e.seq, e.at));
            }
            Event::AgentSessionStatus(b) => {
                // A status for a session not (yet) listed carries no title: wait for the listing.
                if let Some(row) = self.agent.get_mut(&b.agent_session_id) {
                    let busy = !matches!(b.status, AgentStatus::Idle);
                    row.busy_since = match (busy, row.busy_since) {
                        (false, _) => None,
                        (true, None) => Some(e.at),
                        (true, since) => since,
                    };
                    row.status = b.status.clone();
                    row.status_seq = e.seq;
                }
            }
            Event::ModelsListed(b) => {
                self.models = Some(ModelCache {
                    generation: b.generation,
                    fetched_at: e.at,
                    models: b.models.clone(),
                    default: b.default.clone(),
                })
            }
            Event::BackendSessionSeen(info) | Event::BackendSessionChanged(info) => {
                self.observe_chat(info, e.seq, e.at)
            }
            Event::BackendSessionGone(b) => {
                self.chat.remove(&b.chat_session_id);
                self.chat_gone
                    .insert(b.chat_session_id.clone(), (e.seq, e.at));
            }
            // A partial listing proves nothing about absence, and while it is the latest word
            // on a source nothing may be deleted on the strength of an older complete one.
            Event::ListingCompleted(b) if !b.complete => {
                self.listings.entry(b.source).or_default().last_partial_seq = Some(e.seq);
            }
            Event::ListingCompleted(b) => {
                let l = self.listings.entry(b.source).or_default();
                l.last_complete_seq = Some(e.seq);
                l.last_complete_at = Some(e.at);
                // A complete listing that began after a session was gone and lacked it
                // confirms the tombstone: no older listing is still in flight to contradict it.
                if let Some(as_of) = b.as_of {
                    let keep = |&mut (seq, at): &mut (u64, Millis)| {
                        seq > as_of || e.at < at + TOMBSTONE_MS
                    };
                    match b.source {
                        Source::Agent => self.agent_gone.retain(|_, t| keep(t)),
                        Source::Backend => self.chat_gone.retain(|_, t| keep(t)),
                    }
                }
            }
            // Moved to another agent server, backend or worker id: the cursors are the old
            // side's positions (change numbers start again per worker), so the next start
            // reads the new side from the beginning.
            Event::IdentityAdopted(b) => {
                if b.previous.agent != b.current.agent {
                    self.feeds.remove(&Feed::AgentSessions);
                    self.agent_margin.clear();
                }
                if b.previous.backend != b.current.backend
                    || b.previous.worker_id != b.current.worker_id
                {
                    self.feeds.remove(&Feed::BackendSessions);
                    self.feeds.remove(&Feed::BackendMessages);
                }
            }
            Event::FeedRead(b) => {
                let feed = self.feeds.entry(b.feed).or_default();
                feed.cursor.clone_from(&b.cursor);
                if b.reached_end {
                    feed.caught_up_seq = Some(e.seq);
                }
            }
            Event::ModelsRequested(b) => self.models_requested = Some((b.generation, e.at)),
            // A failed model fetch says nothing about the listings.
            Event::ObservationFailed(b) if b.operation == MODELS_OPERATION => {}
            Event::ObservationFailed(b) => {
                let l = self.listings.entry(b.source).or_default();
                l.last_failure_seq = Some(e.seq);
                l.last_error = Some(b.error.clone());
            }
            Event::CommandPlanned(b) => {
                if let Command::CreateSession {
                    agent_session_id, ..
                } = &b.command
                {
                    if let Some(row) = self.agent.get_mut(agent_session_id) {
                        row.mirror_planned = true;
                    }
                }
            }
            Event::CommandSucceeded(b) => self.apply_effect(&b.effect, e),
            Event::AgentServerStarted(b) => self.agent_generation = b.generation,
            Event::DeletionsHeld(b) => {
                self.deletion_hold = Some(DeletionHold {
                    listing_seq: b.listing_seq,
                    seq: e.seq,
                    at: e.at,
                    candidates: b.candidates,
                    limit: b.limit,
                })
            }
            Event::DeletionHoldLifted(_) => self.deletion_hold = None,
            Event::RetentionSwept(b) => self.sweep(&b.chats, b.before),
            _ => {}
        }
    }
}
