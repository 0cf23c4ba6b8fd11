//! The integration tests, as one test binary: each module below was once a binary of its own,
//! and each linked tokio, hyper and rustls again. One binary links them once.
//!
//! Everything here shares one process, so no test may change what the others see: no
//! environment variables set, no working directory changed, no process-wide rustls crypto
//! provider installed (TLS configurations name theirs, `builder_with_provider`), and signals
//! only ever go to a child process. `common` holds the harness they share: the gateway in
//! front of a Datafold stand-in, and a `datafold-gateway serve` child process.

mod common;

mod audit_query;
mod callers;
mod deploy;
mod failures;
mod files;
mod forwarding;
mod hardening;
mod limits_and_audit;
mod operations;
mod pool;
mod process;
mod properties;
