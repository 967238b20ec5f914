//! The agent feed's margin: the agent sessions an incremental listing reads again.
//!
//! An incremental agent listing asks for the sessions updated since its cursor less
//! [`AGENT_SINCE_MARGIN_MS`], so that updates in the same millisecond or committed out of order
//! are read again rather than missed. After a restart those re-read sessions are mostly
//! settled pairs on disk (`log::rows`), and telling whether one changed would cost a read of
//! its row: at a million sessions updated a millisecond apart, a thousand reads on the way to
//! Ready, each materializing a sled leaf of neighbours.
//!
//! So the sessions view keeps the info last folded for each agent session updated within the
//! margin of the newest `updated_at` folded. A listed session equal to it is the fold's own
//! input again, so the row it made cannot be changed by it (`observe::agent_row_news`
//! compares the title, directory, project, model and `updated_at` that fold recorded), and it
//! is left out unread. Anything else is compared with the row, as before.
//!
//! Invariants:
//! 1. An entry is the info of the last `agent_session_seen` or `agent_session_changed` folded
//!    for its id, and goes with `agent_session_gone`: what the row was made from since.
//! 2. Only entries with `updated_at` at least the newest folded less the margin are kept, and
//!    at most [`MOST`] (the newest): the margin holds the sessions updated in the last second
//!    of activity, not history, and a burst of updates in one second does not make it large.
//!    Anything not kept is read, as before: the margin only saves reads. (A session updated
//!    far in the future moves the newest with it: the margin then keeps little until the
//!    agent server's updates catch up, and again only reads are lost.)

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

use crate::clock::Millis;
use crate::events::{AgentSessionId, AgentSessionInfo};

/// The most sessions the margin keeps (about 200 bytes each, in the meta record of every
/// checkpoint).
pub const MOST: usize = 4_096;

/// An incremental agent listing asks for the sessions updated this long before its cursor:
/// updates within one millisecond, or committed out of order, are read again, not missed.
pub const AGENT_SINCE_MARGIN_MS: Millis = 1_000;

/// The infos last folded of the agent sessions updated within [`AGENT_SINCE_MARGIN_MS`] of
/// the newest update folded (see the module).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct AgentMargin {
    /// The newest `updated_at` folded.
    newest: Millis,
    /// The last info folded, by id.
    infos: BTreeMap<AgentSessionId, AgentSessionInfo>,
    /// The same ids by `updated_at`, oldest first, to prune: derived, rebuilt on load.
    #[serde(skip)]
    by_time: BTreeSet<(Millis, AgentSessionId)>,
}

impl AgentMargin {
    /// Records `info` as folded (invariant 1), and lets go of what fell out of the margin.
    pub fn record(&mut self, info: &AgentSessionInfo) {
        let id = &info.agent_session_id;
        self.forget(id);
        self.newest = self.newest.max(info.updated_at);
        let floor = self.newest.saturating_sub(AGENT_SINCE_MARGIN_MS);
        if info.updated_at >= floor {
            self.by_time.insert((info.updated_at, id.clone()));
            self.infos.insert(id.clone(), info.clone());
        }
        while let Some(oldest) = self
            .by_time
            .first()
            .filter(|(at, _)| *at < floor || self.infos.len() > MOST)
        {
            let oldest = oldest.1.clone();
            self.forget(&oldest);
        }
    }

    /// Forgets every session (the agent server changed: its sessions are another's).
    pub fn clear(&mut self) {
        *self = AgentMargin::default();
    }

    /// Forgets agent session `id` (gone, or folded anew).
    pub fn forget(&mut self, id: &AgentSessionId) {
        if let Some(old) = self.infos.remove(id) {
            self.by_time.remove(&(old.updated_at, id.clone()));
        }
    }

    /// Whether `info` is exactly what was last folded for its session: then it tells the
    /// session's row nothing, wherever that row is.
    pub fn is_last_folded(&self, info: &AgentSessionInfo) -> bool {
        self.infos.get(&info.agent_session_id) == Some(info)
    }

    /// How many sessions it holds.
    pub fn len(&self) -> usize {
        self.infos.len()
    }

    /// Whether it holds none.
    pub fn is_empty(&self) -> bool {
        self.infos.is_empty()
    }

    /// Rebuilds the derived order after a load.
    pub fn loaded(&mut self) {
        self.by_time = self
            .infos
            .iter()
            .map(|(id, i)| (i.updated_at, id.clone()))
            .collect();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info(id: &str, at: Millis) -> AgentSessionInfo {
        AgentSessionInfo {
            agent_session_id: id.into(),
            title: id.into(),
            directory: None,
            project: None,
            model: None,
            updated_at: at,
            parent_id: None,
            tag: None,
        }
    }

    #[test]
    fn it_keeps_the_last_second_of_updates_and_the_last_info_of_each() {
        let mut m = AgentMargin::default();
        for i in 0..3_000 {
            m.record(&info(&format!("s{i}"), 10_000 + i));
        }
        assert_eq!(m.len(), 1_001, "updated 12,999 back to 11,999");
        assert!(m.is_last_folded(&info("s2999", 12_999)));
        assert!(m.is_last_folded(&info("s1999", 11_999)));
        assert!(!m.is_last_folded(&info("s1998", 11_998)), "fell out");
        // Folded anew with a new title: only that info is the last.
        let mut renamed = info("s2999", 12_999);
        renamed.title = "new".into();
        m.record(&renamed);
        assert!(!m.is_last_folded(&info("s2999", 12_999)));
        assert!(m.is_last_folded(&renamed));
        // An older update folded late stays while within the margin, and goes when gone.
        m.record(&info("late", 12_500));
        assert!(m.is_last_folded(&info("late", 12_500)));
        m.forget(&"late".into());
        assert!(!m.is_last_folded(&info("late", 12_500)));
        // One too old is not kept.
        m.record(&info("old", 5_000));
        assert!(!m.is_last_folded(&info("old", 5_000)));
        // The same session folded again at another time: one entry, in its new place.
        m.record(&info("twice", 12_700));
        m.record(&info("twice", 12_900));
        assert!(m.is_last_folded(&info("twice", 12_900)));
        assert_eq!(m.by_time.len(), m.infos.len());
        // The order survives a round trip through a checkpoint.
        let mut back: AgentMargin =
            serde_json::from_value(serde_json::to_value(&m).unwrap()).unwrap();
        back.loaded();
        assert_eq!(back, m);
        back.record(&info("next", 14_000));
        assert_eq!(back.len(), 1, "the rest fell out, found by their order");
    }

    #[test]
    fn a_burst_of_updates_keeps_no_more_than_most() {
        let mut m = AgentMargin::default();
        for i in 0..MOST + 500 {
            m.record(&info(&format!("s{i:05}"), 10_000));
        }
        assert_eq!(m.len(), MOST);
        assert_eq!(m.by_time.len(), MOST);
        m.record(&info("later", 10_001));
        assert!(m.is_last_folded(&info("later", 10_001)));
        assert_eq!(m.len(), MOST);
    }

    /// The view's fold keeps it (`SessionsView`): a session gone is forgotten, so one seen
    /// again unchanged after it went is compared, not left out; a new agent server clears it.
    #[test]
    fn the_sessions_view_forgets_a_session_gone_and_another_servers() {
        use crate::events::{AgentSessionGone, Envelope, Event, GoneReason};
        use crate::projections::{Projection, SessionsView};
        let mut view = SessionsView::default();
        let mut seq = 0;
        let mut fold = |view: &mut SessionsView, event: Event| {
            seq += 1;
            let v = event.kind().version();
            let (id, at, cause) = (uuid::Uuid::nil(), 0, None);
            view.apply(&Envelope {
                seq,
                id,
                at,
                v,
                event,
                cause,
            });
        };
        fold(&mut view, Event::AgentSessionSeen(info("a", 10_000)));
        assert!(view.agent_margin.is_last_folded(&info("a", 10_000)));
        let gone = AgentSessionGone {
            agent_session_id: "a".into(),
            reason: GoneReason::Deleted,
        };
        fold(&mut view, Event::AgentSessionGone(gone));
        assert!(!view.agent_margin.is_last_folded(&info("a", 10_000)));
        fold(&mut view, Event::AgentSessionSeen(info("b", 10_000)));
        let moved = crate::events::IdentityAdopted {
            previous: identity("http://127.0.0.1:4096/"),
            current: identity("http://127.0.0.1:4097/"),
        };
        fold(&mut view, Event::IdentityAdopted(moved));
        assert!(view.agent_margin.is_empty());
    }

    fn identity(url: &str) -> crate::events::Identity {
        crate::events::Identity {
            worker_id: "w".into(),
            agent: crate::events::AgentIdentity::Url(url.into()),
            backend: crate::events::BackendIdentity::Local,
        }
    }
}
