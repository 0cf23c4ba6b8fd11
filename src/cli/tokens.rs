//! Caller tokens for `token` mode, as `datafold-gateway hash-token` makes and hashes them.
//!
//! The config holds only a token's SHA-256 digest, so a leaked config file does not leak the
//! tokens. A generated token is 32 random bytes (256 bits) in hex, behind a `dfgw_` prefix that
//! secret scanners can look for.

use crate::config::TokenDigest;

/// A new random token.
pub fn generate() -> Result<String, String> {
    use ring::rand::{SecureRandom, SystemRandom};
    let mut bytes = [0u8; 32];
    SystemRandom::new()
        .fill(&mut bytes)
        .map_err(|_| "the system's random number generator failed".to_owned())?;
    let hex = hex::encode(bytes);
    Ok(format!("dfgw_{hex}"))
}

/// The token on one line of input: the line ending is not part of it. Refuses what a caller
/// could not send in an `Authorization: Bearer` header.
pub fn from_line(line: &str) -> Result<&str, String> {
    let token = line
        .strip_suffix('\n')
        .map(|t| t.strip_suffix('\r').unwrap_or(t))
        .unwrap_or(line);
    if token.is_empty() {
        return Err("no token on stdin: pipe one line with the token, or use --generate".into());
    }
    if token.bytes().any(|b| !(0x21..=0x7e).contains(&b)) {
        return Err(
            "the token contains spaces or characters a header cannot carry; use printable ASCII"
                .into(),
        );
    }
    Ok(token)
}

/// The line to paste into a `[[callers.token]]` entry.
pub fn digest_line(token: &str) -> String {
    format!(
        "sha256 = \"{}\"",
        TokenDigest::of(token.as_bytes()).to_hex()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn digest_is_the_sha256_of_the_token() {
        // printf 'abc' | sha256sum
        assert_eq!(
            digest_line("abc"),
            "sha256 = \"ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad\""
        );
    }

    #[test]
    fn the_line_ending_is_not_part_of_the_token() {
        assert_eq!(from_line("abc\n").unwrap(), "abc");
        assert_eq!(from_line("abc\r\n").unwrap(), "abc");
        assert_eq!(from_line("abc").unwrap(), "abc");
        assert!(from_line("\n").is_err());
        assert!(from_line("a b\n").is_err());
    }

    #[test]
    fn generated_tokens_are_long_and_distinct() {
        let (a, b) = (generate().unwrap(), generate().unwrap());
        assert_ne!(a, b);
        assert_eq!(a.len(), 5 + 64);
        assert!(from_line(&a).is_ok());
    }
}
