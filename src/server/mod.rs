//! Listeners and connections: the workers that accept and serve them, and their drain.
//!
//! Each worker ([`Worker`], `worker.rs`) is a thread with a single-threaded tokio runtime, its
//! own `SO_REUSEPORT` listening socket on `listen.addr` ([`bind_listeners`]), its own copy of the
//! stack and its own upstream pool: a request is handled from accept to answer on one thread.
//! `connection.rs` serves one connection (TLS handshake, HTTP/1.1 or HTTP/2, its deadlines and
//! its close). What the workers share, and how they are started and stopped, is `gateway.rs`.

mod connection;
mod listen;
mod worker;

pub(crate) use connection::{Activity, InFlight, TlsListener};
pub(crate) use listen::bind_listeners;
pub(crate) use worker::Worker;
pub use worker::WorkerError;
