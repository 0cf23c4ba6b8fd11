//! `datafold-gateway hash-token`: the `sha256 = "..."` line that lists a caller's token in
//! `[[callers.token]]`. The config holds only the digest, so whoever reads it cannot call with it.
//!
//! The token comes from stdin rather than an argument, so that it stays out of the shell history
//! and the process list; `--generate` makes a new one instead.

use super::tokens;

/// Prints the digest line of the token on stdin, or of a new token (printed too) if `generate`.
pub fn run(generate: bool) -> Result<(), Box<dyn std::error::Error>> {
    if generate {
        let token = tokens::generate()?;
        println!("token: {token}");
        println!("{}", tokens::digest_line(&token));
        eprintln!("Give the token to the caller; put only the sha256 line in the config.");
        return Ok(());
    }
    let mut line = String::new();
    std::io::stdin()
        .read_line(&mut line)
        .map_err(|e| format!("cannot read the token from stdin: {e}"))?;
    let token = tokens::from_line(&line)?;
    println!("{}", tokens::digest_line(token));
    Ok(())
}
