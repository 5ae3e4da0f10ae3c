//! Download admission: a node pushes no more updates at once than it has download slots,
//! plus a small margin; the other agents' tasks wait as `queued`, in order, and are
//! pushed as slots free. `/downloads` keeps its `503 Retry-After` as the guard for
//! anything else. A slot is held from the push until the agent has the bytes (it reports
//! verifying or later), its task ends, or its session does.

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;

#[derive(Debug)]
pub(crate) struct Admission {
    limit: usize,
    state: Mutex<Slots>,
}

/// Each operation costs O(log n) in the agents waiting: the line is as long as the
/// fleet during a rollout, and every check of a waiting agent asks for a slot.
#[derive(Debug, Default)]
struct Slots {
    held: usize,
    /// Agents with a queued task, by their turn: first come first served.
    line: BTreeMap<u64, String>,
    /// Each agent in line, to its turn.
    turns: HashMap<String, u64>,
    next_turn: u64,
}

impl Slots {
    fn join(&mut self, agent: &str) {
        if !self.turns.contains_key(agent) {
            let turn = self.next_turn;
            self.next_turn += 1;
            self.turns.insert(agent.to_owned(), turn);
            self.line.insert(turn, agent.to_owned());
        }
    }

    fn remove(&mut self, agent: &str) {
        if let Some(turn) = self.turns.remove(agent) {
            self.line.remove(&turn);
        }
    }

    fn pop_front(&mut self) -> Option<String> {
        let (_, agent) = self.line.pop_first()?;
        self.turns.remove(&agent);
        Some(agent)
    }
}

impl Admission {
    /// For `download_slots` concurrent downloads: a tenth more pushes (at least one),
    /// so a slot freed is taken at once by an agent already on its way.
    pub(crate) fn new(download_slots: usize) -> Admission {
        Admission {
            limit: download_slots + (download_slots / 10).max(1),
            state: Mutex::default(),
        }
    }

    fn slots(&self) -> std::sync::MutexGuard<'_, Slots> {
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Takes a slot for `agent` if one is free; otherwise puts it in line (once).
    pub(crate) fn try_take(&self, agent: &str) -> bool {
        let mut slots = self.slots();
        if slots.held < self.limit {
            slots.held += 1;
            slots.remove(agent);
            return true;
        }
        slots.join(agent);
        false
    }

    /// Takes a slot whatever the limit: a download that was under way before a
    /// reconnect goes on.
    pub(crate) fn take_anyway(&self) {
        self.slots().held += 1;
    }

    /// Gives a slot back; answers the agent first in line, taken out of it, to be
    /// checked again (it takes the slot, or goes back in line).
    pub(crate) fn give_back(&self) -> Option<String> {
        let mut slots = self.slots();
        slots.held = slots.held.saturating_sub(1);
        Admission::next(&mut slots, self.limit)
    }

    /// An agent that went away, or needs no slot any more, leaves the line; answers the
    /// next agent to check while a slot is free.
    pub(crate) fn leave(&self, agent: &str) -> Option<String> {
        let mut slots = self.slots();
        slots.remove(agent);
        Admission::next(&mut slots, self.limit)
    }

    fn next(slots: &mut Slots, limit: usize) -> Option<String> {
        if slots.held < limit {
            slots.pop_front()
        } else {
            None
        }
    }

    /// Agents waiting in line.
    pub(crate) fn waiting(&self) -> usize {
        self.slots().line.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pushes_stop_at_the_slots_and_freed_slots_go_to_the_line_in_order() {
        let admission = Admission::new(2);
        // 2 slots and a margin of 1.
        assert!(admission.try_take("a"));
        assert!(admission.try_take("b"));
        assert!(admission.try_take("c"));
        assert!(!admission.try_take("d"));
        assert!(!admission.try_take("e"));
        assert!(!admission.try_take("d"), "asking again keeps its place");
        assert_eq!(admission.waiting(), 2);
        // A freed slot wakes the first in line.
        assert_eq!(admission.give_back(), Some("d".into()));
        assert!(admission.try_take("d"));
        assert_eq!(admission.waiting(), 1);
        // Leaving the line while a slot is free hands the turn on.
        assert_eq!(admission.give_back(), Some("e".into()));
        assert_eq!(admission.leave("e"), None);
        assert!(admission.try_take("f"));
        admission.take_anyway();
        assert!(!admission.try_take("g"));
        assert_eq!(admission.leave("g"), None, "no slot free: nobody to wake");
    }

    #[test]
    fn the_line_keeps_its_order_through_leaves_and_returns() {
        let admission = Admission::new(1);
        // 1 slot and a margin of 1, both taken.
        assert!(admission.try_take("x"));
        assert!(admission.try_take("y"));
        for agent in ["a", "b", "c", "d"] {
            assert!(!admission.try_take(agent));
        }
        // No slot free: nobody is woken, but "b" is out of the line.
        assert_eq!(admission.leave("b"), None);
        assert!(!admission.try_take("c"), "asking again keeps its place");
        // "b" comes back: behind everyone already waiting.
        assert!(!admission.try_take("b"));
        assert_eq!(admission.waiting(), 4);
        // Each slot freed wakes the first in line, which takes it.
        let mut served = Vec::new();
        while let Some(next) = admission.give_back() {
            assert!(
                admission.try_take(&next),
                "the woken agent takes the freed slot"
            );
            served.push(next);
        }
        assert_eq!(served, ["a", "c", "d", "b"]);
        // The slot freed with nobody in line wakes nobody.
        assert_eq!(admission.give_back(), None);
        assert_eq!(admission.waiting(), 0);
    }
}
