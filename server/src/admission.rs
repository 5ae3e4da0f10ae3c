//! Download admission: a node pushes no more updates at once than it has download slots,
//! plus a small margin; the other agents' tasks wait as `queued`, in order, and are
//! pushed as slots free. `/downloads` keeps its `503 Retry-After` as the guard for
//! anything else. A slot is held from the push until the agent has the bytes (it reports
//! verifying or later), its task ends, or its session does.

use std::collections::VecDeque;
use std::sync::Mutex;

#[derive(Debug)]
pub(crate) struct Admission {
    limit: usize,
    state: Mutex<Slots>,
}

#[derive(Debug, Default)]
struct Slots {
    held: usize,
    /// Agents with a queued task, first come first served.
    waiting: VecDeque<String>,
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
            slots.waiting.retain(|a| a != agent);
            return true;
        }
        if !slots.waiting.iter().any(|a| a == agent) {
            slots.waiting.push_back(agent.to_owned());
        }
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
        slots.waiting.retain(|a| a != agent);
        Admission::next(&mut slots, self.limit)
    }

    fn next(slots: &mut Slots, limit: usize) -> Option<String> {
        if slots.held < limit {
            slots.waiting.pop_front()
        } else {
            None
        }
    }

    /// Agents waiting in line.
    pub(crate) fn waiting(&self) -> usize {
        self.slots().waiting.len()
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
}
