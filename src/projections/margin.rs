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
//! 2. Only entries with `updated_at` at least the newest folded less the margin are kept:
//!    the margin holds the sessions updated in the last second of activity, not history.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

use crate::clock::Millis;
use crate::events::{AgentSessionId, AgentSessionInfo};

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
        while let Some(oldest) = self.by_time.first().filter(|(at, _)| *at < floor) {
            let oldest = oldest.1.clone();
            self.forget(&oldest);
        }
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
        // The order survives a round trip through a checkpoint.
        let mut back: AgentMargin =
            serde_json::from_value(serde_json::to_value(&m).unwrap()).unwrap();
        back.loaded();
        assert_eq!(back, m);
        back.record(&info("next", 14_000));
        assert_eq!(back.len(), 1, "the rest fell out, found by their order");
    }
}
