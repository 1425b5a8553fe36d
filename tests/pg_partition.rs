//! Faults of the link to the PostgreSQL server (issue 20): a holder cut
//! off for longer than its lease (the others reap it, its lock passes on
//! with a higher token, and once it is back its guard reports `LockLost`
//! and `is_held()` is false); calls and opens through a dead link that
//! fail in time instead of hanging; an open that waits for a server
//! starting up.
//!
//! The link is cut by a TCP proxy of the test's own between the holder (a
//! process of its own) and the server: cut, it forwards no byte either way
//! but keeps every socket open, as a link taken down does (TCP holds the
//! bytes and sends them once the link is back). No root, no network
//! namespace.
//!
//! Needs `RUNLEDGER_PG_URL` when the tests are built; without it the test is
//! listed as ignored, with a message saying so.
#![cfg(feature = "postgres")]

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::mpsc;
use std::time::Duration;

use common::{KillOnDrop, Place, Store, worker};
use runledger::Ledger;

/// A TCP proxy on 127.0.0.1 to `upstream` that can be cut and restored,
/// and can answer new connections as a server starting up does.
struct Proxy {
    addr: SocketAddr,
    cut: Arc<AtomicBool>,
    /// How many new connections are still to be refused with SQLSTATE
    /// 57P03 (`u32::MAX`: all of them).
    starting: Arc<AtomicU32>,
}

impl Proxy {
    fn start(upstream: String) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let cut = Arc::new(AtomicBool::new(false));
        let starting = Arc::new(AtomicU32::new(0));
        let flag = cut.clone();
        let refusals = starting.clone();
        std::thread::spawn(move || {
            for client in listener.incoming() {
                let Ok(client) = client else { continue };
                let refuse = refusals
                    .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| match n {
                        0 => None,
                        u32::MAX => Some(u32::MAX),
                        n => Some(n - 1),
                    })
                    .is_ok();
                if refuse {
                    std::thread::spawn(move || starting_up(client));
                    continue;
                }
                let Ok(server) = TcpStream::connect(&upstream) else {
                    continue;
                };
                let _ = client.set_nodelay(true);
                let _ = server.set_nodelay(true);
                for (from, to) in [
                    (client.try_clone().unwrap(), server.try_clone().unwrap()),
                    (server, client),
                ] {
                    let cut = flag.clone();
                    std::thread::spawn(move || pump(from, to, &cut));
                }
            }
        });
        Proxy {
            addr,
            cut,
            starting,
        }
    }

    /// Answers the next `n` new connections (`u32::MAX`: all) as a server
    /// that is starting up.
    fn starting_up(&self, n: u32) {
        self.starting.store(n, Ordering::SeqCst);
    }

    /// Stops every byte, both ways, on every connection (new ones too).
    fn cut(&self) {
        self.cut.store(true, Ordering::SeqCst);
    }

    /// Lets the bytes flow again, those held back first.
    fn restore(&self) {
        self.cut.store(false, Ordering::SeqCst);
    }
}

/// Answers a client as PostgreSQL does while it starts up: no TLS, then
/// `FATAL: the database system is starting up` (SQLSTATE 57P03) to its
/// start-up message, and the connection closed.
fn starting_up(mut client: TcpStream) {
    let message = |client: &mut TcpStream| -> std::io::Result<Vec<u8>> {
        let mut len = [0u8; 4];
        client.read_exact(&mut len)?;
        let mut body = vec![0u8; (u32::from_be_bytes(len) as usize).saturating_sub(4)];
        client.read_exact(&mut body)?;
        Ok(body)
    };
    let Ok(mut first) = message(&mut client) else {
        return;
    };
    // SSLRequest: "no TLS here", then the start-up message itself.
    if first == 80_877_103u32.to_be_bytes() {
        if client.write_all(b"N").is_err() {
            return;
        }
        first = match message(&mut client) {
            Ok(startup) => startup,
            Err(_) => return,
        };
    }
    drop(first);
    let mut fields = Vec::new();
    for (code, value) in [
        (b'S', "FATAL"),
        (b'V', "FATAL"),
        (b'C', "57P03"),
        (b'M', "the database system is starting up"),
    ] {
        fields.push(code);
        fields.extend_from_slice(value.as_bytes());
        fields.push(0);
    }
    fields.push(0);
    let mut reply = vec![b'E'];
    reply.extend_from_slice(&(fields.len() as u32 + 4).to_be_bytes());
    reply.extend_from_slice(&fields);
    let _ = client.write_all(&reply);
}

/// Copies `from` to `to`; while `cut`, holds what it read and reads no
/// more, so that the bytes wait in the sockets' buffers as on a dead link.
fn pump(mut from: TcpStream, mut to: TcpStream, cut: &AtomicBool) {
    let mut buf = [0u8; 16 * 1024];
    loop {
        while cut.load(Ordering::SeqCst) {
            std::thread::sleep(Duration::from_millis(5));
        }
        let n = match from.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        while cut.load(Ordering::SeqCst) {
            std::thread::sleep(Duration::from_millis(5));
        }
        if to.write_all(&buf[..n]).is_err() {
            break;
        }
    }
    let _ = to.shutdown(Shutdown::Write);
}

/// `location` (`postgres://user@host:port/db…#schema`) with its host and
/// port replaced by `addr`.
fn through(location: &str, addr: SocketAddr) -> String {
    let at = location.find('@').expect("a URL with a user") + 1;
    let end = at + location[at..].find('/').expect("a URL with a database");
    format!("{}{addr}{}", &location[..at], &location[end..])
}

/// Lines a process prints, read on a thread of their own, so that a test
/// can wait for one no longer than it means to.
fn lines_of(stdout: std::process::ChildStdout) -> mpsc::Receiver<String> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    rx
}

/// The holder (a process of its own, a host of its own judged by its lease
/// of 1 s) takes a lock through the proxy; the link is cut for longer than
/// its lease; the others reap it and take the lock with a higher token;
/// the link comes back; the holder's `is_held()` is false and its release
/// is `LockLost`.
fn a_holder_cut_off_past_its_lease_finds_its_lock_lost() {
    let place = Place::new(Store::Postgres);
    // The others: straight to the server, the schema created. No keeper
    // of its own, so that the reap below is the one that frees the lock.
    // Its clock is the test's, moved past the holder's lease below.
    let clock = runledger::ManualClock::default();
    let ledger: Ledger = place
        .builder()
        .clock(clock.clone())
        .background(false)
        .open()
        .unwrap();
    let proxy = Proxy::start(upstream_of(&place.location));
    let args = [
        "hold",
        "cut-off",
        "--host",
        "far-away",
        "--stale-ms",
        "1000",
        "--busy-ms",
        "2000",
        "--stdin",
        "--report",
    ];
    let mut holder = KillOnDrop(
        Command::new(worker())
            .arg(through(&place.location, proxy.addr))
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("worker starts"),
    );
    let lines = lines_of(holder.stdout.take().unwrap());
    let next = |within: Duration| lines.recv_timeout(within);
    let line = next(Duration::from_secs(60)).expect("the holder took the lock");
    let old: u64 = line
        .strip_prefix("held ")
        .unwrap_or_else(|| panic!("{line}"))
        .parse()
        .unwrap();

    proxy.cut();
    // Far past its lease of 1 s, by the injected clock: the others judge it
    // by its heartbeat only (a host of its own), and cut off it can no
    // longer renew it.
    // From now, not from when the clock was made: the holder took a while
    // to start on a busy machine, and heartbeats it sent meanwhile are
    // stamped with the server's time.
    clock.set(runledger::Clock::now(&runledger::SystemClock));
    clock.advance(Duration::from_secs(30));
    let reports = ledger.reap().unwrap();
    assert!(
        reports
            .iter()
            .flat_map(|r| &r.reaped)
            .any(|r| r.to_string().contains("heartbeat stale")),
        "{reports:?}"
    );
    let mine = ledger.try_lock("cut-off").unwrap();
    assert!(mine.token() > old, "{} after {old}", mine.token());

    proxy.restore();
    writeln!(holder.stdin.as_mut().unwrap(), "go on").unwrap();
    let mut report = Vec::new();
    while report.len() < 2 {
        match next(Duration::from_secs(30)) {
            Ok(line) => report.push(line),
            Err(e) => panic!("the holder said only {report:?}: {e}"),
        }
    }
    assert_eq!(report[0], "still held false", "{report:?}");
    assert!(
        report[1].starts_with("lost lock on \"cut-off\""),
        "{report:?}"
    );
    assert!(holder.wait().unwrap().success(), "{report:?}");
    assert!(mine.is_held().unwrap());
    mine.release().unwrap();
}

/// The server's host and port in `location`.
fn upstream_of(location: &str) -> String {
    let at = location.find('@').unwrap() + 1;
    let end = at + location[at..].find('/').unwrap();
    location[at..end].to_owned()
}

/// Runs `call` on a thread of its own and returns what it returned, or
/// `None` if it had not returned within `within`: a call that hangs fails
/// the test instead of hanging it.
fn within<T: Send + 'static>(
    within: Duration,
    call: impl FnOnce() -> T + Send + 'static,
) -> Option<T> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(call());
    });
    rx.recv_timeout(within).ok()
}

/// A ledger whose pooled connection sat idle while the link went down: the
/// next call does not wait for TCP to give up (minutes), it fails once
/// the busy timeout is over, with an error that says the server did not
/// answer; once the link is back, calls succeed again.
fn a_call_on_an_idle_connection_fails_in_time_while_the_link_is_down() {
    let place = Place::new(Store::Postgres);
    drop(place.open());
    let proxy = Proxy::start(upstream_of(&place.location));
    let ledger = Ledger::builder(through(&place.location, proxy.addr))
        .busy_timeout(Duration::from_millis(500))
        .background(false)
        .open()
        .unwrap();
    let ledger = Arc::new(ledger);
    ledger.runs(runledger::RunFilter::default()).unwrap();
    // Idle for longer than a connection goes unchecked.
    std::thread::sleep(Duration::from_millis(1_100));
    proxy.cut();
    let cut_off = ledger.clone();
    let result = within(Duration::from_secs(20), move || {
        cut_off.runs(runledger::RunFilter::default())
    })
    .expect("the call returned, instead of waiting for the link");
    let e = result.expect_err("no server answered");
    assert!(matches!(e, runledger::Error::Busy { .. }), "{e:?}");
    let text = format!(
        "{e}: {:?}",
        std::error::Error::source(&e).map(|s| s.to_string())
    );
    assert!(text.contains("did not answer"), "{text}");

    proxy.restore();
    let back = ledger.clone();
    let runs = within(Duration::from_secs(20), move || {
        back.runs(runledger::RunFilter::default())
    })
    .expect("the call returned once the link was back");
    assert!(runs.is_ok(), "{runs:?}");
}

/// Opening a ledger through a link that is down fails once the busy
/// timeout is over, saying that the server did not answer, instead of
/// waiting as long as TCP keeps the connection.
fn opening_through_a_dead_link_fails_in_time() {
    let place = Place::new(Store::Postgres);
    drop(place.open());
    let proxy = Proxy::start(upstream_of(&place.location));
    proxy.cut();
    let url = through(&place.location, proxy.addr);
    let result = within(Duration::from_secs(20), move || {
        Ledger::builder(url)
            .busy_timeout(Duration::from_millis(500))
            .open()
    })
    .expect("the open returned, instead of waiting for the link");
    let e = result.expect_err("no server answered");
    assert!(matches!(e, runledger::Error::Open { .. }), "{e:?}");
    assert!(e.to_string().contains("did not answer"), "{e}");
}

/// Opening a ledger while the server is starting up (as in a restart)
/// waits for it, up to the busy timeout: the open succeeds once the server
/// takes connections, and fails past the timeout with the server's words.
fn opening_while_the_server_starts_up_waits_for_it() {
    let place = Place::new(Store::Postgres);
    drop(place.open());
    let proxy = Proxy::start(upstream_of(&place.location));
    let url = through(&place.location, proxy.addr);

    proxy.starting_up(3);
    let opened = Ledger::builder(&url)
        .busy_timeout(Duration::from_secs(20))
        .open();
    assert!(opened.is_ok(), "{:?}", opened.err());
    drop(opened);

    proxy.starting_up(u32::MAX);
    let e = within(Duration::from_secs(20), move || {
        Ledger::builder(url)
            .busy_timeout(Duration::from_millis(500))
            .open()
    })
    .expect("the open returned")
    .expect_err("the server never took a connection");
    assert!(matches!(e, runledger::Error::Open { .. }), "{e:?}");
    assert!(e.to_string().contains("starting up"), "{e}");
}

pg_tests!(
    opening_while_the_server_starts_up_waits_for_it,
    a_holder_cut_off_past_its_lease_finds_its_lock_lost,
    a_call_on_an_idle_connection_fails_in_time_while_the_link_is_down,
    opening_through_a_dead_link_fails_in_time
);
