//! One connection attempt of a client: handshake, Hello, the server's answer. When to dial
//! (backoff, failover, standby) is the core's decision ([`crate::proto::link`]); this only
//! performs one attempt.

use std::net::SocketAddr;
use std::time::Duration;

use super::{ChannelId, ConnectError};
use crate::proto::link::{Attached, Lost, GOODBYE};
use crate::wire::{Frame, HelloFrame, HELLO_CLAIMS, HELLO_NEW, HELLO_RESUMED};

/// Application close code a server uses when it refuses a channel (or a connection that
/// tries to reattach to a channel it does not own), and a client when a server's answer to
/// its Hello is not one it knows.
pub(super) const REFUSED: u32 = 2;

/// Whether a connection lost this way may be dialled again: not after this side closed it,
/// a server refused the channel, a protocol violation, or a TLS failure (RFC 9001 §4.8:
/// crypto errors are transport codes 0x0100–0x01ff), which another attempt would meet again.
/// A server that closed the connection otherwise (it is shutting down or restarting) may be
/// back, or have a replica.
pub(super) fn retryable(e: &quinn::ConnectionError) -> bool {
    use quinn::ConnectionError as E;
    match e {
        E::TimedOut | E::Reset | E::CidsExhausted => true,
        E::ConnectionClosed(close) => !(0x100..0x200).contains(&u64::from(close.error_code)),
        E::ApplicationClosed(close) => close.error_code != quinn::VarInt::from_u32(REFUSED),
        _ => false,
    }
}

/// How the core should take a connection's end.
pub(super) fn classify(e: &quinn::ConnectionError) -> Lost {
    match e {
        quinn::ConnectionError::LocallyClosed => Lost::LocallyClosed,
        quinn::ConnectionError::ApplicationClosed(c)
            if c.error_code == quinn::VarInt::from_u32(GOODBYE) =>
        {
            Lost::Goodbye
        }
        e if retryable(e) => Lost::Retryable,
        _ => Lost::Fatal,
    }
}

/// What a client needs to dial its channel's replicas.
#[derive(Clone)]
pub(super) struct Dialer {
    pub(super) endpoint: quinn::Endpoint,
    /// The replicas, the preferred first.
    pub(super) addrs: Vec<SocketAddr>,
    pub(super) server_name: String,
    pub(super) client_config: Option<quinn::ClientConfig>,
    pub(super) channel_id: ChannelId,
}

impl Dialer {
    /// One connection attempt: the full handshake (never 0-RTT), then the Hello (with
    /// `floor`: every id below has its outcome) and the server's answer. Waiting for the
    /// answer costs one round trip and means a connection the server refuses (a client
    /// certificate it does not accept, its channel limit) fails here, not at the first
    /// message.
    pub(super) async fn dial(
        &self,
        addr: SocketAddr,
        floor: u64,
    ) -> Result<(quinn::Connection, Attached), ConnectError> {
        let connecting = match &self.client_config {
            Some(c) => self
                .endpoint
                .connect_with(c.clone(), addr, &self.server_name)?,
            None => self.endpoint.connect(addr, &self.server_name)?,
        };
        let conn = connecting.await?;
        let hello = Frame::Hello(HelloFrame {
            channel_id: self.channel_id,
            floor,
        })
        .to_bytes();
        let (mut send, mut recv) = conn.open_bi().await?;
        let hello_failed = |e: &dyn std::fmt::Display| ConnectError::Hello(e.to_string());
        send.write_all(&hello).await.map_err(|e| match e {
            quinn::WriteError::ConnectionLost(c) => ConnectError::Connection(c),
            e => hello_failed(&e),
        })?;
        send.finish().map_err(|e| hello_failed(&e))?;
        let answer = recv.read_to_end(1).await.map_err(|e| match e {
            quinn::ReadToEndError::Read(quinn::ReadError::ConnectionLost(c)) => {
                ConnectError::Connection(c)
            }
            e => hello_failed(&e),
        })?;
        match answer.first() {
            Some(&HELLO_NEW) => Ok((conn, Attached::New)),
            Some(&HELLO_RESUMED) => Ok((conn, Attached::Resumed)),
            Some(&HELLO_CLAIMS) => Ok((conn, Attached::Claims)),
            other => {
                conn.close(REFUSED.into(), b"invalid hello answer");
                Err(ConnectError::Hello(format!(
                    "invalid answer to the hello: {other:?}"
                )))
            }
        }
    }

    /// How many replicas there are.
    pub(super) fn replicas(&self) -> usize {
        self.addrs.len()
    }

    /// One attempt on replica `index`, within `timeout`.
    pub(super) async fn attempt(
        &self,
        index: usize,
        floor: u64,
        timeout: Duration,
    ) -> Result<(quinn::Connection, Attached), ConnectError> {
        let addr = self.addrs[index];
        let span = tracing::info_span!("surelink.connect", server = %addr, replica = index);
        let attempt = tracing::Instrument::instrument(self.dial(addr, floor), span);
        tokio::time::timeout(timeout, attempt)
            .await
            .map_err(|_| ConnectError::Hello(format!("no answer from {addr} within {timeout:?}")))?
    }
}

/// Whether a failed attempt was a refusal another attempt would meet again.
pub(super) fn refused(e: &ConnectError) -> bool {
    matches!(e, ConnectError::Connection(c) if !retryable(c))
}
