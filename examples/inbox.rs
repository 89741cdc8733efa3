//! The inbox pattern: a payment's effect and its claim commit in one PostgreSQL transaction,
//! and surelink acks the payment only after that commit.
//!
//! ```text
//! scripts/with-postgres cargo run --release --features postgres --example inbox
//! cargo run --release --features postgres --example inbox -- --pg-url postgres://… \
//!     --payments 300 --loss 0.1 --fail-every 10
//! ```
//!
//! A client and a server talk over the in-crate simulator (real QUIC, `--loss` each way,
//! real time). The server runs with `Config::application_claims` and the store: the channel
//! reserves each payment in the store (a lease, a fencing epoch) and hands it to the
//! application with that reservation (`Delivered::lease`); the application opens a
//! transaction, settles the reservation (`PgStore::claim_in` with `Claim::of`), writes its
//! ledger row, commits, and then calls `Channel::confirm`, which acks it. A replica that
//! took the reservation over meanwhile would make the settle answer `Claimed::Busy`. If the claim was made before (a retry of a payment
//! already in the ledger) it rolls back and confirms without writing. Every `--fail-every`th
//! payment fails its first attempt (rolled back, `Channel::release`): surelink hands it over
//! again when the sender's resend arrives (usually before its deadline), or the client learns
//! an unknown outcome and retries with the same idempotency key.
//!
//! Prints one JSON line: `{"payments":N,"ledger_rows":R,"claims":C,"committed":..,
//! "already_claimed":..,"failed_attempts":..,"client_retries":..}`; exits 0 when the ledger
//! holds each payment exactly once. The database is `--pg-url` or `SURELINK_PG_URL`; the
//! example creates its tables (`ledger`, `surelink_claims`) and empties them first.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use clap::Parser;
use surelink::channel::{Channel, Config, Listener, SendError};
use surelink::sim::{Congestion, LinkConfig, Loss, Pair, PairConfig, SERVER_NAME};
use surelink::store::{Claim, Claimed, PgStore};
use tokio_postgres::NoTls;

#[derive(Parser)]
#[command(about = "surelink inbox pattern: ledger row and claim in one transaction")]
struct Args {
    /// PostgreSQL URL (default: $SURELINK_PG_URL).
    #[arg(long)]
    pg_url: Option<String>,
    /// Payments to send.
    #[arg(long, default_value_t = 300)]
    payments: u32,
    /// Packet loss each way.
    #[arg(long, default_value_t = 0.1)]
    loss: f64,
    /// Every Nth payment's first attempt fails in the application (0: none).
    #[arg(long, default_value_t = 10)]
    fail_every: u32,
}

#[derive(Default)]
struct Tally {
    committed: u32,
    already_claimed: u32,
    failed: u32,
}

fn payment(i: u32) -> Bytes {
    Bytes::from(format!("{{\"payment\":{i},\"amount\":\"10.00\"}}"))
}

fn number(payload: &[u8]) -> u32 {
    let s = std::str::from_utf8(payload).expect("utf-8");
    s.trim_start_matches("{\"payment\":")
        .split(',')
        .next()
        .and_then(|n| n.parse().ok())
        .expect("a payment")
}

#[tokio::main]
async fn main() -> Result<std::process::ExitCode, Box<dyn std::error::Error>> {
    let args = Args::parse();
    let url = args
        .pg_url
        .clone()
        .or_else(|| std::env::var("SURELINK_PG_URL").ok())
        .ok_or("no database: give --pg-url or set SURELINK_PG_URL (scripts/with-postgres does)")?;

    let (mut db, connection) = tokio_postgres::connect(&url, NoTls).await?;
    tokio::spawn(connection);
    // Creates surelink_claims; the application claims in it inside its own transactions.
    let store = PgStore::connect(&url, Duration::from_secs(24 * 3600)).await?;
    db.batch_execute(
        "CREATE TABLE IF NOT EXISTS ledger (payment bigint PRIMARY KEY, amount text NOT NULL);
         TRUNCATE ledger, surelink_claims;",
    )
    .await?;

    let link = LinkConfig {
        delay: Duration::from_millis(20),
        loss: Loss::Bernoulli(args.loss),
        ..LinkConfig::default()
    };
    let pair = Pair::new(PairConfig {
        congestion: Congestion::Bbr,
        ..PairConfig::symmetric(link)
    })?;
    let mut server_config = Config::default();
    server_config.application_claims = true;
    // With the store as well, the channel reserves each payment before the application
    // gets it, so replicas sharing the table hold back while this one works on it.
    server_config.store = Some(Arc::new(store.clone()));
    let mut listener = Listener::new(pair.server.clone(), server_config);
    let mut client_config = Config::default();
    client_config.sender.deadline = Duration::from_secs(1);
    let (client, _replies) = Channel::connect(
        &pair.client,
        pair.server_addr,
        SERVER_NAME,
        None,
        client_config,
    )
    .await?;
    let (channel, mut messages) = listener.accept().await.ok_or("no channel")?;

    // The server application.
    let tally = Arc::new(Mutex::new(Tally::default()));
    let fail_every = args.fail_every;
    let app = {
        let tally = tally.clone();
        tokio::spawn(async move {
            let mut failed_once = HashSet::new();
            while let Some(m) = messages.recv().await {
                let n = number(&m.payload);
                let tx = db.transaction().await?;
                match store
                    .claim_in(
                        &tx,
                        &Claim::of(channel.id(), &m).with_client(channel.key_scope()),
                    )
                    .await?
                {
                    Claimed::Now
                        if fail_every > 0 && n % fail_every == 0 && failed_once.insert(n) =>
                    {
                        // The effect fails: roll back, claim included; the sender retries.
                        tx.rollback().await?;
                        channel.release(m.id);
                        tally.lock().unwrap().failed += 1;
                    }
                    Claimed::Now => {
                        tx.execute(
                            "INSERT INTO ledger (payment, amount) VALUES ($1, '10.00')",
                            &[&i64::from(n)],
                        )
                        .await?;
                        tx.commit().await?;
                        // Committed: now surelink may ack.
                        channel.confirm(m.id, Claimed::Now);
                        tally.lock().unwrap().committed += 1;
                    }
                    Claimed::Before => {
                        // Already in the ledger (a retry): ack without a second effect.
                        tx.rollback().await?;
                        channel.confirm(m.id, Claimed::Before);
                        tally.lock().unwrap().already_claimed += 1;
                    }
                    Claimed::Conflict => {
                        // The key was used for another payment: no effect, the sender is
                        // told its key was reused.
                        tx.rollback().await?;
                        channel.confirm(m.id, Claimed::Conflict);
                    }
                    other => {
                        // `Busy`: another replica took the reservation over and delivers
                        // the payment: no effect here, not acked here.
                        tx.rollback().await?;
                        channel.confirm(m.id, other);
                    }
                }
            }
            Ok::<_, Box<dyn std::error::Error + Send + Sync>>(())
        })
    };

    // The client: each payment keyed, retried with its key until acked.
    let mut tasks = Vec::new();
    for i in 0..args.payments {
        let c = client.clone();
        tasks.push(tokio::spawn(async move {
            let key = format!("order-{i}");
            let mut retries = 0u32;
            loop {
                match c.send_with_key(key.clone(), payment(i)).await {
                    Ok(_) => return Ok(retries),
                    Err(SendError::Timeout { .. }) if retries < 20 => retries += 1,
                    Err(e) => return Err(format!("payment {i}: {e}")),
                }
            }
        }));
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let mut client_retries = 0;
    for t in tasks {
        client_retries += t.await??;
    }
    client.close().await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    app.abort();

    let checker = PgStore::connect(&url, Duration::from_secs(24 * 3600))
        .await?
        .client()
        .await?;
    let count = |sql: &'static str| {
        let c = &checker;
        async move { c.query_one(sql, &[]).await.map(|r| r.get::<_, i64>(0)) }
    };
    let rows = count("SELECT count(*) FROM ledger").await?;
    let claims = count("SELECT count(*) FROM surelink_claims").await?;
    let t = tally.lock().unwrap();
    println!(
        "{{\"payments\":{},\"ledger_rows\":{rows},\"claims\":{claims},\"committed\":{},\"already_claimed\":{},\"failed_attempts\":{},\"client_retries\":{client_retries}}}",
        args.payments, t.committed, t.already_claimed, t.failed
    );
    Ok(if rows == i64::from(args.payments) {
        std::process::ExitCode::SUCCESS
    } else {
        std::process::ExitCode::FAILURE
    })
}
