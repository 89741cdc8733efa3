//! How an application answers a message it was handed: ack, nack, reply, or nothing.
//!
//! A request (protocol 2), and every message when a channel acks explicitly
//! ([`Config::explicit_ack`](crate::channel::Config::explicit_ack)), is acked only when the
//! application answers it. The answer travels from the [`Delivered`](super::Delivered) the
//! application holds to the channel through an [`AnswerSink`] the channel sets; the core
//! decides what each answer means ([`Receiver::answered`](super::Receiver::answered)).
//!
//! Rules stated once:
//! - **One answer per message.** The first answer counts; later ones (from a clone of the
//!   message) are refused with [`AnswerError::Answered`].
//! - **No answer is an answer too.** When the last clone of a message that still awaits its
//!   answer is dropped, the channel hears [`Answer::GiveBack`]: the message is given back, as
//!   if it had never been delivered (see [`Answer::GiveBack`]).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use bytes::Bytes;

/// What the application says about a message it was handed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Answer {
    /// Done: ack it (its key counts as delivered from now).
    Ack,
    /// Not processed: refuse it (REFUSE reason 8). Its sender learns for certain that it was
    /// not delivered, and a retry under its key is delivered afresh.
    Nack,
    /// Done, with this reply (a request): ack it and send the reply, which its key keeps for
    /// the key's lifetime so that a retried request gets the same bytes.
    Reply(Bytes),
    /// Dropped without an answer: given back. It is neither acked nor refused (its sender
    /// learns an unknown outcome at its deadline), its key is freed, and a retry under its key
    /// is delivered afresh. An application that may have done the work before dropping a
    /// message (a panic after its commit) must make the retry recognisable itself: commit
    /// the key with the work (the inbox pattern).
    GiveBack,
}

/// Why an answer was not taken.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum AnswerError {
    /// The message was answered already (by this handle or a clone of it).
    #[error("the message was answered already")]
    Answered,
    /// Only a request has a reply ([`Delivered::is_request`](super::Delivered::is_request)).
    #[error("the message is not a request: ack or nack it")]
    NotARequest,
    /// The message needs no answer: its channel acked it when `recv` returned it (a message,
    /// with explicit acks off).
    #[error("the message was acked when it was received; it takes no answer")]
    NotAwaited,
    /// The channel has stopped: the answer goes nowhere (the message stays unacked).
    #[error("the channel has stopped")]
    Closed,
}

/// Where answers go: the channel's side of an answer (set by the async shell).
pub trait AnswerSink: Send + Sync {
    /// Message `id` was answered; returns `false` when the channel has stopped.
    fn answer(&self, id: u64, answer: Answer) -> bool;
}

/// One handed message's way to answer, shared by its clones; dropping the last unanswered
/// gives the message back.
struct Ticket {
    id: u64,
    request: bool,
    sink: Box<dyn AnswerSink>,
    answered: AtomicBool,
}

impl Drop for Ticket {
    fn drop(&mut self) {
        if !self.answered.swap(true, Ordering::AcqRel) {
            let _ = self.sink.answer(self.id, Answer::GiveBack);
        }
    }
}

/// A delivered message's answering handle (empty when the message takes no answer).
/// Compares equal to every other: it is not part of the message.
#[derive(Clone, Default)]
pub struct Answering(Option<Arc<Ticket>>);

impl Answering {
    /// A handle for message `id` (a request or not) answering into `sink`.
    pub fn new(id: u64, request: bool, sink: Box<dyn AnswerSink>) -> Self {
        Answering(Some(Arc::new(Ticket {
            id,
            request,
            sink,
            answered: AtomicBool::new(false),
        })))
    }

    /// Whether the message awaits an answer.
    pub fn is_awaited(&self) -> bool {
        self.0.is_some()
    }

    /// Gives `answer`; the first one counts.
    pub fn answer(&self, answer: Answer) -> Result<(), AnswerError> {
        let Some(ticket) = &self.0 else {
            return Err(AnswerError::NotAwaited);
        };
        if matches!(answer, Answer::Reply(_)) && !ticket.request {
            return Err(AnswerError::NotARequest);
        }
        if ticket.answered.swap(true, Ordering::AcqRel) {
            return Err(AnswerError::Answered);
        }
        if ticket.sink.answer(ticket.id, answer) {
            Ok(())
        } else {
            Err(AnswerError::Closed)
        }
    }
}

impl std::fmt::Debug for Answering {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.0 {
            None => f.write_str("None"),
            Some(t) => f
                .debug_struct("Awaited")
                .field("answered", &t.answered.load(Ordering::Acquire))
                .finish(),
        }
    }
}

impl PartialEq for Answering {
    fn eq(&self, _: &Self) -> bool {
        true
    }
}

impl Eq for Answering {}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    #[derive(Clone, Default)]
    struct Log(Arc<Mutex<Vec<(u64, Answer)>>>);

    impl AnswerSink for Log {
        fn answer(&self, id: u64, answer: Answer) -> bool {
            self.0.lock().unwrap().push((id, answer));
            true
        }
    }

    /// The first answer counts, a clone cannot answer again, a reply needs a request, and
    /// dropping the last clone unanswered gives the message back (exactly once).
    #[test]
    fn one_answer_and_give_back_on_drop() {
        let log = Log::default();
        let a = Answering::new(7, false, Box::new(log.clone()));
        let b = a.clone();
        assert_eq!(
            a.answer(Answer::Reply(Bytes::from_static(b"x"))),
            Err(AnswerError::NotARequest)
        );
        assert_eq!(b.answer(Answer::Ack), Ok(()));
        assert_eq!(a.answer(Answer::Nack), Err(AnswerError::Answered));
        drop((a, b));
        assert_eq!(*log.0.lock().unwrap(), vec![(7, Answer::Ack)]);

        let r = Answering::new(8, true, Box::new(log.clone()));
        let r2 = r.clone();
        drop(r);
        assert!(log.0.lock().unwrap().len() == 1, "a clone still holds it");
        drop(r2);
        assert_eq!(log.0.lock().unwrap()[1], (8, Answer::GiveBack));
        assert_eq!(
            Answering::default().answer(Answer::Ack),
            Err(AnswerError::NotAwaited)
        );
    }
}
