//! Property tests of the foundation, over generated event histories (see `agentsync::testkit`).
//!
//! (a) a checkpoint taken at any point, stored and loaded, plus catch-up equals a rebuild;
//! (b) append/read round-trips keep order and content across reopen, by range and by session;
//! (c) an upcast v1 history folds to the same state as its v2 equivalent;
//! (d) `rebuild --verify` finds no difference on any generated log.

use agentsync::events::{upcast::AgentSessionInfoV1, Envelope, Event, Source};
use agentsync::log::{
    load_views, verify_checkpoint, CheckpointPolicy, EventLog, LiveViews, LogOptions, ReadFilter,
    Verification,
};
use agentsync::projections::{ProjectionName, Views};
use agentsync::testkit::{History, PromptOutcome, Step};
use proptest::prelude::*;

const START: u64 = 1_763_700_000_000;

fn step() -> impl Strategy<Value = Step> {
    let outcome = prop_oneof![
        6 => Just(PromptOutcome::Answered),
        2 => Just(PromptOutcome::RetriedThenAnswered),
        1 => Just(PromptOutcome::Terminal),
        1 => Just(PromptOutcome::Dead),
    ];
    let source = prop_oneof![Just(Source::Agent), Just(Source::Backend)];
    prop_oneof![
        4 => Just(Step::NewAgentSession),
        2 => any::<u16>().prop_map(Step::Rename),
        3 => (any::<u16>(), any::<bool>()).prop_map(|(i, b)| Step::Status(i, b)),
        4 => any::<u16>().prop_map(Step::UserMessage),
        4 => outcome.prop_map(Step::Prompt),
        2 => (source.clone(), any::<bool>()).prop_map(|(s, c)| Step::Listing(s, c)),
        1 => source.prop_map(Step::ObservationFailed),
        1 => any::<u16>().prop_map(Step::Gone),
        1 => Just(Step::Models),
        1 => any::<u16>().prop_map(Step::Backfill),
        1 => Just(Step::Lifecycle),
    ]
}

fn history() -> impl Strategy<Value = Vec<Step>> {
    prop::collection::vec(step(), 0..120)
}

/// Events as the log would store them (seq from 1), without touching disk.
fn stored(steps: &[Step]) -> Vec<Envelope> {
    History::of(steps, START)
        .into_iter()
        .enumerate()
        .map(|(i, n)| Envelope {
            seq: i as u64 + 1,
            id: n.id,
            at: n.at,
            v: n.event.kind().version(),
            event: n.event,
            cause: n.cause,
        })
        .collect()
}

fn fold(events: &[Envelope]) -> Views {
    let mut v = Views::default();
    events.iter().for_each(|e| v.apply(e));
    v
}

fn create() -> LogOptions {
    LogOptions {
        create: true,
        ..LogOptions::default()
    }
}

fn write(dir: &std::path::Path, steps: &[Step], batch: usize) -> (EventLog, Vec<Envelope>) {
    let log = EventLog::open(dir, &create()).unwrap();
    let mut out = Vec::new();
    let mut events = History::of(steps, START).into_iter().peekable();
    while events.peek().is_some() {
        out.extend(log.append(events.by_ref().take(batch).collect()).unwrap());
    }
    (log, out)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    /// (a), pure: the checkpoint goes through its JSON form, as on disk.
    #[test]
    fn checkpoint_then_catch_up_equals_rebuild(steps in history(), cut in any::<prop::sample::Index>()) {
        let events = stored(&steps);
        let k = if events.is_empty() { 0 } else { cut.index(events.len() + 1) };
        let early = fold(&events[..k]);
        let json = serde_json::to_vec(&early.sessions.checkpoint()).unwrap();
        let mut resumed = Views {
            sessions: agentsync::projections::Tracked::from_checkpoint(serde_json::from_slice(&json).unwrap()),
            messages: agentsync::projections::Tracked::from_checkpoint(
                serde_json::from_slice(&serde_json::to_vec(&early.messages.checkpoint()).unwrap()).unwrap()),
            commands: agentsync::projections::Tracked::from_checkpoint(
                serde_json::from_slice(&serde_json::to_vec(&early.commands.checkpoint()).unwrap()).unwrap()),
        };
        // Applying everything again must skip what the checkpoint already holds.
        events.iter().for_each(|e| resumed.apply(e));
        prop_assert_eq!(resumed, fold(&events));
    }

    /// (c): every agent_session_seen/changed stored as v1 instead.
    #[test]
    fn upcast_v1_history_folds_like_v2(steps in history()) {
        let v2 = stored(&steps);
        let v1: Vec<Envelope> = v2.iter().map(|e| {
            let mut raw = serde_json::to_value(e).unwrap();
            if let Event::AgentSessionSeen(b) | Event::AgentSessionChanged(b) = &e.event {
                raw["v"] = 1.into();
                raw["body"] = serde_json::to_value(AgentSessionInfoV1::from(b)).unwrap();
            }
            Envelope::decode(&serde_json::to_vec(&raw).unwrap()).unwrap()
        }).collect();
        prop_assert_eq!(&v1, &v2);
        prop_assert_eq!(fold(&v1), fold(&v2));
    }
}

proptest! {
    // Each case opens real sled databases on disk: fewer cases.
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]

    /// (b): batches of any size, then reopen, read by range and by session.
    #[test]
    fn append_read_round_trips_across_reopen(steps in history(), batch in 1usize..40, from in 1u64..50) {
        let dir = tempfile::tempdir().unwrap();
        let (log, appended) = write(dir.path(), &steps, batch);
        prop_assert_eq!(appended.iter().map(|e| e.seq).collect::<Vec<_>>(), (1..=appended.len() as u64).collect::<Vec<_>>());
        drop(log);
        let log = EventLog::open(dir.path(), &LogOptions::default()).unwrap();
        prop_assert_eq!(log.last_seq(), appended.len() as u64);
        let read: Vec<Envelope> = log.read(ReadFilter::default()).collect::<Result<_, _>>().unwrap();
        prop_assert_eq!(&read, &appended);
        let tail: Vec<Envelope> = log.read(ReadFilter::from(from)).collect::<Result<_, _>>().unwrap();
        prop_assert_eq!(&tail[..], &appended[(from as usize - 1).min(appended.len())..]);
        if let Some(session) = appended.iter().flat_map(|e| e.event.session_ids()).next() {
            let by_session: Vec<Envelope> = log
                .read(ReadFilter { session: Some(session.to_owned()), ..ReadFilter::default() })
                .collect::<Result<_, _>>()
                .unwrap();
            let want: Vec<&Envelope> = appended.iter().filter(|e| e.event.session_ids().contains(&session)).collect();
            prop_assert_eq!(by_session.iter().collect::<Vec<_>>(), want);
        }
    }

    /// (a) through the real store, and (d): checkpoints written live at any point verify clean,
    /// and a restart from them equals a rebuild.
    #[test]
    fn live_checkpoints_verify_and_restart_like_a_rebuild(steps in history(), cut in any::<prop::sample::Index>()) {
        let dir = tempfile::tempdir().unwrap();
        let events = History::of(&steps, START);
        let k = cut.index(events.len() + 1);
        let log = EventLog::open(dir.path(), &create()).unwrap();
        let (mut live, _) = LiveViews::open(&log, CheckpointPolicy::default(), START).unwrap();
        let (head, tail) = events.split_at(k);
        live.apply(&log.append(head.to_vec()).unwrap()).unwrap();
        live.write_checkpoints(&log, START).unwrap();
        live.apply(&log.append(tail.to_vec()).unwrap()).unwrap();
        for p in ProjectionName::ALL {
            let found = verify_checkpoint(&log, p, |_| {}).unwrap();
            prop_assert!(matches!(found, Verification::Matches { .. }), "{p}: {found:?}");
        }
        let (restarted, catch_up) = load_views(&log, None, None, false, |_| {}).unwrap();
        let (rebuilt, _) = load_views(&log, None, None, true, |_| {}).unwrap();
        prop_assert_eq!(&restarted, &rebuilt);
        // The live views keep settled pairs on disk (`log::rows`): with them read back, the same.
        prop_assert_eq!(&restarted, &live.merged().unwrap());
        // The tail, plus one `checkpoint_written` event per projection, recorded after them.
        prop_assert_eq!(catch_up.applied, (tail.len() + ProjectionName::ALL.len()) as u64);
    }
}
