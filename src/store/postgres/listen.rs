//! Wake-ups across hosts: `LISTEN`/`NOTIFY` on the schema's channel.
//!
//! A write that frees keys or appends events notifies the wake-up addresses
//! of the waiters and watchers it found, in its transaction (so the
//! notification goes out on commit only). Every store keeps one connection
//! listening on the channel, on a thread of its own, and sends each address
//! it hears of the local one-byte datagram (see `crate::wake`); addresses of
//! other hosts name no socket here and cost one failed send. A payload
//! starts with the writing process's origin, so a process skips its own
//! notifications: it already woke its host's addresses after the commit.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use postgres::fallible_iterator::FallibleIterator;
use postgres::{Client, Config};
use tokio_postgres_rustls::MakeRustlsConnect;

use crate::error::{Error, Result};
use crate::wake::wake;

/// How often the listening thread checks whether its store is gone.
const POLL: Duration = Duration::from_millis(200);

/// PostgreSQL refuses payloads of 8000 bytes or more.
const MAX_PAYLOAD: usize = 7000;

/// How many watchers' addresses the commit's own notification carries at
/// most: a watcher's address is under 64 bytes, and PostgreSQL refuses
/// payloads of 8000 bytes or more. More are notified after the commit, in
/// payloads of [`payloads`].
pub(super) const ADDRESSES_PER_PAYLOAD: usize = 100;

/// This process's origin tag: its pid and a random part, so that a payload
/// written by this process is known as ours.
pub(super) fn origin() -> &'static str {
    static ORIGIN: OnceLock<String> = OnceLock::new();
    ORIGIN.get_or_init(|| {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
        format!("{}.{nanos:x}", std::process::id())
    })
}

/// The payloads that carry `addresses`: the origin on the first line, one
/// address per line, each under PostgreSQL's size limit.
pub(super) fn payloads(addresses: &[String]) -> Vec<String> {
    let mut out = Vec::new();
    let mut current = String::new();
    for address in addresses {
        if !current.is_empty() && current.len() + address.len() + 1 > MAX_PAYLOAD {
            out.push(std::mem::take(&mut current));
        }
        if current.is_empty() {
            current.push_str(origin());
        }
        current.push('\n');
        current.push_str(address);
    }
    if !current.is_empty() {
        out.push(current);
    }
    out
}

/// The addresses of a payload from another process; none from this one.
fn addresses(payload: &str) -> Vec<String> {
    let mut lines = payload.lines();
    match lines.next() {
        Some(from) if from != origin() => lines.map(str::to_owned).collect(),
        _ => Vec::new(),
    }
}

/// The listening thread of one store; stops when dropped.
#[derive(Debug)]
pub(super) struct Listener {
    stop: Arc<AtomicBool>,
}

impl Listener {
    /// Connects, listens on `channel`, and hands the connection to a thread
    /// that wakes the addresses it hears of.
    pub(super) fn start(
        config: Config,
        tls: MakeRustlsConnect,
        channel: String,
        name: PathBuf,
    ) -> Result<Listener> {
        let client = listen(&config, &tls, &channel).map_err(|e| Error::Open {
            path: name.clone(),
            reason: format!("cannot listen for wake-ups: {e}"),
            source: None,
        })?;
        let stop = Arc::new(AtomicBool::new(false));
        let stopped = stop.clone();
        std::thread::Builder::new()
            .name("runledger-listen".into())
            .spawn(move || run(client, &config, &tls, &channel, &stopped))
            .map_err(|e| Error::open(&name, "cannot start the wake-up listener", e))?;
        Ok(Listener { stop })
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

fn listen(
    config: &Config,
    tls: &MakeRustlsConnect,
    channel: &str,
) -> std::result::Result<Client, postgres::Error> {
    let mut client = config.connect(tls.clone())?;
    client.batch_execute(&format!("LISTEN \"{channel}\""))?;
    Ok(client)
}

/// The listening loop: reconnects (every second at most) when the
/// connection breaks; waiters poll meanwhile.
fn run(
    mut client: Client,
    config: &Config,
    tls: &MakeRustlsConnect,
    channel: &str,
    stop: &AtomicBool,
) {
    while !stop.load(Ordering::Relaxed) {
        let heard = {
            let mut notifications = client.notifications();
            let mut iter = notifications.timeout_iter(POLL);
            loop {
                match iter.next() {
                    Ok(Some(note)) => wake(&addresses(note.payload())),
                    Ok(None) => break Ok(()),
                    Err(e) => break Err(e),
                }
            }
        };
        if let Err(e) = heard.and_then(|()| {
            // A closed connection reports no error from the iterator.
            if client.is_closed() {
                client.simple_query("").map(|_| ())
            } else {
                Ok(())
            }
        }) {
            log::debug!("runledger: wake-up listener lost its connection: {e}");
            loop {
                if stop.load(Ordering::Relaxed) {
                    return;
                }
                std::thread::sleep(Duration::from_secs(1));
                match listen(config, tls, channel) {
                    Ok(fresh) => {
                        client = fresh;
                        break;
                    }
                    Err(e) => log::debug!("runledger: cannot listen again yet: {e}"),
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payloads_stay_under_the_limit_and_skip_our_own() {
        let many: Vec<String> = (0..2000).map(|i| format!("runledger/1/2/{i}")).collect();
        let out = payloads(&many);
        assert!(out.len() > 1);
        assert!(out.iter().all(|p| p.len() < MAX_PAYLOAD + 100));
        let all: Vec<String> = out
            .iter()
            .flat_map(|p| p.lines().skip(1).map(str::to_owned))
            .collect();
        assert_eq!(all, many);
        // Our own payloads wake nothing here; another origin's do.
        assert!(addresses(&out[0]).is_empty());
        assert_eq!(addresses("someone-else\na\nb"), ["a", "b"]);
        assert!(payloads(&[]).is_empty());
    }
}
