//! Multi-turn history: what an agent remembers between runs of one session.
//!
//! A turn is the user's input and the agent's final answer, both as JSON
//! text; the tool calls in between stay in each run's trace, not in the
//! history. Persistence in the store comes later; this is the in-memory shape.

use serde_json::Value;

use crate::model::{Message, Role};
use crate::step_loop::AgentRun;

/// The turns of one session, oldest first, keeping at most `max_turns`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionHistory {
    messages: Vec<Message>,
    max_turns: usize,
}

impl SessionHistory {
    /// An empty history that keeps the last `max_turns` turns (at least one).
    pub fn new(max_turns: usize) -> SessionHistory {
        SessionHistory {
            messages: Vec::new(),
            max_turns: max_turns.max(1),
        }
    }

    /// The messages to pass to the next run, oldest first.
    pub fn messages(&self) -> &[Message] {
        &self.messages
    }

    /// How many turns are kept.
    pub fn turns(&self) -> usize {
        self.messages.len() / 2
    }

    /// Appends one turn, dropping the oldest beyond the bound.
    pub fn push_turn(&mut self, user: String, assistant: String) {
        self.messages.push(Message::new(Role::User, user));
        self.messages.push(Message::new(Role::Assistant, assistant));
        let excess = self.turns().saturating_sub(self.max_turns);
        self.messages.drain(..excess * 2);
    }

    /// Records a run as a turn when it produced an output; a run that ended
    /// without one leaves the history as it was. Returns whether it was recorded.
    pub fn record_run(&mut self, input: &Value, run: &AgentRun) -> bool {
        let Some(output) = &run.output else {
            return false;
        };
        self.push_turn(input.to_string(), output.to_string());
        true
    }
}
