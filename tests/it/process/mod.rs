//! The gateway as a real process: start-up errors, exit codes, signals, and what it logs.
//!
//! `harness` starts it (through `common::serve::Served`, which waits for its "listening" line
//! and sends it signals) in front of a stand-in; the other modules are the tests, by kind.

pub(crate) mod harness;

mod audit_verify;
mod commands;
mod output;
mod reload;
mod shutdown;
mod startup;
