//! The hand-off to the application: at most `handoff` messages handed over and not yet
//! taken; a take acks (through the receiver), an application gone refuses the rest.

use super::*;

impl Link {
    /// The application took message `id`: room for another (its ack, and a stream message's
    /// answer, come from the receiver).
    pub(super) fn took(&mut self, now: Instant, id: u64) {
        self.settled_handed.remove(&id);
        self.peer.receiver.taken(now, id);
        self.room += 1;
    }

    /// The application received message `id`, which awaits its answer: it leaves the
    /// hand-off, unless `max_unanswered` messages await theirs already (then its room comes
    /// back with an answer).
    pub(super) fn received(&mut self, id: u64) {
        self.peer.receiver.received(id);
        *self.unanswered.entry(id).or_default() += 1;
        self.unanswered_total += 1;
        if self.unanswered_total > self.config.max_unanswered.max(1) {
            self.room_owed += 1;
        } else {
            self.room += 1;
        }
    }

    /// The application answered message `id` (see [`Answer`]); returns whether it had
    /// received it (an answer for a message never received comes from one dropped in the
    /// hand-off: its room was never given back by a receipt).
    pub(super) fn answer_received(&mut self, id: u64) -> bool {
        let Some(n) = self.unanswered.get_mut(&id) else {
            return false;
        };
        *n -= 1;
        if *n == 0 {
            self.unanswered.remove(&id);
        }
        self.unanswered_total -= 1;
        if self.room_owed > 0 {
            self.room_owed -= 1;
            self.room += 1;
        }
        true
    }

    /// Whether the application holds messages it has not answered.
    pub(super) fn awaiting_answers(&self) -> bool {
        self.unanswered_total > 0
    }

    /// Nobody takes messages any more (the receiver refuses what it handed over and was not
    /// taken, stream messages included).
    pub(super) fn app_gone(&mut self, now: Instant) {
        self.peer.receiver.application_gone(now);
        self.app_gone = true;
        self.give_up_reserved(now);
    }

    pub(super) fn hand_over(&mut self) {
        if self.app_gone {
            // Nobody will take these; they were claimed (claims mode), so they count as
            // handed over: the driver passes them to the closed queue, which drops them.
            while let Some(message) = self.peer.receiver.poll_delivery() {
                self.actions.push_back(Action::Deliver(message));
            }
            return;
        }
        while self.room > 0 {
            let Some(message) = self.peer.receiver.poll_delivery() else {
                return;
            };
            self.room -= 1;
            self.actions.push_back(Action::Deliver(message));
        }
    }
}
