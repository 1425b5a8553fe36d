//! Platforms without abstract Unix sockets: no wake-ups; waiters poll.

use std::time::Duration;

#[derive(Debug)]
pub(crate) struct WakeSocket;

impl WakeSocket {
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
}

pub(crate) fn wake(_addresses: &[String]) {}
