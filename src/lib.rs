//! datafold-gateway: lets internal callers test Datafold data source connections through one
//! API key they never see, with rate limits and an audit trail of who tested what.
//!
//! `main.rs` only parses the command line; everything else lives here so that tests and the demo
//! drive the same code. `ARCHITECTURE.md` (at the top of the repository) says what lives where;
//! `stack.rs` lists the request path layer by layer.

pub mod admin;
pub mod audit;
pub mod callers;
pub mod cli;
pub mod config;
pub mod datafold;
pub mod error;
pub mod files;
pub mod gateway;
pub mod jobs;
pub mod limits;
pub mod metrics;
pub mod middleware;
pub mod pool;
pub mod reload;
pub mod secret;
pub mod server;
pub mod stack;
pub mod telemetry;
pub mod tls;
pub mod upstream;

#[cfg(test)]
mod test_support;

/// The body of every answer the gateway builds or passes on: complete, in memory.
pub type Body = http_body_util::Full<bytes::Bytes>;
