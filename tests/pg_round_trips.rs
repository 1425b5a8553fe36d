//! Round trips to the PostgreSQL server per public call (issue 17): a call
//! that does not wait costs at most two, its transaction's start with its
//! work, and its commit.
//!
//! Counted by a TCP proxy of the test's own between the ledger and the
//! server: a round trip is a turn of the conversation, the client speaking
//! again after the server answered, however many messages (or TCP
//! segments) each turn holds. The ledger has one pooled connection and no
//! background thread, so every turn counted is the call's own. Each call
//! is counted in steady use (its statements prepared by an earlier call of
//! the same kind), and at best of three, so that a pooled connection's
//! check after an idle second on a busy machine is not counted against it.
//!
//! Needs `RUNLEDGER_PG_URL` when the tests are built; without it the test is
//! listed as ignored, with a message saying so.
#![cfg(feature = "postgres")]

mod common;

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use common::{Place, Store};
use runledger::{Ledger, LockMode, LockRequest, RunSpec};

/// A TCP proxy on 127.0.0.1 to `upstream` that counts turns of every
/// connection through it.
struct Counter {
    addr: SocketAddr,
    turns: Arc<AtomicU64>,
}

impl Counter {
    fn start(upstream: String) -> Counter {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let turns = Arc::new(AtomicU64::new(0));
        let counted = turns.clone();
        std::thread::spawn(move || {
            for client in listener.incoming() {
                let Ok(client) = client else { continue };
                let Ok(server) = TcpStream::connect(&upstream) else {
                    continue;
                };
                let _ = client.set_nodelay(true);
                let _ = server.set_nodelay(true);
                // Whether the server spoke last on this connection.
                let answered = Arc::new(AtomicBool::new(true));
                let up = (client.try_clone().unwrap(), server.try_clone().unwrap());
                let (turns, flag) = (counted.clone(), answered.clone());
                std::thread::spawn(move || {
                    pump(up.0, up.1, |_| {
                        if flag.swap(false, Ordering::SeqCst) {
                            turns.fetch_add(1, Ordering::SeqCst);
                        }
                    })
                });
                std::thread::spawn(move || {
                    pump(server, client, |_| answered.store(true, Ordering::SeqCst))
                });
            }
        });
        Counter { addr, turns }
    }

    /// The turns taken by `call`.
    fn count<T>(&self, call: impl FnOnce() -> T) -> (u64, T) {
        let before = self.turns.load(Ordering::SeqCst);
        let value = call();
        (self.turns.load(Ordering::SeqCst) - before, value)
    }
}

/// Copies `from` to `to`, telling `seen` of each read before it is passed
/// on (so that a turn is counted before its answer can come).
fn pump(mut from: TcpStream, mut to: TcpStream, seen: impl Fn(usize)) {
    let mut buf = [0u8; 16 * 1024];
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        seen(n);
        if to.write_all(&buf[..n]).is_err() {
            break;
        }
    }
    let _ = to.shutdown(Shutdown::Write);
}

/// `location` (`postgres://user@host:port/db…#schema`) with its host and
/// port replaced by `addr`, and the host and port it had.
fn through(location: &str, addr: SocketAddr) -> (String, String) {
    let at = location.find('@').expect("a URL with a user") + 1;
    let end = at + location[at..].find('/').expect("a URL with a database");
    (
        format!("{}{addr}{}", &location[..at], &location[end..]),
        location[at..end].to_owned(),
    )
}

/// Each call that does not wait, in steady use, at best of three tries.
fn every_call_that_does_not_wait_takes_at_most_two_round_trips() {
    let place = Place::new(Store::Postgres);
    drop(place.open());
    let (url, upstream) = through(&place.location, "127.0.0.1:1".parse().unwrap());
    let counter = Counter::start(upstream);
    let (url, _) = through(&url, counter.addr);
    let ledger = Ledger::builder(url)
        .background(false)
        .pool_size(1)
        .busy_timeout(Duration::from_secs(30))
        .open()
        .unwrap();

    let mut worst = Vec::new();
    let mut note = |what: &str, turns: &mut dyn FnMut() -> u64| {
        // The first of each kind prepares its statements.
        turns();
        let best = (0..3).map(|_| turns()).min().unwrap();
        worst.push((what.to_owned(), best));
    };
    let ledger = &ledger;
    let c = &counter;
    note("begin_run", &mut || {
        let (n, run) = c.count(|| ledger.begin_run(RunSpec::new("counted")).unwrap());
        run.succeed().unwrap();
        n
    });
    note("create_run (queued)", &mut || {
        c.count(|| ledger.create_run(RunSpec::new("counted").queued()).unwrap())
            .0
    });
    note("Run::start", &mut || {
        let run = ledger
            .adopt_run_queued(ledger.create_run(RunSpec::new("q").queued()).unwrap())
            .unwrap();
        let (n, ()) = c.count(|| run.start().unwrap());
        run.succeed().unwrap();
        n
    });
    let run = ledger.begin_run(RunSpec::new("steps")).unwrap();
    let mut i = 0;
    note("Run::step", &mut || {
        i += 1;
        let (n, step) = c.count(|| run.step(format!("s{i}")).unwrap());
        step.succeed().unwrap();
        n
    });
    note("Step::succeed", &mut || {
        i += 1;
        let step = run.step(format!("s{i}")).unwrap();
        c.count(|| step.succeed().unwrap()).0
    });
    note("Step::fail", &mut || {
        i += 1;
        let step = run.step(format!("s{i}")).unwrap();
        c.count(|| step.fail("no").unwrap()).0
    });
    note("Run::event", &mut || {
        c.count(|| run.event("e", serde_json::json!({"n": 1})).unwrap())
            .0
    });
    note("Run::heartbeat", &mut || {
        c.count(|| run.heartbeat().unwrap()).0
    });
    note("Run::set_log_path", &mut || {
        c.count(|| run.set_log_path("/tmp/counted.log").unwrap()).0
    });
    note("Run::is_cancel_requested", &mut || {
        c.count(|| run.is_cancel_requested().unwrap()).0
    });
    drop(run);
    note("Run::succeed", &mut || {
        let run = ledger.begin_run(RunSpec::new("ends")).unwrap();
        c.count(|| run.succeed().unwrap()).0
    });
    note("Run::fail", &mut || {
        let run = ledger.begin_run(RunSpec::new("ends")).unwrap();
        c.count(|| run.fail("no").unwrap()).0
    });
    note("Ledger::cancel", &mut || {
        let run = ledger.begin_run(RunSpec::new("cancelled")).unwrap();
        let (n, _) = c.count(|| ledger.cancel(run.id()).unwrap());
        run.cancelled().unwrap();
        n
    });
    note("Ledger::try_lock", &mut || {
        let (n, guard) = c.count(|| ledger.try_lock("counted").unwrap());
        guard.release().unwrap();
        n
    });
    note("LockGuard::release", &mut || {
        let guard = ledger.try_lock("counted").unwrap();
        c.count(|| guard.release().unwrap()).0
    });
    note("Ledger::acquire (two keys, shared)", &mut || {
        let request = LockRequest::new(["a", "b"])
            .mode(LockMode::Shared)
            .no_wait();
        let (n, guard) = c.count(|| ledger.acquire(request).unwrap());
        guard.release().unwrap();
        n
    });
    note("LockGuard::is_held", &mut || {
        let guard = ledger.try_lock("counted").unwrap();
        let (n, _) = c.count(|| guard.is_held().unwrap());
        guard.release().unwrap();
        n
    });
    note("Run::lock + release", &mut || {
        let run = ledger.begin_run(RunSpec::new("locks")).unwrap();
        let (n, guard) = c.count(|| run.lock("run-key").unwrap());
        guard.release().unwrap();
        run.succeed().unwrap();
        n
    });
    note("Ledger::heartbeat", &mut || {
        c.count(|| ledger.heartbeat().unwrap()).0
    });

    let over: Vec<_> = worst.iter().filter(|(_, n)| *n > 2).collect();
    assert!(
        over.is_empty(),
        "calls over two round trips: {over:?} (all: {worst:?})"
    );
}

pg_tests!(every_call_that_does_not_wait_takes_at_most_two_round_trips);
