//! The hand-off to the application: at most `handoff` messages handed over and not yet
//! taken; a take acks (through the receiver), an application gone refuses the rest.

use super::*;

impl Link {
    /// The application took message `id`: room for another (its ack, and a stream message's
    /// answer, come from the receiver).
    pub(super) fn took(&mut self, now: Instant, id: u64) {
        self.peer.receiver.taken(now, id);
        self.room += 1;
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
