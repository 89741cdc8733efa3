//! The async shell: a [`Channel`] runs one [`proto::Peer`](crate::proto::Peer) over a
//! `quinn::Connection`'s DATAGRAM frames.
//!
//! One driver task per channel owns the peer. It feeds it received datagrams and timeouts,
//! sends what it produces, completes each `send` with the message's outcome, and forwards
//! delivered messages to [`Messages`]. Time is tokio's clock, so a channel over the simulator
//! runs in virtual time under a paused clock.
//!
//! Not yet here (issue 4): channel ids and reconnects, idempotency keys, the stream path for
//! large messages, connect/accept helpers.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::sync::{mpsc, oneshot, OwnedSemaphorePermit, Semaphore};

use crate::proto::{
    Delivered, Peer, ReceiverConfig, ReceiverStats, SendError as ProtoSendError, SenderConfig,
    SenderEvent, SenderStats,
};

/// Settings of a [`Channel`]. The defaults are those of [`SenderConfig`] and
/// [`ReceiverConfig`]; the datagram size is taken from the connection.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Config {
    /// The sending half.
    pub sender: SenderConfig,
    /// The receiving half.
    pub receiver: ReceiverConfig,
}

/// What the application learns when a message was acknowledged: it was delivered.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Receipt {
    /// The message id on this channel.
    pub id: u64,
    /// From `send` to the ack.
    pub latency: Duration,
    /// Shards sent for the message's block.
    pub shards_sent: usize,
    /// Hedges and retransmissions sent for it.
    pub hedges: u32,
}

/// Why a message has no receipt. Every variant says whether the message may have been
/// delivered; where it may, retry with the same idempotency key.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum SendError {
    /// No ack before the deadline: the outcome is unknown.
    #[error("message {id}: no ack before the deadline; outcome unknown, retry with the same idempotency key")]
    Timeout {
        /// The message id.
        id: u64,
    },
    /// The connection was lost while the message was in flight: the outcome is unknown.
    #[error("connection lost while the message was in flight; outcome unknown, retry with the same idempotency key: {reason}")]
    ConnectionLost {
        /// What quinn reported.
        reason: String,
    },
    /// The message was refused before anything was sent (it was not delivered).
    #[error("message refused, nothing sent: {0}")]
    Rejected(#[from] ProtoSendError),
    /// The peer does not accept QUIC DATAGRAM frames, or the path is too small for them.
    #[error("the connection does not carry QUIC datagrams")]
    DatagramsUnsupported,
    /// The channel's driver has stopped; nothing was sent.
    #[error("channel closed")]
    Closed,
}

/// Counters of a [`Channel`].
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ChannelStats {
    /// The sending half's counters.
    pub sender: SenderStats,
    /// The receiving half's counters.
    pub receiver: ReceiverStats,
    /// Datagrams received that did not decode, by reason.
    pub invalid_frames: std::collections::BTreeMap<&'static str, u64>,
    /// Datagrams quinn refused to send.
    pub send_errors: u64,
}

enum Command {
    Send {
        payload: Bytes,
        reply: oneshot::Sender<Result<Receipt, SendError>>,
    },
}

/// The sending side of a channel; cheap to clone.
#[derive(Clone, Debug)]
pub struct Channel {
    commands: mpsc::UnboundedSender<Command>,
    permits: Arc<Semaphore>,
    stats: Arc<Mutex<ChannelStats>>,
}

/// The receiving side of a channel: messages delivered by the peer, each once.
#[derive(Debug)]
pub struct Messages {
    rx: mpsc::UnboundedReceiver<Delivered>,
}

impl Messages {
    /// The next message, or `None` once the channel has stopped and every message was taken.
    pub async fn recv(&mut self) -> Option<Delivered> {
        self.rx.recv().await
    }
}

fn now() -> Instant {
    tokio::time::Instant::now().into_std()
}

impl Channel {
    /// Runs a channel over `connection`, which must have DATAGRAM frames enabled (quinn's
    /// default). Both ends call this; each end can send and receive. Must be called inside a
    /// tokio runtime.
    pub fn open(
        connection: quinn::Connection,
        mut config: Config,
    ) -> Result<(Channel, Messages), SendError> {
        let size = connection
            .max_datagram_size()
            .ok_or(SendError::DatagramsUnsupported)?;
        config.sender.encoder.max_datagram_size = size;
        let permits = Arc::new(Semaphore::new(config.sender.max_in_flight.max(1)));
        let (commands, command_rx) = mpsc::unbounded_channel();
        let (delivered, rx) = mpsc::unbounded_channel();
        let stats = Arc::new(Mutex::new(ChannelStats::default()));
        let peer = Peer::new(config.sender, config.receiver);
        tokio::spawn(drive(
            connection,
            peer,
            command_rx,
            delivered,
            stats.clone(),
        ));
        Ok((
            Channel {
                commands,
                permits,
                stats,
            },
            Messages { rx },
        ))
    }

    /// Sends `payload` and waits for its outcome. Waits first while `max_in_flight` messages
    /// are awaiting theirs (backpressure, not an unbounded queue).
    pub async fn send(&self, payload: Bytes) -> Result<Receipt, SendError> {
        let permit: OwnedSemaphorePermit = self
            .permits
            .clone()
            .acquire_owned()
            .await
            .map_err(|_| SendError::Closed)?;
        let (reply, outcome) = oneshot::channel();
        self.commands
            .send(Command::Send { payload, reply })
            .map_err(|_| SendError::Closed)?;
        let result = outcome.await.unwrap_or(Err(SendError::Closed));
        drop(permit);
        result
    }

    /// Counters, as of the driver's last step.
    pub fn stats(&self) -> ChannelStats {
        self.stats.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

/// The driver: one task per channel, owning the peer.
async fn drive(
    connection: quinn::Connection,
    mut peer: Peer,
    mut commands: mpsc::UnboundedReceiver<Command>,
    delivered: mpsc::UnboundedSender<Delivered>,
    stats: Arc<Mutex<ChannelStats>>,
) {
    let mut waiting: HashMap<u64, oneshot::Sender<Result<Receipt, SendError>>> = HashMap::new();
    let mut send_errors = 0u64;
    // Once every Channel handle is gone there is nothing more to send, but the driver keeps
    // receiving (and acking) until the connection ends.
    let mut commands_open = true;
    let lost = loop {
        let timer = peer.poll_timeout();
        tokio::select! {
            // Arrivals before timers: an ack and the hedge timer due at the same instant must
            // not hedge (in virtual time such ties are common: measured, an unbiased select
            // hedged ~80% of messages on a loss-free link).
            biased;
            datagram = connection.read_datagram() => match datagram {
                Ok(d) => peer.handle_datagram(now(), d),
                Err(e) => break e.to_string(),
            },
            command = commands.recv(), if commands_open => match command {
                Some(Command::Send { payload, reply }) => {
                    match peer.sender.send(now(), payload) {
                        Ok(id) => {
                            waiting.insert(id, reply);
                        }
                        Err(e) => {
                            let _ = reply.send(Err(SendError::Rejected(e)));
                        }
                    }
                }
                None => commands_open = false,
            },
            _ = async {
                match timer {
                    Some(at) => tokio::time::sleep_until(at.into()).await,
                    None => std::future::pending().await,
                }
            } => peer.handle_timeout(now()),
        }

        while let Some(d) = peer.poll_transmit() {
            if connection.send_datagram(d).is_err() {
                send_errors += 1;
            }
        }
        while let Some(event) = peer.sender.poll_event() {
            let (id, outcome) = match event {
                SenderEvent::Acked {
                    id,
                    latency,
                    shards_sent,
                    hedges,
                } => (
                    id,
                    Ok(Receipt {
                        id,
                        latency,
                        shards_sent,
                        hedges,
                    }),
                ),
                SenderEvent::Failed { id, .. } => (id, Err(SendError::Timeout { id })),
            };
            if let Some(reply) = waiting.remove(&id) {
                let _ = reply.send(outcome);
            }
        }
        while let Some(message) = peer.receiver.poll_delivery() {
            let _ = delivered.send(message);
        }
        let mut st = stats.lock().unwrap_or_else(|e| e.into_inner());
        st.sender = peer.sender.stats();
        st.receiver = peer.receiver.stats();
        // Cloned only when it changed: this runs once per datagram.
        if peer.invalid_frames().total() != st.invalid_frames.values().sum::<u64>() {
            st.invalid_frames = peer.invalid_frames().by_reason.clone();
        }
        st.send_errors = send_errors;
    };
    tracing::debug!(reason = %lost, "surelink channel: connection lost");
    for (_, reply) in waiting {
        let _ = reply.send(Err(SendError::ConnectionLost {
            reason: lost.clone(),
        }));
    }
}
