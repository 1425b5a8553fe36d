//! Platforms without abstract Unix sockets: no wake-ups; waiters poll.

use std::time::Duration;

#[derive(Debug)]
pub(crate) struct WakeSocket;

impl WakeSocket {
    pub(crate) fn bind() -> Option<WakeSocket> {
        None
    }

    pub(crate) fn address(&self) -> &str {
        ""
    }

    pub(crate) fn wait(&self, timeout: Duration) -> bool {
        std::thread::sleep(timeout);
        false
    }
}

pub(crate) fn wake(_addresses: &[String]) {}
