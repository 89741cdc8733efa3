//! The driver's helper tasks: reading a connection, one stream message each way, one claim
//! attempt. Each reports to the driver as an [`Event`]; none decides anything.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::sync::{mpsc, oneshot};

use super::dial::classify;
use crate::proto::link::{Attached, ClaimStep, ConnId, Input, PathSample, StoreAnswer, StreamEnd};

/// What the driver's helper tasks report.
pub(super) enum Event {
    Input(Input),
    Dialed(
        u64,
        Result<(quinn::Connection, Attached), super::ConnectError>,
    ),
    Inbound(Bytes, oneshot::Sender<u8>),
}

/// Reads connection `id` until it ends: its datagrams, its inbound streams (each read by a
/// task of its own, at most `limit` bytes within `timeout`) and finally its end.
pub(super) async fn read_connection(
    id: ConnId,
    conn: quinn::Connection,
    streams: bool,
    limit: usize,
    timeout: Duration,
    tx: mpsc::Sender<Event>,
) {
    let lost = loop {
        let event = tokio::select! {
            biased;
            d = conn.read_datagram() => d.map(|data| Input::Datagram { conn: id, data }),
            s = conn.accept_bi(), if streams => match s {
                Ok((send, recv)) => {
                    tokio::spawn(read_stream_message(send, recv, limit, timeout, tx.clone()));
                    continue;
                }
                Err(e) => Err(e),
            },
        };
        match event {
            Ok(input) => {
                if tx.send(Event::Input(input)).await.is_err() {
                    return;
                }
            }
            Err(e) => break e,
        }
    };
    let _ = tx
        .send(Event::Input(Input::ConnectionLost {
            conn: id,
            how: classify(&lost),
            reason: lost.to_string(),
        }))
        .await;
}

/// Datagrams the transport's send buffer could not take at once, for one connection: the
/// driver queues them here instead of letting quinn discard its oldest queued datagrams
/// (which would look exactly like path loss to the peer's shard count), and this task hands
/// them to quinn in order as its buffer frees. `queued` counts what waits here.
pub(super) struct Writer {
    tx: mpsc::UnboundedSender<Bytes>,
    queued: Arc<AtomicUsize>,
}

impl Writer {
    /// A writer for `conn`, with its task.
    pub(super) fn spawn(conn: quinn::Connection) -> Writer {
        let (tx, mut rx) = mpsc::unbounded_channel::<Bytes>();
        let queued = Arc::new(AtomicUsize::new(0));
        let count = queued.clone();
        tokio::spawn(async move {
            while let Some(datagram) = rx.recv().await {
                let sent = conn.send_datagram_wait(datagram).await;
                count.fetch_sub(1, Ordering::Relaxed);
                // Only a lost connection ends the writer; a datagram too large for the path
                // (its MTU shrank) is one datagram lost, which hedges recover.
                if matches!(sent, Err(quinn::SendDatagramError::ConnectionLost(_))) {
                    // The connection is gone (its reader reports it); drop what is left.
                    rx.close();
                    while rx.recv().await.is_some() {
                        count.fetch_sub(1, Ordering::Relaxed);
                    }
                    return;
                }
            }
        });
        Writer { tx, queued }
    }

    /// Datagrams waiting for the transport's buffer.
    pub(super) fn queued(&self) -> usize {
        self.queued.load(Ordering::Relaxed)
    }

    /// Queues `datagram` behind the others.
    pub(super) fn push(&self, datagram: Bytes) {
        self.queued.fetch_add(1, Ordering::Relaxed);
        if self.tx.send(datagram).is_err() {
            self.queued.fetch_sub(1, Ordering::Relaxed);
        }
    }
}

/// One path measurement of `conn`, for ranking replicas.
pub(super) fn sample(conn: &quinn::Connection) -> PathSample {
    let path = conn.stats().path;
    PathSample {
        rtt: conn.rtt(),
        sent_packets: path.sent_packets,
        lost_packets: path.lost_packets,
    }
}

/// One claim attempt (`step`: reserve, settle or release), within `timeout`: a store that
/// hangs becomes an error. A release is best effort and answers nothing.
pub(super) async fn claim(
    store: Option<Arc<dyn crate::store::DedupeStore>>,
    mut claim: crate::store::Claim,
    attempt: u64,
    timeout: Duration,
    step: ClaimStep,
    tx: mpsc::Sender<Event>,
) {
    use crate::store::{Reserved, Settled};
    // Claims mode without a store cannot happen (spawn sets one with the other); answer
    // anyway so nothing waits forever.
    let Some(store) = store else {
        let result = Err("no store".to_owned());
        let _ = tx
            .send(Event::Input(Input::ClaimAnswered { attempt, result }))
            .await;
        return;
    };
    let late = |e| format!("no answer from the store within {timeout:?} ({e})");
    let result = match step {
        ClaimStep::Reserve { lease } => {
            match tokio::time::timeout(timeout, store.reserve(&claim, lease)).await {
                Ok(Ok(Reserved::Held { epoch, took_over })) => {
                    Ok(StoreAnswer::Reserved { epoch, took_over })
                }
                Ok(Ok(Reserved::Busy { retry_in })) => Ok(StoreAnswer::Busy { retry_in }),
                Ok(Ok(Reserved::Before)) => Ok(StoreAnswer::Before),
                Ok(Ok(Reserved::Conflict)) => Ok(StoreAnswer::Conflict),
                Ok(Err(e)) => Err(e.to_string()),
                Err(e) => Err(late(e)),
            }
        }
        ClaimStep::Settle { epoch } => {
            claim.epoch = epoch;
            match tokio::time::timeout(timeout, store.settle(&claim)).await {
                Ok(Ok(Settled::Now { late })) => Ok(StoreAnswer::Settled { late }),
                Ok(Ok(Settled::Fenced)) => Ok(StoreAnswer::Fenced),
                Ok(Err(e)) => Err(e.to_string()),
                Err(e) => Err(late(e)),
            }
        }
        ClaimStep::RecordReply { epoch, reply } => {
            claim.epoch = epoch;
            match tokio::time::timeout(timeout, store.record_reply(&claim, &reply)).await {
                Ok(Ok(recorded)) => Ok(StoreAnswer::Recorded { recorded }),
                // A store that keeps no replies, or not one this large: the reply goes out
                // unrecorded (a retry on another replica is then left unanswered).
                Ok(Err(
                    crate::store::StoreError::RepliesUnsupported { .. }
                    | crate::store::StoreError::ReplyTooLarge { .. },
                )) => Ok(StoreAnswer::Recorded { recorded: false }),
                Ok(Err(e)) => Err(e.to_string()),
                Err(e) => Err(late(e)),
            }
        }
        ClaimStep::FetchReply => match tokio::time::timeout(timeout, store.reply(&claim)).await {
            Ok(Ok(reply)) => Ok(StoreAnswer::Reply(reply)),
            Ok(Err(crate::store::StoreError::RepliesUnsupported { .. })) => {
                Ok(StoreAnswer::Reply(None))
            }
            Ok(Err(e)) => Err(e.to_string()),
            Err(e) => Err(late(e)),
        },
        ClaimStep::Release { epoch } => {
            claim.epoch = epoch;
            if let Ok(Err(e)) = tokio::time::timeout(timeout, store.release(&claim)).await {
                tracing::debug!(error = %e, "surelink: releasing a reservation failed");
            }
            return;
        }
    };
    let _ = tx
        .send(Event::Input(Input::ClaimAnswered { attempt, result }))
        .await;
}

pub(super) async fn send_stream_message(
    conn: quinn::Connection,
    head: Bytes,
    body: Bytes,
    deadline: Instant,
) -> StreamEnd {
    let work = async {
        let lost = |e: &dyn std::fmt::Display| StreamEnd::Connection(e.to_string());
        let (mut send, mut recv) = conn.open_bi().await.map_err(|e| lost(&e))?;
        for part in [&head, &body] {
            send.write_all(part).await.map_err(|e| match e {
                quinn::WriteError::Stopped(_) => StreamEnd::Refused,
                e => lost(&e),
            })?;
        }
        send.finish().map_err(|e| lost(&e))?;
        let status = recv.read_to_end(1).await.map_err(|e| match e {
            quinn::ReadToEndError::Read(quinn::ReadError::Reset(_)) => StreamEnd::Refused,
            e => lost(&e),
        })?;
        status
            .first()
            .copied()
            .map(StreamEnd::Status)
            .ok_or_else(|| StreamEnd::Connection("the stream ended without a status".into()))
    };
    match tokio::time::timeout_at(deadline.into(), work).await {
        Ok(Ok(end)) | Ok(Err(end)) => end,
        Err(_) => StreamEnd::Deadline,
    }
}

/// Reads one stream message (at most `limit` bytes, within `timeout`), hands it to the driver
/// and writes back the status it answers.
pub(super) async fn read_stream_message(
    mut send: quinn::SendStream,
    mut recv: quinn::RecvStream,
    limit: usize,
    timeout: Duration,
    events: mpsc::Sender<Event>,
) {
    let invalid = |reason| Event::Input(Input::StreamInvalid { reason });
    let message = match tokio::time::timeout(timeout, recv.read_to_end(limit)).await {
        Ok(Ok(m)) => m,
        Ok(Err(quinn::ReadToEndError::TooLong)) => {
            let _ = events.send(invalid("stream_too_long")).await;
            let _ = send.reset(1u32.into());
            let _ = recv.stop(1u32.into());
            return;
        }
        // The connection or the stream broke: the sender retries or reports.
        Ok(Err(_)) => return,
        Err(_) => {
            let _ = events.send(invalid("stream_timeout")).await;
            let _ = send.reset(1u32.into());
            let _ = recv.stop(1u32.into());
            return;
        }
    };
    let (reply, status) = oneshot::channel();
    if events
        .send(Event::Inbound(Bytes::from(message), reply))
        .await
        .is_err()
    {
        return;
    }
    let Ok(status) = status.await else {
        return;
    };
    if send.write_all(&[status]).await.is_ok() {
        let _ = send.finish();
    }
}
