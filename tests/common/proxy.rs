//! A TCP proxy that counts round trips: turns of the conversation, the
//! client speaking again after the server answered, however many messages
//! (or TCP segments) each turn holds.

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

/// A TCP proxy on 127.0.0.1 to `upstream` that counts turns of every
/// connection through it, and can lose the answer to a turn.
pub struct Counter {
    /// Where it listens.
    pub addr: SocketAddr,
    turns: Arc<AtomicU64>,
    /// The next turn's request reaches the server, its answer is dropped
    /// and its connection closed, as when a link or a server fails
    /// between the two.
    sever: Arc<AtomicBool>,
    /// How many turns were severed so.
    pub severed: Arc<AtomicU64>,
    /// The server is out of reach: every connection is closed as it comes
    /// or as it next speaks, until [`Counter::up`].
    down: Arc<AtomicBool>,
    /// The next severed turn takes the server out of reach.
    down_after: Arc<AtomicBool>,
}

impl Counter {
    /// Starts one, on a free port.
    pub fn start(upstream: String) -> Counter {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let turns = Arc::new(AtomicU64::new(0));
        let counted = turns.clone();
        let sever = Arc::new(AtomicBool::new(false));
        let severed = Arc::new(AtomicU64::new(0));
        let (to_sever, count_severed) = (sever.clone(), severed.clone());
        let down = Arc::new(AtomicBool::new(false));
        let down_after = Arc::new(AtomicBool::new(false));
        let (is_down, going_down) = (down.clone(), down_after.clone());
        std::thread::spawn(move || {
            for client in listener.incoming() {
                let Ok(client) = client else { continue };
                if is_down.load(Ordering::SeqCst) {
                    continue; // dropped: closed at once
                }
                let Ok(server) = TcpStream::connect(&upstream) else {
                    continue;
                };
                let _ = client.set_nodelay(true);
                let _ = server.set_nodelay(true);
                // Whether the server spoke last on this connection.
                let answered = Arc::new(AtomicBool::new(true));
                // Whether this connection's answers are dropped.
                let cut = Arc::new(AtomicBool::new(false));
                let up = (client.try_clone().unwrap(), server.try_clone().unwrap());
                let (turns, flag) = (counted.clone(), answered.clone());
                let (sever, severed, cut_up) =
                    (to_sever.clone(), count_severed.clone(), cut.clone());
                let (down_up, down_after) = (is_down.clone(), going_down.clone());
                let down_down = is_down.clone();
                let closing = client.try_clone().unwrap();
                std::thread::spawn(move || {
                    pump(up.0, up.1, |_| {
                        if down_up.load(Ordering::SeqCst) {
                            return false;
                        }
                        if flag.swap(false, Ordering::SeqCst) {
                            turns.fetch_add(1, Ordering::SeqCst);
                            if sever.swap(false, Ordering::SeqCst) {
                                cut_up.store(true, Ordering::SeqCst);
                                severed.fetch_add(1, Ordering::SeqCst);
                            }
                        }
                        true
                    })
                });
                std::thread::spawn(move || {
                    pump(server, client, |_| {
                        answered.store(true, Ordering::SeqCst);
                        if cut.load(Ordering::SeqCst) {
                            if down_after.swap(false, Ordering::SeqCst) {
                                down_down.store(true, Ordering::SeqCst);
                            }
                            let _ = closing.shutdown(Shutdown::Both);
                        }
                        !down_down.load(Ordering::SeqCst)
                    })
                });
            }
        });
        Counter {
            addr,
            turns,
            sever,
            severed,
            down,
            down_after,
        }
    }

    /// Loses the answer to the next turn of any connection.
    pub fn sever_next(&self) {
        self.sever.store(true, Ordering::SeqCst);
    }

    /// Loses the answer to the next turn, then keeps the server out of
    /// reach (every connection closed) until [`Counter::up`].
    pub fn sever_next_and_go_down(&self) {
        self.down_after.store(true, Ordering::SeqCst);
        self.sever_next();
    }

    /// Brings the server back in reach.
    pub fn up(&self) {
        self.down.store(false, Ordering::SeqCst);
    }

    /// The turns taken by `call`.
    pub fn count<T>(&self, call: impl FnOnce() -> T) -> (u64, T) {
        let before = self.turns.load(Ordering::SeqCst);
        let value = call();
        (self.turns.load(Ordering::SeqCst) - before, value)
    }
}

/// Copies `from` to `to`, telling `seen` of each read before it is passed
/// on (so that a turn is counted, and marked to be severed, before its
/// answer can come). A write to a socket `seen` shut ends the copy, as does
/// `seen` answering false (the read is not passed on).
fn pump(mut from: TcpStream, mut to: TcpStream, seen: impl Fn(usize) -> bool) {
    let mut buf = [0u8; 16 * 1024];
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        if !seen(n) {
            let _ = from.shutdown(Shutdown::Both);
            break;
        }
        if to.write_all(&buf[..n]).is_err() {
            break;
        }
    }
    let _ = to.shutdown(Shutdown::Write);
}

/// The least of three counts by `call` after a first one (which may
/// prepare its statements): the round trips of a call in steady use, so
/// that a pooled connection's check after an idle second on a busy
/// machine is not counted against it.
pub fn best_of_three(call: &mut dyn FnMut() -> u64) -> u64 {
    call();
    (0..3).map(|_| call()).min().unwrap()
}
