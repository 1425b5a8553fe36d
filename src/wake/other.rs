//! Platforms without abstract Unix sockets: no wake-ups; waiters poll.

use std::time::Duration;

#[derive(Debug)]
pub(crate) struct WakeSocket;

impl WakeSocket {
    pub(crate) fn bind() -> Option<WakeSocket> {
        None
    }

    pub(crate) fn for_this_thread() -> Option<std::rc::Rc<WakeSocket>> {
        None
    }

    pub(crate) fn address(&self) -> &str {
        ""
    }

    pub(crate) fn wait(&self, timeout: Duration) -> bool {
        std::thread::sleep(timeout);
        false
    }

    #[cfg(feature = "tokio")]
    pub(crate) fn pooled() -> Option<Pooled> {
        None
    }

    #[cfg(feature = "tokio")]
    pub(crate) fn keep_nonblocking(&self) {}

    #[cfg(feature = "tokio")]
    pub(crate) fn for_runtime(&self) -> std::io::Result<tokio::net::UnixDatagram> {
        Err(std::io::ErrorKind::Unsupported.into())
    }

    #[cfg(feature = "tokio")]
    pub(crate) async fn wait_async(&self, timeout: Duration) -> bool {
        tokio::time::sleep(timeout).await;
        false
    }
}

/// A socket lent to an async waiter (never made here).
#[cfg(feature = "tokio")]
#[derive(Debug)]
pub(crate) struct Pooled(WakeSocket);

#[cfg(feature = "tokio")]
impl std::ops::Deref for Pooled {
    type Target = WakeSocket;

    fn deref(&self) -> &WakeSocket {
        &self.0
    }
}

pub(crate) fn wake(_addresses: &[String]) {}
