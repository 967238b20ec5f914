//! One adversarial history, generated from a seed: the starting state of both sides, the
//! faults of each, what the world does meanwhile, and when the worker's process dies.

use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

use crate::clock::Millis;
use crate::sim::Faults;

/// Simulated time at which every history starts.
pub const T0: Millis = 1_763_700_000_000;

/// The call timeout the simulated worker is given (ms): late replies come after it.
pub const CALL_TIMEOUT_MS: Millis = 2_000;

/// The prompt timeout the simulated worker is given (ms).
pub const PROMPT_TIMEOUT_MS: Millis = 15_000;

/// The message deadline the simulated worker is given (ms).
pub const MESSAGE_DEADLINE_MS: Millis = 6 * 60_000;

const MINUTE: Millis = 60_000;

/// What the world does at some moment of the faulty phase.
#[derive(Debug, Clone, PartialEq)]
pub enum WorldAction {
    /// A user writes a message in an existing chat session.
    UserMessage {
        /// The chat session.
        chat: String,
        /// The message's id.
        message: String,
        /// Its text.
        text: String,
    },
    /// A user opens a new chat session (no agent session yet) with a first message.
    NewChat {
        /// The chat session's id.
        chat: String,
        /// The first message's id.
        message: String,
    },
    /// Someone renames an agent session in the agent's own UI.
    AgentRename {
        /// The agent session.
        agent: String,
        /// The new title.
        title: String,
    },
    /// Someone deletes an agent session in the agent's own UI.
    AgentDelete {
        /// The agent session.
        agent: String,
    },
    /// Someone starts a new agent session in the agent's own UI.
    AgentNew {
        /// The agent session.
        agent: String,
    },
    /// The worker's wall clock is stepped (ms, negative: back).
    ClockStep {
        /// The step.
        delta_ms: i64,
    },
    /// The agent server restarts: a new generation, down for a moment, what ran is lost.
    AgentRestart {
        /// How long it refuses calls.
        down_ms: Millis,
    },
}

/// A world action and when it happens (ms after [`T0`], true time).
#[derive(Debug, Clone, PartialEq)]
pub struct Timed {
    /// When.
    pub at: Millis,
    /// What.
    pub action: WorldAction,
}

/// How the agent's event stream misbehaves.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StreamFaults {
    /// Probability that a report is delivered twice.
    pub duplicate_rate: f64,
    /// Each report is delivered after a uniform delay up to this (ms): later reports overtake
    /// earlier ones.
    pub max_delay_ms: Millis,
}

impl StreamFaults {
    /// A stream that delivers each report once, in order, at once.
    pub const CALM: StreamFaults = StreamFaults {
        duplicate_rate: 0.0,
        max_delay_ms: 0,
    };
}

/// One generated history.
#[derive(Debug, Clone, PartialEq)]
pub struct Scenario {
    /// The seed it came from.
    pub seed: u64,
    /// Chat sessions linked to agent sessions.
    pub linked: usize,
    /// Chat sessions whose agent session is gone.
    pub orphans: usize,
    /// Agent sessions with no chat session.
    pub new_agents: usize,
    /// Linked sessions whose agent title differs.
    pub renamed: usize,
    /// User messages older than the retry window.
    pub stale: usize,
    /// Fresh user messages.
    pub fresh: usize,
    /// Messages that overflow the model's context.
    pub overflow: usize,
    /// Chat sessions with a message and no agent session yet.
    pub lazy: usize,
    /// The agent server's faults.
    pub agent: Faults,
    /// The backend's faults.
    pub backend: Faults,
    /// The event stream's faults.
    pub stream: StreamFaults,
    /// What the world does, in time order.
    pub actions: Vec<Timed>,
    /// When the worker's process dies (ms after [`T0`], in order).
    pub crashes: Vec<Millis>,
    /// How long the faults last (ms after [`T0`]).
    pub faulty_ms: Millis,
}

impl Scenario {
    /// The history of `seed`: a pure function of it.
    pub fn generate(seed: u64) -> Scenario {
        let mut rng = SmallRng::seed_from_u64(seed);
        let linked = rng.random_range(1..10);
        let faulty_ms = rng.random_range(3 * MINUTE..=15 * MINUTE);
        let mut s = Scenario {
            seed,
            linked,
            orphans: rng.random_range(0..3),
            new_agents: rng.random_range(0..5),
            renamed: rng.random_range(0..=linked.min(3)),
            stale: rng.random_range(0..3),
            fresh: rng.random_range(0..5),
            overflow: rng.random_range(0..2),
            lazy: rng.random_range(0..3),
            agent: faults(&mut rng, faulty_ms, true),
            backend: faults(&mut rng, faulty_ms, false),
            stream: StreamFaults {
                duplicate_rate: maybe(&mut rng, 0.3),
                max_delay_ms: rng.random_range(0..=4_000),
            },
            actions: Vec::new(),
            crashes: Vec::new(),
            faulty_ms,
        };
        s.actions = actions(&mut rng, &s);
        let crashes = rng.random_range(0..=2);
        s.crashes = sorted((0..crashes).map(|_| rng.random_range(500..faulty_ms)));
        s
    }

    /// The chat sessions that exist from the start.
    pub fn chats(&self) -> impl Iterator<Item = String> + '_ {
        let linked = (0..self.linked).map(|i| format!("chat_{i}"));
        linked.chain((0..self.lazy).map(|i| format!("chat_lazy_{i}")))
    }

    /// The agent sessions that exist from the start.
    pub fn agents(&self) -> impl Iterator<Item = String> + '_ {
        let linked = (0..self.linked).map(|i| format!("ses_{i}"));
        linked.chain((0..self.new_agents).map(|i| format!("ses_new_{i}")))
    }

    /// How many world actions of a kind it holds.
    pub fn count(&self, kind: fn(&WorldAction) -> bool) -> usize {
        self.actions.iter().filter(|t| kind(&t.action)).count()
    }
}

fn sorted(times: impl Iterator<Item = Millis>) -> Vec<Millis> {
    let mut v: Vec<Millis> = times.collect();
    v.sort_unstable();
    v
}

/// `p` drawn uniformly in `0..max`, or 0 half the time: many histories have a fault off.
fn maybe(rng: &mut SmallRng, max: f64) -> f64 {
    if rng.random_bool(0.5) {
        0.0
    } else {
        rng.random_range(0.0..max)
    }
}

fn listings(rng: &mut SmallRng) -> Vec<u32> {
    let n = rng.random_range(0..3);
    (0..n).map(|_| rng.random_range(1..12)).collect()
}

fn faults(rng: &mut SmallRng, faulty_ms: Millis, agent: bool) -> Faults {
    let outages = (0..rng.random_range(0..=2))
        .map(|_| {
            let from = T0 + rng.random_range(0..faulty_ms);
            (from, from + rng.random_range(1_000..=3 * MINUTE))
        })
        .collect();
    Faults {
        latency_ms: (rng.random_range(1..10), rng.random_range(10..60)),
        model_list_ms: 100,
        error_rate: maybe(rng, 0.2),
        outages,
        failed_listings: listings(rng),
        partial_listings: listings(rng),
        lost_reply_rate: maybe(rng, 0.25),
        late_reply_rate: maybe(rng, 0.15),
        late_reply_ms: rng.random_range(PROMPT_TIMEOUT_MS + 1_000..=PROMPT_TIMEOUT_MS * 2),
        stale_read_rate: maybe(rng, 0.3),
        stale_read_ms: rng.random_range(500..=5_000),
        model_run_ms: if agent { (200, 6_000) } else { (0, 0) },
        seed: rng.random(),
    }
}

/// What the world does during the faulty phase.
fn actions(rng: &mut SmallRng, s: &Scenario) -> Vec<Timed> {
    let mut chats: Vec<String> = s.chats().collect();
    let mut agents: Vec<String> = s.agents().collect();
    let n = rng.random_range(0..14);
    let times = sorted((0..n).map(|_| rng.random_range(0..s.faulty_ms)));
    let mut out = Vec::new();
    for (k, at) in times.into_iter().enumerate() {
        let action = match rng.random_range(0..10) {
            0..=2 => WorldAction::UserMessage {
                chat: chats[rng.random_range(0..chats.len())].clone(),
                message: format!("live_{k}"),
                text: if rng.random_bool(0.1) {
                    "[overflow]".into()
                } else {
                    format!("question {k}")
                },
            },
            3 => {
                chats.push(format!("chat_new_{k}"));
                WorldAction::NewChat {
                    chat: format!("chat_new_{k}"),
                    message: format!("first_{k}"),
                }
            }
            4 => WorldAction::AgentRename {
                agent: agents[rng.random_range(0..agents.len())].clone(),
                title: format!("renamed {k}"),
            },
            5 => WorldAction::AgentDelete {
                agent: agents[rng.random_range(0..agents.len())].clone(),
            },
            6 => {
                agents.push(format!("ses_later_{k}"));
                WorldAction::AgentNew {
                    agent: format!("ses_later_{k}"),
                }
            }
            7 => {
                let minutes = rng.random_range(1..=10) * MINUTE as i64;
                WorldAction::ClockStep {
                    delta_ms: if rng.random_bool(0.5) {
                        minutes
                    } else {
                        -minutes
                    },
                }
            }
            _ => WorldAction::AgentRestart {
                down_ms: rng.random_range(200..=5_000),
            },
        };
        out.push(Timed { at, action });
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_seed_always_gives_the_same_history_and_seeds_differ() {
        assert_eq!(Scenario::generate(42), Scenario::generate(42));
        assert_ne!(Scenario::generate(42), Scenario::generate(43));
        let s = Scenario::generate(7);
        assert!(s.actions.windows(2).all(|w| w[0].at <= w[1].at));
        assert!(s.crashes.iter().all(|c| *c < s.faulty_ms));
    }
}
