//! The sessions view's checkpoint as rows in a sled tree of its own (`views.sessions`, in the
//! log's database), so that a checkpoint writes what changed since the last one and a start
//! reads only what is active: at a million sessions of which a few are active, the rest stay
//! on disk until an event names them.
//!
//! Layout: `m` the meta (header, the view's fields other than its rows, the ids resident at
//! the checkpoint, how many pairs are away); the records `a/ID` an agent session's row, `c/ID`
//! a chat session's row and `l/AGENT` the chat session of a pair away from memory, packed into
//! hash buckets ([`super::packed`]: sled's cost is per entry, and there are three records per
//! session). A tree of the layout before buckets (meta without `layout`) is read whole once
//! and replaced by the next write. While a write too large for one batch is under way (or was
//! cut short by a crash): its stage, `s/` and each record's key, and the mark `s` (invariant 5).
//!
//! Invariants:
//! 1. The tree is the sessions view at `meta.seq`: each write is one atomic sled batch of the
//!    rows that changed since the one before, the rows that left the view, and the meta (or,
//!    too large for one, staged: invariant 5).
//! 2. A row away from memory (not resident now, nor since the last write) is as the tree
//!    holds it: nothing changed it since, because the worker brings back every row an event
//!    names (`projections::rows_named`) before folding the event.
//! 3. Only settled pairs leave memory (`reconcile::settled_pairs`: they plan nothing), both
//!    rows at once, after the batch that stores them is applied. While away they count in the
//!    index's `active_chats` (the deletion limit is a share of every active chat session).
//! 4. A tree written from another start (a rebuild, a checkpoint of another version) is
//!    replaced whole by the next write: no row of it can be brought back.
//! 5. A write too large for one batch (invariant 1) is staged: its records go under `s/` in
//!    pieces, then the mark `s` that they are all there, then to their places in pieces, then
//!    the mark and the staged records go. sled recovers a prefix of its operations, so after a
//!    crash the tree holds the view of before (no mark: what was staged is dropped) or a mark
//!    over every staged record, which the log's next open applies again before anything reads
//!    the tree ([`finish_staged`]). Never a meta over rows of another seq, and never no view:
//!    a log whose oldest segments were deleted could not rebuild one.

use std::collections::BTreeMap;
use std::hash::{DefaultHasher, Hasher};

use rustc_hash::{FxHashMap, FxHashSet};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use super::{packed, LogError};
use crate::events::{AgentSessionId, AgentSessionInfo, ChatSessionId, ChatSessionInfo};
use crate::observe::{is_news_to_agent_row, is_news_to_chat_row};
use crate::projections::{
    AgentSessionRow, ChatSessionRow, Checkpoint, Projection, SessionsView, SettledPair, Tracked,
};

/// The tree's name in the log's database.
pub(super) const TREE: &str = "views.sessions";
const META: &[u8] = b"m";
const AGENT: &[u8] = b"a/";
const CHAT: &[u8] = b"c/";
const LINK: &[u8] = b"l/";

/// The meta record: the checkpoint's header and everything but the rows.
#[derive(Serialize, Deserialize)]
struct Meta {
    name: String,
    version: u32,
    seq: u64,
    /// The view without its rows.
    state: SessionsView,
    resident_agents: Vec<AgentSessionId>,
    resident_chats: Vec<ChatSessionId>,
    /// Settled pairs away from memory.
    away: u64,
    /// How the records are stored: 0 one sled entry each (before buckets), [`LAYOUT`] packed.
    #[serde(default)]
    layout: u32,
}

/// The records packed into buckets ([`super::packed`]).
const LAYOUT: u32 = 1;

/// The version before this one, read and upcast when the log cannot rebuild the view (the
/// archive's oldest segments deleted): it lacks only the agent rows' `mirror_planned`, which
/// the ledger tells once caught up (`log::checkpoint`), and the agent feed's margin, which
/// starts empty (it only saves reads).
pub(super) const UPCASTS_FROM: u32 = 5;

/// A layout of another agentsync is damage to this one (the view is set aside and rebuilt),
/// never read as one of ours.
fn known_layout(layout: u32) -> Result<(), LogError> {
    match layout {
        0 | LAYOUT => Ok(()),
        other => Err(damaged(format!(
            "row layout {other} is unknown to this binary"
        ))),
    }
}

/// Records as (id, value).
type Records<'a> = Box<dyn Iterator<Item = Result<(String, Vec<u8>), LogError>> + 'a>;

/// Every record of `family` as (id, value), in either layout. Blocking.
fn records<'a>(tree: &'a sled::Tree, layout: u32, family: &'static [u8]) -> Records<'a> {
    let id = move |k: &[u8]| String::from_utf8_lossy(&k[family.len()..]).into_owned();
    if layout == LAYOUT {
        Box::new(packed::scan(tree, family).map(move |r| r.map(|(k, v)| (id(&k), v))))
    } else {
        Box::new(
            tree.scan_prefix(family)
                .map(move |r| r.map(|(k, v)| (id(&k), v.to_vec())).map_err(LogError::from)),
        )
    }
}

/// Every agent and chat session row stored, into `state`. Blocking.
fn read_all_rows(tree: &sled::Tree, layout: u32, state: &mut SessionsView) -> Result<(), LogError> {
    for record in records(tree, layout, AGENT) {
        let (id, v) = record?;
        let row = decode(&v, "an agent session row")?;
        state.agent.insert(AgentSessionId(id), row);
    }
    for record in records(tree, layout, CHAT) {
        let (id, v) = record?;
        let row = decode(&v, "a chat session row")?;
        state.chat.insert(ChatSessionId(id), row);
    }
    Ok(())
}

fn key(prefix: &[u8], id: &str) -> Vec<u8> {
    [prefix, id.as_bytes()].concat()
}

fn damaged(reason: impl std::fmt::Display) -> LogError {
    LogError::Rows {
        reason: reason.to_string(),
    }
}

fn encode(value: &impl Serialize) -> Vec<u8> {
    rmp_serde::encode::to_vec_named(value).expect("a view's rows serialize")
}

fn decode<T: DeserializeOwned>(bytes: &[u8], what: &str) -> Result<T, LogError> {
    rmp_serde::from_slice(bytes).map_err(|e| damaged(format!("{what}: {e}")))
}

/// What tells a stored row's version from another: a hash of its bytes.
fn hash(bytes: &[u8]) -> u64 {
    let mut h = DefaultHasher::new();
    h.write(bytes);
    h.finish()
}

/// The view's fields other than its rows (the rows are stored one by one).
fn without_rows(s: &SessionsView) -> SessionsView {
    SessionsView {
        agent: BTreeMap::new(),
        chat: BTreeMap::new(),
        listings: s.listings.clone(),
        deletion_hold: s.deletion_hold.clone(),
        models: s.models.clone(),
        agent_generation: s.agent_generation,
        models_requested: s.models_requested,
        agent_gone: s.agent_gone.clone(),
        chat_gone: s.chat_gone.clone(),
        feeds: s.feeds.clone(),
        swept_before: s.swept_before,
        agent_margin: s.agent_margin.clone(),
        index: Default::default(),
    }
}

fn read_meta(tree: &sled::Tree) -> Result<Option<Meta>, LogError> {
    // Only an open that may not change the tree leaves a marked stage (a damaged one): the
    // meta may stand over rows of two writes.
    if tree.get(STAGED_WHOLE)?.is_some() {
        return Err(damaged(
            "a write of it was cut short and its stage is damaged (`agentsync run` sets it aside and rebuilds the view where the log can)",
        ));
    }
    tree.get(META)?
        .map(|bytes| decode(&bytes, "the meta record"))
        .transpose()
}

/// The seq and version of the stored view, without reading its rows. `None`: there is none.
pub(super) fn header(tree: &sled::Tree) -> Result<Option<(u64, u32)>, LogError> {
    Ok(read_meta(tree)?.map(|m| (m.seq, m.version)))
}

/// Sets the stored view aside (a row of it is damaged): the next start rebuilds the sessions
/// view from the log and its first write replaces the tree (invariant 4). Blocking.
pub(super) fn set_aside(tree: &sled::Tree) -> Result<(), LogError> {
    tree.remove(META)?;
    tree.flush()?;
    Ok(())
}

/// Every stored row as one checkpoint (for tools: `replay`, `rebuild --verify`).
/// Rows of another version are not read.
pub(super) fn load_all(tree: &sled::Tree) -> Result<Option<Checkpoint<SessionsView>>, LogError> {
    let Some(meta) = read_meta(tree)? else {
        return Ok(None);
    };
    let mut state = meta.state;
    if meta.version == SessionsView::VERSION {
        known_layout(meta.layout)?;
        read_all_rows(tree, meta.layout, &mut state)?;
    }
    Ok(Some(Checkpoint {
        name: meta.name,
        version: meta.version,
        seq: meta.seq,
        state,
    }))
}

/// Replaces the whole tree with `tracked` (every row resident, none away), stamped
/// `version` (another one only for tools and tests that store a foreign checkpoint):
/// `rebuild`, and tools that save a view. Blocking.
pub(super) fn save_all(
    tree: &sled::Tree,
    tracked: &Tracked<SessionsView>,
    version: u32,
) -> Result<(), LogError> {
    let mut residency = Residency::replacing(tree.clone());
    let mut copy = Tracked {
        state: without_rows(&tracked.state),
        seq: tracked.seq,
    };
    copy.state.agent.clone_from(&tracked.state.agent);
    copy.state.chat.clone_from(&tracked.state.chat);
    residency.write(&mut copy, &[])?;
    if version != SessionsView::VERSION {
        if let Some(mut meta) = read_meta(tree)? {
            meta.version = version;
            tree.insert(META, encode(&meta))?;
            tree.flush()?;
        }
    }
    Ok(())
}

/// Most bucket writes, and most bytes, a checkpoint applies as one sled batch. sled holds a
/// batch whole in memory several times over: at 100,000 sessions, one batch of every row (one
/// entry each, before buckets) took the process from 1.0 to 2.7 GB (`agentsync-bench
/// startup`), and at 1,000,000 past the machine's 24 GB. At 1,000,000 sessions a bucket is
/// about 10 KB, so a checkpoint stays one atomic batch up to about 6,000 changed rows.
/// (Unit tests write in pieces past 1,000, so that small views take that path too.)
const BATCH_WRITES: usize = if cfg!(test) { 1_000 } else { 20_000 };
const BATCH_BYTES: usize = 64 << 20;

/// A checkpoint's writes, in order.
#[derive(Default)]
struct Writes(Vec<(Vec<u8>, Option<Vec<u8>>)>);

impl Writes {
    fn insert(&mut self, k: impl Into<Vec<u8>>, v: impl Into<Vec<u8>>) {
        self.0.push((k.into(), Some(v.into())));
    }
    fn remove(&mut self, k: impl Into<Vec<u8>>) {
        self.0.push((k.into(), None));
    }
}

/// Applies `writes` to records and then `meta`, durably. `replace`: the tree is replaced
/// whole (invariant 4): buckets start empty and every other key goes. Up to `BATCH_WRITES` and
/// `BATCH_BYTES`, one atomic batch (the usual case: what changed since the last checkpoint).
/// Beyond, staged (invariant 5): a crash at any point leaves the view of before or, once
/// the stage is marked whole, the next open finishes the write ([`finish_staged`]).
fn commit(tree: &sled::Tree, writes: Writes, meta: Vec<u8>, replace: bool) -> Result<(), LogError> {
    // A write of this process failed once staged: what the caller holds in memory may not be
    // what the tree holds; the log's next open finishes it.
    if tree.get(STAGED_WHOLE)?.is_some() || tree.scan_prefix(STAGED).next().is_some() {
        return Err(LogError::io(
            "a write of the sessions view was cut short in this process; the log's next open finishes it",
            std::io::Error::other("stage pending"),
        ));
    }
    let mut ops = packed::bucket_writes(tree, writes.0, replace)?;
    if replace {
        let fresh: FxHashSet<Vec<u8>> = ops.iter().map(|(k, _)| k.clone()).collect();
        for item in tree.iter().keys() {
            let k = item?;
            if k.as_ref() != META && !fresh.contains(k.as_ref()) {
                ops.push((k.to_vec(), None));
            }
        }
    }
    ops.push((META.to_vec(), Some(meta)));
    let mut step = Steps::default();
    if fits_one_batch(&ops) {
        step.apply(tree, ops)?;
        tree.flush()?;
        return Ok(());
    }
    // One piece at a time: a staged copy of the whole write would double its memory.
    let staged = ops
        .iter()
        .map(|(k, v)| (staged_key(k), Some(staged_value(v))));
    for piece in pieces(staged) {
        step.apply(tree, piece)?;
    }
    let count = (ops.len() as u64).to_be_bytes().to_vec();
    drop(ops);
    step.apply(tree, vec![(STAGED_WHOLE.to_vec(), Some(count))])?;
    finish_staged_counting(tree, &mut step)
}

/// The records of a write in pieces are first written under `s/` and their key, each value
/// a byte 1 and the value, or the byte 0 for a removal (invariant 5).
const STAGED: &[u8] = b"s/";
/// Present once every staged record of a write is: their number, big-endian.
const STAGED_WHOLE: &[u8] = b"s";

fn staged_key(k: &[u8]) -> Vec<u8> {
    [STAGED, k].concat()
}

fn staged_value(v: &Option<Vec<u8>>) -> Vec<u8> {
    match v {
        Some(v) => [&[1u8][..], v].concat(),
        None => vec![0],
    }
}

/// Finishes a write in pieces that a crash cut short once it was staged whole, or drops what
/// one cut before left staged (invariant 5): at the log's open, before anything reads the
/// tree. A marked stage that is not as its mark says is damage ([`LogError::Rows`]; a
/// writer's open sets it aside with the view, [`discard_staged`]). Blocking.
pub(super) fn finish_staged(tree: &sled::Tree) -> Result<(), LogError> {
    finish_staged_counting(tree, &mut Steps::default())
}

/// [`finish_staged`], its batches counted on from `step` (the write that staged it).
fn finish_staged_counting(tree: &sled::Tree, step: &mut Steps) -> Result<(), LogError> {
    let Some(mark) = tree.get(STAGED_WHOLE)? else {
        // Never applied, so never read: dropped whatever its records hold.
        if tree.scan_prefix(STAGED).next().is_some() {
            tracing::info!("dropping a sessions view write cut short before it was staged whole");
            drop_staged(tree, step)?;
        }
        return Ok(());
    };
    let mut staged = 0u64;
    for item in tree.scan_prefix(STAGED) {
        let (_, v) = item?;
        unstaged(&v)?;
        staged += 1;
    }
    if <[u8; 8]>::try_from(mark.as_ref())
        .ok()
        .map(u64::from_be_bytes)
        != Some(staged)
    {
        return Err(damaged(format!(
            "a staged write of the sessions view holds {staged} records, not as many as marked"
        )));
    }
    tracing::debug!(records = staged, "applying a staged sessions view write");
    // Straight from the stage, a piece at a time (never the whole write in memory).
    let mut failed = None;
    let ops = tree.scan_prefix(STAGED).map_while(|item| {
        let op = item
            .map_err(LogError::from)
            .and_then(|(k, v)| Ok((k[STAGED.len()..].to_vec(), unstaged(&v)?)));
        op.map_err(|e| failed = Some(e)).ok()
    });
    for piece in pieces(ops) {
        step.apply(tree, piece)?;
    }
    if let Some(e) = failed {
        return Err(e);
    }
    step.apply(tree, vec![(STAGED_WHOLE.to_vec(), None)])?;
    drop_staged(tree, step)
}

/// A staged record's value as the write it stands for.
fn unstaged(v: &[u8]) -> Result<Option<Vec<u8>>, LogError> {
    match v.split_first() {
        Some((1, value)) => Ok(Some(value.to_vec())),
        Some((0, [])) => Ok(None),
        _ => Err(damaged("a staged record of a write is damaged")),
    }
}

/// Removes the staged records (the mark already gone), durably, a piece at a time as they
/// are read (sled's iterator goes on from the last key it gave). Blocking.
fn drop_staged(tree: &sled::Tree, step: &mut Steps) -> Result<(), LogError> {
    let mut failed = None;
    let keys = tree.scan_prefix(STAGED).keys().map_while(|k| {
        k.map(|k| (k.to_vec(), None))
            .map_err(|e| failed = Some(e))
            .ok()
    });
    for piece in pieces(keys) {
        step.apply(tree, piece)?;
    }
    if let Some(e) = failed {
        return Err(e.into());
    }
    tree.flush()?;
    Ok(())
}

/// Sets aside a view whose stage is damaged, with the stage: the next start rebuilds the
/// sessions view from the log (only where it can: `checkpoint::kept_unless_rebuildable`).
/// The mark and the meta go in one batch: a meta left without the mark would stand over rows
/// of two writes. Blocking.
pub(super) fn discard_staged(tree: &sled::Tree) -> Result<(), LogError> {
    let mut step = Steps::default();
    step.apply(
        tree,
        vec![(STAGED_WHOLE.to_vec(), None), (META.to_vec(), None)],
    )?;
    drop_staged(tree, &mut step)
}

/// Whether `ops` go in one sled batch.
fn fits_one_batch(ops: &[packed::Write]) -> bool {
    ops.len() <= BATCH_WRITES && ops.iter().map(write_size).sum::<usize>() <= BATCH_BYTES
}

fn write_size(op: &packed::Write) -> usize {
    op.0.len() + op.1.as_ref().map_or(0, Vec::len)
}

/// The sled batches of a write, counted: tests cut a write before any of them.
#[derive(Default)]
struct Steps(usize);

impl Steps {
    /// Applies `ops` as one atomic sled batch. Blocking.
    fn apply(&mut self, tree: &sled::Tree, ops: Vec<packed::Write>) -> Result<(), LogError> {
        cut_before(self.0)?;
        self.0 += 1;
        let mut batch = sled::Batch::default();
        for (k, v) in ops {
            match v {
                Some(v) => batch.insert(k, v),
                None => batch.remove(k),
            }
        }
        Ok(tree.apply_batch(batch)?)
    }
}

#[cfg(test)]
thread_local! {
    /// Tests stop a write before this piece, as a crash would.
    pub(super) static CUT_AFTER_PIECES: std::cell::Cell<Option<usize>> =
        const { std::cell::Cell::new(None) };
}

/// Where tests cut a write in pieces ([`CUT_AFTER_PIECES`]); nothing outside them.
#[cfg(test)]
fn cut_before(piece: usize) -> Result<(), LogError> {
    match CUT_AFTER_PIECES.get() == Some(piece) {
        true => Err(LogError::io("cut (test)", std::io::Error::other("cut"))),
        false => Ok(()),
    }
}

#[cfg(not(test))]
fn cut_before(_: usize) -> Result<(), LogError> {
    Ok(())
}

/// `ops` in order, cut into sled batches of at most `BATCH_WRITES` and `BATCH_BYTES` (a
/// single write larger than that alone), taken from `ops` one batch at a time.
fn pieces(
    ops: impl IntoIterator<Item = packed::Write>,
) -> impl Iterator<Item = Vec<packed::Write>> {
    let mut ops = ops.into_iter().peekable();
    std::iter::from_fn(move || {
        let (mut piece, mut bytes) = (Vec::new(), 0);
        while let Some(op) = ops.peek() {
            let full = piece.len() == BATCH_WRITES || bytes + write_size(op) > BATCH_BYTES;
            if !piece.is_empty() && full {
                break;
            }
            bytes += write_size(op);
            piece.extend(ops.next());
        }
        (!piece.is_empty()).then_some(piece)
    })
}

/// Which rows are in memory and which the tree holds for them: what a worker's checkpoints
/// write and what its events bring back.
#[derive(Debug)]
pub struct Residency {
    tree: sled::Tree,
    /// Each row resident since the last write, with the hash of the version the tree holds
    /// (`None`: the tree holds none).
    seen_agents: FxHashMap<AgentSessionId, Option<u64>>,
    seen_chats: FxHashMap<ChatSessionId, Option<u64>>,
    /// Pairs brought back since the last write (their `l/` record goes with it).
    woken: Vec<AgentSessionId>,
    /// Pairs away from memory.
    away: u64,
    /// The next write replaces the tree whole (invariant 4).
    replace: bool,
    /// Pairs brought back since this residency began.
    brought_back: u64,
}

impl Residency {
    /// For a view built without this tree (from scratch, or from a file of before): the next
    /// write replaces whatever the tree holds.
    pub(super) fn replacing(tree: sled::Tree) -> Self {
        Residency {
            tree,
            seen_agents: FxHashMap::default(),
            seen_chats: FxHashMap::default(),
            woken: Vec::new(),
            away: 0,
            replace: true,
            brought_back: 0,
        }
    }

    /// Loads a stored view of [`UPCASTS_FROM`] whole (every row in memory, as `VERSION` but
    /// not yet marked), with a residency whose first write replaces the tree. `None`: no view
    /// of that version is stored. Blocking.
    pub(super) fn load_upcast(
        tree: &sled::Tree,
    ) -> Result<Option<(Checkpoint<SessionsView>, Self)>, LogError> {
        let Some(meta) = read_meta(tree)?.filter(|m| m.version == UPCASTS_FROM) else {
            return Ok(None);
        };
        known_layout(meta.layout)?;
        let mut state = meta.state;
        read_all_rows(tree, meta.layout, &mut state)?;
        let checkpoint = Checkpoint {
            name: meta.name,
            version: SessionsView::VERSION,
            seq: meta.seq,
            state,
        };
        Ok(Some((checkpoint, Residency::replacing(tree.clone()))))
    }

    /// Loads the stored view's resident rows only, and the residency that goes with them.
    /// `None`: no view is stored, or one of another version. Blocking.
    pub(super) fn load(
        tree: &sled::Tree,
    ) -> Result<Option<(Checkpoint<SessionsView>, Self)>, LogError> {
        let Some(meta) = read_meta(tree)? else {
            return Ok(None);
        };
        if meta.version != SessionsView::VERSION {
            return Ok(None);
        }
        known_layout(meta.layout)?;
        if meta.layout != LAYOUT {
            // Before buckets: every row comes into memory once, and the next write replaces
            // the tree in buckets, sending the settled pairs away again.
            let mut state = meta.state;
            read_all_rows(tree, meta.layout, &mut state)?;
            let checkpoint = Checkpoint {
                name: meta.name,
                version: meta.version,
                seq: meta.seq,
                state,
            };
            return Ok(Some((checkpoint, Residency::replacing(tree.clone()))));
        }
        let mut residency = Residency {
            replace: false,
            away: meta.away,
            ..Residency::replacing(tree.clone())
        };
        let mut state = meta.state;
        for id in meta.resident_agents {
            let bytes = packed::get(tree, &key(AGENT, &id.0))?
                .ok_or_else(|| damaged(format!("resident agent session {id} has no row")))?;
            let row: AgentSessionRow = decode(&bytes, "an agent session row")?;
            residency.seen_agents.insert(id.clone(), Some(hash(&bytes)));
            state.agent.insert(id, row);
        }
        for id in meta.resident_chats {
            let bytes = packed::get(tree, &key(CHAT, &id.0))?
                .ok_or_else(|| damaged(format!("resident chat session {id} has no row")))?;
            let row: ChatSessionRow = decode(&bytes, "a chat session row")?;
            residency.seen_chats.insert(id.clone(), Some(hash(&bytes)));
            state.chat.insert(id, row);
        }
        let checkpoint = Checkpoint {
            name: meta.name,
            version: meta.version,
            seq: meta.seq,
            state,
        };
        Ok(Some((checkpoint, residency)))
    }

    /// Pairs away from memory.
    pub fn away(&self) -> u64 {
        self.away
    }

    /// Pairs brought back into memory since this residency began.
    pub fn brought_back(&self) -> u64 {
        self.brought_back
    }

    /// Whether agent session `id` is known not to be away: resident, or resident since the
    /// last write (then gone, not away). Memory only.
    pub fn is_resident_agent(&self, s: &SessionsView, id: &AgentSessionId) -> bool {
        s.agent.contains_key(id) || self.seen_agents.contains_key(id)
    }

    /// Whether chat session `id` is known not to be away (see `is_resident_agent`).
    pub fn is_resident_chat(&self, s: &SessionsView, id: &ChatSessionId) -> bool {
        s.chat.contains_key(id) || self.seen_chats.contains_key(id)
    }

    /// Brings back into `s` every pair away that one of these rows belongs to. Blocking (sled
    /// point reads, only for ids neither resident nor seen since the last write).
    pub fn wake(
        &mut self,
        s: &mut SessionsView,
        agents: &[AgentSessionId],
        chats: &[ChatSessionId],
    ) -> Result<(), LogError> {
        if self.replace {
            // Nothing of a tree to be replaced comes back (invariant 4).
            return Ok(());
        }
        for id in agents {
            if !s.agent.contains_key(id) && !self.seen_agents.contains_key(id) {
                if let Some(chat) = packed::get(&self.tree, &key(LINK, &id.0))? {
                    let chat = ChatSessionId(String::from_utf8_lossy(&chat).into_owned());
                    self.bring_back(s, id, &chat)?;
                }
            }
        }
        for id in chats {
            if !s.chat.contains_key(id) && !self.seen_chats.contains_key(id) {
                if let Some(bytes) = packed::get(&self.tree, &key(CHAT, &id.0))? {
                    let row: ChatSessionRow = decode(&bytes, "a chat session row")?;
                    let agent = row.agent_session_id.ok_or_else(|| {
                        damaged(format!("chat session {id} is away but linked to nothing"))
                    })?;
                    self.bring_back(s, &agent, id)?;
                }
            }
        }
        Ok(())
    }

    fn bring_back(
        &mut self,
        s: &mut SessionsView,
        agent_id: &AgentSessionId,
        chat_id: &ChatSessionId,
    ) -> Result<(), LogError> {
        let link = packed::get(&self.tree, &key(LINK, &agent_id.0))?;
        if link.as_deref() != Some(chat_id.0.as_bytes()) {
            return Err(damaged(format!(
                "the pair of agent session {agent_id} and chat session {chat_id} is not away"
            )));
        }
        let (pair, hashes) = self.read_pair(agent_id.clone(), chat_id.clone())?;
        self.seen_agents.insert(agent_id.clone(), Some(hashes.0));
        self.seen_chats.insert(chat_id.clone(), Some(hashes.1));
        self.woken.push(agent_id.clone());
        self.away -= 1;
        self.brought_back += 1;
        if !s.wake(pair) {
            return Err(damaged(format!(
                "a row of the pair of {agent_id} and {chat_id} is both in memory and away"
            )));
        }
        Ok(())
    }

    /// The row of agent session `id` if it is away from memory. Blocking: one read, of its
    /// record (every record of a row neither resident nor seen since the last write is of a
    /// pair away: a write keeps the rows of the view and of the pairs away, and removes the
    /// rest; the link is read only to bring it back, where a record without one is damage).
    fn away_agent(
        &self,
        s: &SessionsView,
        id: &AgentSessionId,
    ) -> Result<Option<AgentSessionRow>, LogError> {
        if self.replace || self.is_resident_agent(s, id) {
            return Ok(None);
        }
        let bytes = packed::get(&self.tree, &key(AGENT, &id.0))?;
        bytes
            .map(|b| decode(&b, "an agent session row"))
            .transpose()
    }

    /// The row of chat session `id` if it is away from memory. Blocking.
    fn away_chat(
        &self,
        s: &SessionsView,
        id: &ChatSessionId,
    ) -> Result<Option<ChatSessionRow>, LogError> {
        if self.replace || self.is_resident_chat(s, id) {
            return Ok(None);
        }
        let Some(bytes) = packed::get(&self.tree, &key(CHAT, &id.0))? else {
            return Ok(None);
        };
        let row: ChatSessionRow = decode(&bytes, "a chat session row")?;
        // Away only as half of a pair whose link names it (invariant 3).
        let linked = match &row.agent_session_id {
            Some(a) => packed::get(&self.tree, &key(LINK, &a.0))?,
            None => None,
        };
        Ok((linked.as_deref() == Some(id.0.as_bytes())).then_some(row))
    }

    /// The pairs away from memory, by a scan of their links. Blocking.
    fn away_pairs<'a>(
        &'a self,
        s: &'a SessionsView,
    ) -> impl Iterator<Item = Result<(AgentSessionId, ChatSessionId), LogError>> + 'a {
        // A tree to be replaced has nothing away (invariant 4).
        let all = if self.replace { 0 } else { usize::MAX };
        packed::scan(&self.tree, LINK)
            .take(all)
            .filter_map(move |item| {
                let (k, v) = match item {
                    Ok(kv) => kv,
                    Err(e) => return Some(Err(e)),
                };
                let agent = AgentSessionId(String::from_utf8_lossy(&k[LINK.len()..]).into_owned());
                let chat = ChatSessionId(String::from_utf8_lossy(&v).into_owned());
                (!self.is_resident_agent(s, &agent)).then_some(Ok((agent, chat)))
            })
    }

    /// Every pair away from memory, read back. Blocking.
    pub(super) fn away_all(&self, s: &SessionsView) -> Result<Vec<SettledPair>, LogError> {
        let mut out = Vec::new();
        for pair in self.away_pairs(s) {
            let (agent_id, chat_id) = pair?;
            out.push(self.read_pair(agent_id, chat_id)?.0);
        }
        Ok(out)
    }

    /// Whether chat session `id` is on disk, for a retention sweep; a row that cannot be read
    /// counts as there (its entries stay). Blocking.
    pub fn chat_away(&self, s: &SessionsView, id: &ChatSessionId) -> bool {
        self.away_chat(s, id).map_or(true, |row| row.is_some())
    }

    /// Readies an agent listing begun at `as_of` for comparison with the resident view: a pair
    /// away whose agent session it reports unchanged is left away and taken out of the listing
    /// (comparing it would find nothing); one it reports changed, or, when the listing is
    /// `complete`, one it lacks, is brought back, so that the comparison sees it. `ours` is
    /// the listing's filter of the sessions this worker mirrors. Blocking: reads the tree for
    /// each listed session not resident (but, in a listing of changes, not for one it reads
    /// again exactly as last folded: `projections::margin`), and scans the links when
    /// complete.
    pub fn ready_agent_listing(
        &mut self,
        s: &mut SessionsView,
        listed: &mut Vec<AgentSessionInfo>,
        complete: bool,
        as_of: u64,
        ours: impl Fn(&AgentSessionInfo) -> bool,
    ) -> Result<(), LogError> {
        let mut back = Vec::new();
        let mut unchanged = FxHashSet::default();
        for info in listed.iter().filter(|i| ours(i)) {
            let id = &info.agent_session_id;
            // Read again within the cursor's margin, exactly as folded: nothing to read. A
            // complete listing, the safety net, always compares.
            if !complete && !self.is_resident_agent(s, id) && s.agent_margin.is_last_folded(info) {
                unchanged.insert(id.clone());
                continue;
            }
            if let Some(row) = self.away_agent(s, id)? {
                if is_news_to_agent_row(&row, info, as_of) {
                    back.push(id.clone());
                } else {
                    unchanged.insert(id.clone());
                }
            }
        }
        if complete {
            let all: FxHashSet<&AgentSessionId> = listed
                .iter()
                .filter(|i| ours(i))
                .map(|i| &i.agent_session_id)
                .collect();
            for pair in self.away_pairs(s) {
                let (agent, _) = pair?;
                if !all.contains(&agent) {
                    back.push(agent);
                }
            }
        }
        listed.retain(|i| !unchanged.contains(&i.agent_session_id));
        self.wake(s, &back, &[])
    }

    /// Readies a backend listing of chat sessions begun at `as_of`, as
    /// [`Residency::ready_agent_listing`] does an agent listing. Blocking.
    pub fn ready_backend_listing(
        &mut self,
        s: &mut SessionsView,
        listed: &mut Vec<ChatSessionInfo>,
        complete: bool,
        as_of: u64,
    ) -> Result<(), LogError> {
        let mut back = Vec::new();
        let mut unchanged = FxHashSet::default();
        for info in listed.iter() {
            let id = &info.chat_session_id;
            if let Some(row) = self.away_chat(s, id)? {
                if is_news_to_chat_row(&row, info, as_of) {
                    back.push(id.clone());
                } else {
                    unchanged.insert(id.clone());
                }
            }
        }
        if complete {
            let all: FxHashSet<&ChatSessionId> =
                listed.iter().map(|i| &i.chat_session_id).collect();
            for pair in self.away_pairs(s) {
                let (_, chat) = pair?;
                if !all.contains(&chat) {
                    back.push(chat);
                }
            }
        }
        listed.retain(|i| !unchanged.contains(&i.chat_session_id));
        self.wake(s, &[], &back)
    }

    /// The stored rows of a pair, with the hashes of their bytes. Blocking.
    fn read_pair(
        &self,
        agent_id: AgentSessionId,
        chat_id: ChatSessionId,
    ) -> Result<(SettledPair, (u64, u64)), LogError> {
        let agent = packed::get(&self.tree, &key(AGENT, &agent_id.0))?;
        let chat = packed::get(&self.tree, &key(CHAT, &chat_id.0))?;
        let (Some(agent), Some(chat)) = (agent, chat) else {
            return Err(damaged(format!("the pair of {agent_id} lacks a row")));
        };
        let pair = SettledPair {
            agent: decode(&agent, "an agent session row")?,
            chat: decode(&chat, "a chat session row")?,
            agent_id,
            chat_id,
        };
        Ok((pair, (hash(&agent), hash(&chat))))
    }

    /// Writes the view at its seq in one batch: the rows changed since the last write, the
    /// rows gone, the meta; then sends `settled` away from memory. Blocking.
    pub fn write(
        &mut self,
        tracked: &mut Tracked<SessionsView>,
        settled: &[(AgentSessionId, ChatSessionId)],
    ) -> Result<(), LogError> {
        let s = &tracked.state;
        let mut batch = Writes::default();
        let mut seen_agents = FxHashMap::default();
        for (id, row) in &s.agent {
            let bytes = encode(row);
            let h = hash(&bytes);
            let k = key(AGENT, &id.0);
            if self.replace || self.seen_agents.get(id) != Some(&Some(h)) {
                batch.insert(k, bytes);
            }
            seen_agents.insert(id.clone(), Some(h));
        }
        let mut seen_chats = FxHashMap::default();
        for (id, row) in &s.chat {
            let bytes = encode(row);
            let h = hash(&bytes);
            let k = key(CHAT, &id.0);
            if self.replace || self.seen_chats.get(id) != Some(&Some(h)) {
                batch.insert(k, bytes);
            }
            seen_chats.insert(id.clone(), Some(h));
        }
        for id in self
            .seen_agents
            .keys()
            .filter(|id| !s.agent.contains_key(*id))
        {
            batch.remove(key(AGENT, &id.0));
        }
        for id in self
            .seen_chats
            .keys()
            .filter(|id| !s.chat.contains_key(*id))
        {
            batch.remove(key(CHAT, &id.0));
        }
        for id in &self.woken {
            batch.remove(key(LINK, &id.0));
        }
        let leaving: Vec<&(AgentSessionId, ChatSessionId)> = settled
            .iter()
            .filter(|(a, c)| s.agent.contains_key(a) && s.chat.contains_key(c))
            .collect();
        for (a, c) in &leaving {
            batch.insert(key(LINK, &a.0), c.0.as_bytes());
        }
        let gone_a: std::collections::HashSet<&AgentSessionId> =
            leaving.iter().map(|(a, _)| a).collect();
        let gone_c: std::collections::HashSet<&ChatSessionId> =
            leaving.iter().map(|(_, c)| c).collect();
        let meta = Meta {
            name: SessionsView::NAME.to_owned(),
            version: SessionsView::VERSION,
            seq: tracked.seq,
            state: without_rows(s),
            resident_agents: s
                .agent
                .keys()
                .filter(|a| !gone_a.contains(a))
                .cloned()
                .collect(),
            resident_chats: s
                .chat
                .keys()
                .filter(|c| !gone_c.contains(c))
                .cloned()
                .collect(),
            away: self.away + leaving.len() as u64,
            layout: LAYOUT,
        };
        // Invariant 4: a replacing write leaves nothing of another start.
        commit(&self.tree, batch, encode(&meta), self.replace)?;
        let leaving: Vec<(AgentSessionId, ChatSessionId)> = leaving.into_iter().cloned().collect();
        for (a, c) in &leaving {
            tracked.state.evict(a, c);
            seen_agents.remove(a);
            seen_chats.remove(c);
        }
        self.away = meta.away;
        self.seen_agents = seen_agents;
        self.seen_chats = seen_chats;
        self.woken.clear();
        self.replace = false;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A write too large for one batch goes in pieces of at most `BATCH_WRITES` and
    /// `BATCH_BYTES`, every write once and in order.
    #[test]
    fn a_large_write_goes_in_pieces_every_write_once_in_order() {
        let write = |i: usize| (format!("a/{i:06}").into_bytes(), Some(vec![7; 100]));
        let small: Vec<packed::Write> = (0..10).map(write).collect();
        assert!(fits_one_batch(&small));
        assert_eq!(pieces(small.clone()).collect::<Vec<_>>(), vec![small]);

        let large: Vec<packed::Write> = (0..2 * BATCH_WRITES + 7).map(write).collect();
        assert!(!fits_one_batch(&large));
        let many: Vec<_> = pieces(large.clone()).collect();
        assert_eq!(many.len(), 3);
        assert!(many.iter().all(|p| p.len() <= BATCH_WRITES));
        assert_eq!(many.concat(), large, "every write once, in order");

        // And by bytes: two writes over the limit together go apart.
        let big = |i: usize| {
            (
                format!("a/{i}").into_bytes(),
                Some(vec![0; BATCH_BYTES / 2 + 1]),
            )
        };
        assert_eq!(pieces((0..2).map(big)).count(), 2);
    }

    /// Invariant 5 at the tree: a staged write cut before its mark is dropped by the next
    /// open, one cut after it is finished, and a stage that does not hold as many records as
    /// its mark says is damage, not a view.
    #[test]
    fn a_staged_write_is_dropped_before_its_mark_and_finished_after_it() {
        let dir = tempfile::tempdir().unwrap();
        let db = sled::Config::new()
            .temporary(true)
            .path(dir.path())
            .open()
            .unwrap();
        let tree = db.open_tree(TREE).unwrap();
        tree.insert(META, b"old".to_vec()).unwrap();
        let ops: Vec<packed::Write> = (0..3)
            .map(|i| (format!("a/{i}").into_bytes(), Some(vec![i as u8])))
            .chain([(META.to_vec(), Some(b"new".to_vec()))])
            .collect();
        let stage = |tree: &sled::Tree| {
            for (k, v) in &ops {
                tree.insert(staged_key(k), staged_value(v)).unwrap();
            }
        };
        stage(&tree);
        // Never applied, so whatever its records hold (found in review: one damaged record
        // of an unmarked stage set the view aside).
        tree.insert(staged_key(b"a/9"), &[9u8][..]).unwrap();
        finish_staged(&tree).unwrap();
        assert_eq!(
            tree.get(META).unwrap().unwrap(),
            b"old"[..],
            "no mark: dropped"
        );
        assert_eq!(tree.len(), 1);

        stage(&tree);
        tree.insert(STAGED_WHOLE, &4u64.to_be_bytes()[..]).unwrap();
        finish_staged(&tree).unwrap();
        assert_eq!(
            tree.get(META).unwrap().unwrap(),
            b"new"[..],
            "marked: finished"
        );
        assert_eq!(tree.get(b"a/2").unwrap().unwrap(), [2u8][..]);
        assert_eq!(tree.len(), 4, "the mark and the staged records gone");

        stage(&tree);
        tree.insert(STAGED_WHOLE, &5u64.to_be_bytes()[..]).unwrap();
        let err = finish_staged(&tree).unwrap_err().to_string();
        assert!(err.contains("not as many as marked"), "{err}");
    }
}
