//! Waking a lock waiter, in this process or another, when a key it waits for
//! is released.
//!
//! Each waiter owns a wake-up address, recorded on its queue row. A process
//! that releases keys reads, in the same transaction, the addresses of the
//! waiters on those keys, and after the commit sends each a one-byte
//! datagram. Waiters re-check the database when woken, and also on a capped
//! timer: a wake-up can be missed (a holder killed with SIGKILL sends none),
//! never relied upon for correctness.
//!
//! On Linux the address is an abstract Unix socket name: no file, no path
//! length limit, gone when the waiter is. Elsewhere there is no address and
//! waiters only poll.

#[cfg(target_os = "linux")]
mod linux;
#[cfg(target_os = "linux")]
pub(crate) use linux::{WakeSocket, wake};

#[cfg(not(target_os = "linux"))]
mod other;
#[cfg(not(target_os = "linux"))]
pub(crate) use other::{WakeSocket, wake};
