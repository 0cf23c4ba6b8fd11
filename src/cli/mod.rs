//! The subcommands other than `serve`: tools around the gateway, not the gateway itself.
//!
//! `main.rs` parses the command line and calls the `run` function of one of these; `serve` (the
//! gateway proper) starts from there too, and everything it runs lives outside this folder.

/// `audit`: who tested which data source, when, and with what result, read from the audit trail.
pub mod audit;
/// `check-config`: load a configuration and its key, and print it with the key redacted.
pub mod check_config;
/// `demo`: the gateway against a local stand-in for Datafold, step by step, then exit.
pub mod demo;
/// `hash-token`: the digest line of a caller token for the config, or a new random token.
pub mod hash_token;
/// A local stand-in for Datafold's two endpoints, over TLS with a throwaway CA: what `demo`
/// runs the gateway against, and what the integration tests use as the upstream.
pub mod standin;
/// Caller tokens as `hash-token` makes and hashes them.
pub mod tokens;
/// `audit --verify`: walks the audit trail oldest first and checks every record's `chain` link.
pub mod verify;
