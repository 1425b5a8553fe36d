//! Linux: one abstract datagram socket per waiter.

use std::cell::OnceCell;
use std::io;
use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr, UnixDatagram};
use std::rc::Rc;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// This process's start time, read once: part of every address, so that a
/// recycled pid never receives another process's wake-ups.
fn start_time() -> u64 {
    static START: OnceLock<u64> = OnceLock::new();
    *START.get_or_init(|| crate::liveness::ProcessIdentity::current_start_time().unwrap_or(0))
}

/// A waiter's socket; its name is the address others wake it through.
#[derive(Debug)]
pub(crate) struct WakeSocket {
    socket: UnixDatagram,
    address: String,
}

impl WakeSocket {
    /// A new socket with a name no one else uses; `None` if the platform
    /// refuses (then the waiter only polls).
    pub(crate) fn bind() -> Option<WakeSocket> {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let address = format!(
            "runledger/{}/{}/{}",
            std::process::id(),
            start_time(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        let addr = SocketAddr::from_abstract_name(address.as_bytes()).ok()?;
        let socket = UnixDatagram::bind_addr(&addr)
            .map_err(|e| log::debug!("runledger: no wake-up socket ({e}); polling"))
            .ok()?;
        Some(WakeSocket { socket, address })
    }

    /// This thread's socket, bound on first use and kept for the thread's
    /// life: a thread waits for one request at a time, and binding a socket
    /// for each acquire cost four system calls. A wake-up meant for an
    /// earlier request of the thread only causes one extra re-check.
    pub(crate) fn for_this_thread() -> Option<Rc<WakeSocket>> {
        thread_local! {
            static SOCKET: OnceCell<Option<Rc<WakeSocket>>> = const { OnceCell::new() };
        }
        SOCKET.with(|s| s.get_or_init(|| WakeSocket::bind().map(Rc::new)).clone())
    }

    /// The address to record on the queue row.
    pub(crate) fn address(&self) -> &str {
        &self.address
    }

    /// A socket from this process's pool of idle ones (bound anew if none
    /// is idle), back in the pool when the returned handle drops: for async
    /// waiters, which have no thread to keep a socket for. A wake-up meant
    /// for an earlier user of the socket only causes one extra re-check.
    #[cfg(feature = "tokio")]
    pub(crate) fn pooled() -> Option<Pooled> {
        let idle = POOL.lock().pop();
        idle.or_else(WakeSocket::bind)
            .map(|socket| Pooled(Some(socket)))
    }

    /// Sleeps until woken or until `timeout`; true if woken.
    pub(crate) fn wait(&self, timeout: Duration) -> bool {
        let timeout = timeout.max(Duration::from_millis(1));
        // Blocking again, should an async wait have used the socket.
        if self.socket.set_nonblocking(false).is_err()
            || self.socket.set_read_timeout(Some(timeout)).is_err()
        {
            std::thread::sleep(timeout);
            return false;
        }
        let mut buf = [0u8; 16];
        let woken = self.socket.recv(&mut buf).is_ok();
        // Drain wake-ups that arrived meanwhile: one re-check covers them all.
        if woken && self.socket.set_nonblocking(true).is_ok() {
            while self.socket.recv(&mut buf).is_ok() {}
            let _ = self.socket.set_nonblocking(false);
        }
        woken
    }
}

#[cfg(feature = "tokio")]
impl WakeSocket {
    /// Waits until woken or until `timeout`, yielding to the tokio runtime
    /// meanwhile (the socket is watched by the runtime's reactor, no thread
    /// blocks); true if woken.
    ///
    /// # Panics
    ///
    /// Outside a tokio runtime with IO and time enabled, as tokio's own
    /// sockets and timers do.
    pub(crate) async fn wait_async(&self, timeout: Duration) -> bool {
        let socket = match self.for_runtime() {
            Ok(socket) => socket,
            Err(e) => {
                log::debug!("runledger: cannot watch the wake-up socket ({e}); polling");
                tokio::time::sleep(timeout).await;
                return false;
            }
        };
        let mut buf = [0u8; 16];
        let woken = matches!(
            tokio::time::timeout(timeout, socket.recv(&mut buf)).await,
            Ok(Ok(_))
        );
        // Drain wake-ups that arrived meanwhile: one re-check covers them all.
        while woken && socket.try_recv(&mut buf).is_ok() {}
        woken
    }

    /// Makes the socket non-blocking (again), as its registered copy needs.
    pub(crate) fn keep_nonblocking(&self) {
        if let Err(e) = self.socket.set_nonblocking(true) {
            log::debug!("runledger: wake-up socket stays blocking: {e}");
        }
    }

    /// The socket registered with the current runtime's reactor: a
    /// duplicate of its descriptor (the same socket), non-blocking.
    pub(crate) fn for_runtime(&self) -> io::Result<tokio::net::UnixDatagram> {
        let socket = self.socket.try_clone()?;
        socket.set_nonblocking(true)?;
        tokio::net::UnixDatagram::from_std(socket)
    }
}

/// Idle sockets of async waiters, for the next one.
#[cfg(feature = "tokio")]
static POOL: parking_lot::Mutex<Vec<WakeSocket>> = parking_lot::Mutex::new(Vec::new());

/// How many idle sockets the pool keeps.
#[cfg(feature = "tokio")]
const MAX_POOLED: usize = 64;

/// A socket of the pool, lent to one async waiter.
#[cfg(feature = "tokio")]
#[derive(Debug)]
pub(crate) struct Pooled(Option<WakeSocket>);

#[cfg(feature = "tokio")]
impl std::ops::Deref for Pooled {
    type Target = WakeSocket;

    fn deref(&self) -> &WakeSocket {
        self.0
            .as_ref()
            .expect("a pooled socket is there until dropped")
    }
}

#[cfg(feature = "tokio")]
impl Drop for Pooled {
    fn drop(&mut self) {
        let mut pool = POOL.lock();
        if let Some(socket) = self.0.take()
            && pool.len() < MAX_POOLED
        {
            pool.push(socket);
        }
    }
}

/// Wakes the waiters at `addresses`, best effort: a waiter that is gone, or
/// whose queue of wake-ups is full, is skipped (it polls anyway).
pub(crate) fn wake(addresses: &[String]) {
    static SENDER: OnceLock<io::Result<UnixDatagram>> = OnceLock::new();
    let Ok(sender) = SENDER.get_or_init(|| {
        let socket = UnixDatagram::unbound()?;
        socket.set_nonblocking(true)?;
        Ok(socket)
    }) else {
        return;
    };
    for address in addresses {
        if let Ok(addr) = SocketAddr::from_abstract_name(address.as_bytes()) {
            let _ = sender.send_to_addr(b"!", &addr);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;

    #[test]
    fn a_waiter_is_woken_and_times_out_otherwise() {
        let socket = WakeSocket::bind().unwrap();
        let started = Instant::now();
        assert!(!socket.wait(Duration::from_millis(20)));
        assert!(started.elapsed() >= Duration::from_millis(20));
        wake(&[socket.address().to_owned(), socket.address().to_owned()]);
        assert!(socket.wait(Duration::from_secs(5)));
        // Both wake-ups were drained by one wait.
        assert!(!socket.wait(Duration::from_millis(5)));
        // Waking someone gone is harmless.
        wake(&["runledger/nobody/0/0".to_owned()]);
    }
}
