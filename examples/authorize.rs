//! An authorization round trip with the reversal pattern (issue 24).
//!
//! ```text
//! cargo run --release --example authorize
//! ```
//!
//! A terminal sends authorization requests to a host over one channel. The host's
//! application takes 300 ms for the first request (longer than the terminal's 200 ms
//! deadline), so that request's outcome is unknown at first: the terminal retries it under
//! the same idempotency key and gets the host's one reply (kept with the key: the host
//! processed it once). A request the terminal cannot settle in its overall budget (the host
//! never answers the third one) is *reversed*: the terminal sends a reversal request under a
//! key of its own, and retries that until it has a definite answer, as card networks repeat
//! a reversal advice (ISO 8583 1420/1421) until it is acknowledged.
//!
//! What a terminal does with each outcome:
//! - a reply: done (approved or declined, as the reply says);
//! - `may_have_been_delivered() == false` (refused, declined with `nack`, never sent): the
//!   host did not process it, nothing to reverse;
//! - `may_have_been_delivered() == true` (no ack or no reply in time, connection lost):
//!   retry under the same key; the host processes a keyed request at most once and answers
//!   every retry with its first reply. Past the terminal's budget, reverse it.

use std::time::{Duration, Instant};

use surelink::channel::{self, Channel, Config, Identity, Listener, SendOptions};
use surelink::quinn::Endpoint;

/// How long a terminal keeps retrying a request before it reverses it.
const BUDGET: Duration = Duration::from_secs(2);

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let identity = Identity::self_signed(["localhost"])?;
    let server_cert = identity.cert_chain[0].clone();
    let server_config = channel::server_config(identity.cert_chain, identity.key)?;
    let endpoint = Endpoint::server(server_config, "127.0.0.1:0".parse()?)?;
    let addr = endpoint.local_addr()?;
    let mut listener = Listener::new(endpoint, Config::default());

    // The host: approves authorizations, acknowledges reversals; never answers "auth-3".
    let host = tokio::spawn(async move {
        let (_channel, mut messages) = listener.accept().await.expect("a terminal");
        let mut processed = Vec::new();
        let mut held = Vec::new();
        while let Some(request) = messages.recv().await {
            let text = String::from_utf8_lossy(&request.payload).into_owned();
            processed.push(text.clone());
            if text.starts_with("auth 3") {
                held.push(request); // never answered while the host runs
                continue;
            }
            let slow = text.starts_with("auth 1");
            tokio::spawn(async move {
                if slow {
                    tokio::time::sleep(Duration::from_millis(300)).await;
                }
                let reply = if text.starts_with("reverse") {
                    format!("reversed: {text}")
                } else {
                    format!("approved: {text}")
                };
                let _ = request.reply(reply);
            });
        }
        processed
    });

    let mut roots = surelink::rustls::RootCertStore::empty();
    roots.add(server_cert)?;
    let client = Endpoint::client("127.0.0.1:0".parse()?)?;
    let mut config = Config::default();
    config.sender.deadline = Duration::from_millis(200);
    let (terminal, _messages) = Channel::connect(
        &client,
        addr,
        "localhost",
        Some(channel::client_config(roots)?),
        config,
    )
    .await?;

    for n in 1..=3 {
        let key = format!("till-7/auth-{n}");
        let payload = format!("auth {n} 25.00 EUR");
        match authorize(&terminal, &key, &payload).await {
            Outcome::Reply(reply) => println!("{key}: {reply}"),
            Outcome::NotProcessed(e) => println!("{key}: not processed ({e}); nothing to reverse"),
            Outcome::Unknown => {
                println!("{key}: no definite outcome within {BUDGET:?}: reversing");
                let reversal = format!("reverse {key}");
                match authorize(&terminal, &format!("reversal/{key}"), &reversal).await {
                    Outcome::Reply(reply) => println!("{key}: {reply}"),
                    other => {
                        println!("{key}: reversal not settled yet ({other:?}): keep it queued")
                    }
                }
            }
        }
    }
    terminal.close().await;
    let processed = host.await?;
    // Each request was processed once, however often it was retried.
    for p in &processed {
        assert_eq!(
            processed.iter().filter(|q| *q == p).count(),
            1,
            "{p} processed twice"
        );
    }
    println!("the host processed {processed:?}, each once");
    Ok(())
}

#[derive(Debug)]
enum Outcome {
    Reply(String),
    NotProcessed(channel::RequestError),
    Unknown,
}

/// Sends `payload` as a request under `key`, retrying while the outcome is unknown, for at
/// most [`BUDGET`].
async fn authorize(terminal: &Channel, key: &str, payload: &str) -> Outcome {
    let started = Instant::now();
    let options = SendOptions::default().key(key.to_owned());
    while started.elapsed() < BUDGET {
        match terminal
            .request_with(payload.to_owned(), options.clone())
            .await
        {
            Ok(reply) => {
                let replayed = if reply.replayed { " (kept reply)" } else { "" };
                return Outcome::Reply(format!(
                    "{}{replayed}",
                    String::from_utf8_lossy(&reply.payload)
                ));
            }
            Err(e) if e.may_have_been_delivered() => {
                println!("{key}: unknown ({e}); retrying under the same key");
            }
            Err(e) => return Outcome::NotProcessed(e),
        }
    }
    Outcome::Unknown
}
