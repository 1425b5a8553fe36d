//! Wake-ups across hosts: `LISTEN`/`NOTIFY` on the schema's channel.
//!
//! A write that frees keys or appends events notifies the wake-up addresses
//! of the waiters and watchers it found, in its transaction (so the
//! notification goes out on commit only). A process keeps one connection
//! per server listening on the channels of all its stores there (one per
//! schema), on a thread of its own, and sends each address
//! it hears of the local one-byte datagram (see `crate::wake`); addresses of
//! other hosts name no socket here and cost one failed send. A payload
//! starts with the writing process's origin, so a process skips its own
//! notifications: it already woke its host's addresses after the commit.

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::time::{Duration, Instant};

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

/// How long opening a ledger waits for the shared listening connection to
/// listen on its channel.
const LISTEN_WAIT: Duration = Duration::from_secs(5);

/// The listening connections of this process, one per server (and TLS
/// setting), each shared by every store of the process on that server.
static LISTENERS: Mutex<Vec<Arc<Server>>> = Mutex::new(Vec::new());

/// One server's listening connection, as the stores of this process on
/// that server share it: the channels it should listen on (with how many
/// stores want each), and those it does.
#[derive(Debug)]
struct Server {
    key: String,
    state: Mutex<Channels>,
    /// Signalled when the thread listens on a new set of channels.
    listening: Condvar,
}

#[derive(Debug, Default)]
struct Channels {
    wanted: HashMap<String, usize>,
    /// What the connection listens on now.
    active: HashSet<String>,
    /// The thread has ended (no store wants a channel any more).
    ended: bool,
}

/// A store's registration with its server's listening connection; dropped
/// with the store, it stops listening on the store's channel (and the
/// connection closes with the last one).
#[derive(Debug)]
pub(super) struct Listener {
    server: Arc<Server>,
    channel: String,
}

impl Listener {
    /// Listens on `channel` over the process's connection to the server of
    /// `config` (`key` names that server), opening it if this is the first
    /// store of the process there. Waits (a few seconds at most) until the
    /// connection listens on the channel.
    pub(super) fn start(
        config: Config,
        tls: MakeRustlsConnect,
        key: String,
        channel: String,
        name: PathBuf,
    ) -> Result<Listener> {
        let mut servers = LISTENERS.lock().unwrap_or_else(|e| e.into_inner());
        let shared = servers
            .iter()
            .find(|s| s.key == key && !s.lock().ended)
            .cloned();
        let server = match shared {
            Some(server) => {
                *server.lock().wanted.entry(channel.clone()).or_insert(0) += 1;
                server
            }
            None => {
                let client = listen(&config, &tls, &[&channel]).map_err(|e| Error::Open {
                    path: name.clone(),
                    reason: format!("cannot listen for wake-ups: {e}"),
                    source: None,
                })?;
                let server = Arc::new(Server {
                    key,
                    state: Mutex::new(Channels {
                        wanted: HashMap::from([(channel.clone(), 1)]),
                        active: HashSet::from([channel.clone()]),
                        ended: false,
                    }),
                    listening: Condvar::new(),
                });
                let theirs = server.clone();
                std::thread::Builder::new()
                    .name("runledger-listen".into())
                    .spawn(move || run(client, &config, &tls, &theirs))
                    .map_err(|e| Error::open(&name, "cannot start the wake-up listener", e))?;
                servers.retain(|s| !s.lock().ended);
                servers.push(server.clone());
                server
            }
        };
        drop(servers);
        // Until the connection listens on the channel, waiters only poll.
        let deadline = Instant::now() + LISTEN_WAIT;
        let mut state = server.lock();
        while !state.active.contains(&channel) && !state.ended {
            let now = Instant::now();
            if now >= deadline {
                log::debug!("runledger: not listening on {channel} yet; waiters poll meanwhile");
                break;
            }
            state = server
                .listening
                .wait_timeout(state, deadline - now)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        drop(state);
        Ok(Listener { server, channel })
    }
}

impl Server {
    fn lock(&self) -> std::sync::MutexGuard<'_, Channels> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        let mut state = self.server.lock();
        if let Some(count) = state.wanted.get_mut(&self.channel) {
            *count -= 1;
            if *count == 0 {
                state.wanted.remove(&self.channel);
            }
        }
    }
}

fn listen(
    config: &Config,
    tls: &MakeRustlsConnect,
    channels: &[&str],
) -> std::result::Result<Client, postgres::Error> {
    let mut client = config.connect(tls.clone())?;
    let sql: String = channels
        .iter()
        .map(|c| format!("LISTEN \"{c}\";"))
        .collect();
    client.batch_execute(&sql)?;
    Ok(client)
}

/// The listening loop: follows the channels the stores want, wakes the
/// addresses it hears of, reconnects (every second at most) when the
/// connection breaks (waiters poll meanwhile), and ends once no store
/// wants a channel.
fn run(mut client: Client, config: &Config, tls: &MakeRustlsConnect, server: &Server) {
    loop {
        // Follow the stores: LISTEN to new channels, UNLISTEN to old ones.
        let changes = {
            let mut state = server.lock();
            if state.wanted.is_empty() {
                state.ended = true;
                state.active.clear();
                server.listening.notify_all();
                return;
            }
            let mut sql = String::new();
            for channel in state.wanted.keys() {
                if !state.active.contains(channel) {
                    sql.push_str(&format!("LISTEN \"{channel}\";"));
                }
            }
            for channel in &state.active {
                if !state.wanted.contains_key(channel) {
                    sql.push_str(&format!("UNLISTEN \"{channel}\";"));
                }
            }
            (!sql.is_empty()).then(|| (sql, state.wanted.keys().cloned().collect::<HashSet<_>>()))
        };
        let mut broken = None;
        if let Some((sql, wanted)) = changes {
            match client.batch_execute(&sql) {
                Ok(()) => {
                    server.lock().active = wanted;
                    server.listening.notify_all();
                }
                Err(e) => broken = Some(e),
            }
        }
        if broken.is_none() {
            let mut notifications = client.notifications();
            let mut iter = notifications.timeout_iter(POLL);
            loop {
                match iter.next() {
                    Ok(Some(note)) => wake(&addresses(note.payload())),
                    Ok(None) => break,
                    Err(e) => {
                        broken = Some(e);
                        break;
                    }
                }
            }
        }
        // A closed connection reports no error from the iterator.
        if broken.is_none()
            && client.is_closed()
            && let Err(e) = client.simple_query("")
        {
            broken = Some(e);
        }
        if let Some(e) = broken {
            log::debug!("runledger: wake-up listener lost its connection: {e}");
            server.lock().active.clear();
            loop {
                if server.lock().wanted.is_empty() {
                    break;
                }
                std::thread::sleep(Duration::from_secs(1));
                let wanted: Vec<String> = server.lock().wanted.keys().cloned().collect();
                let channels: Vec<&str> = wanted.iter().map(String::as_str).collect();
                match listen(config, tls, &channels) {
                    Ok(fresh) => {
                        client = fresh;
                        server.lock().active = wanted.into_iter().collect();
                        server.listening.notify_all();
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
