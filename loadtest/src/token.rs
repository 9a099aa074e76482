//! Minting the HS256 tokens the server accepts: `sub`, `role`, `exp`.
//!
//! The load tester signs its own tokens with the server's secret (given with
//! `--jwt-secret`, or made here for `--spawn`), so it can be any number of
//! distinct buyers and an admin.

use std::io::Read;
use std::sync::Once;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, bail, ensure};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde::Serialize;

use crate::limits;

/// The claims flashcore reads.
#[derive(Debug, Serialize)]
struct Claims<'a> {
    sub: &'a str,
    role: &'a str,
    exp: u64,
}

/// Signs tokens that all expire at the same moment.
pub struct Minter {
    key: EncodingKey,
    header: Header,
    exp_unix_s: u64,
}

impl std::fmt::Debug for Minter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print the key.
        f.debug_struct("Minter")
            .field("exp_unix_s", &self.exp_unix_s)
            .finish_non_exhaustive()
    }
}

impl Minter {
    /// A minter whose tokens stay valid for `valid_for` from now.
    ///
    /// # Errors
    ///
    /// A secret shorter than the server accepts, or a clock before 1970.
    pub fn new(secret: &str, valid_for: Duration) -> Result<Self> {
        ensure!(
            secret.len() >= limits::SECRET_BYTES_MIN,
            "the JWT secret must be at least {} bytes (the server refuses shorter ones)",
            limits::SECRET_BYTES_MIN
        );
        install_crypto_provider();
        let now_s = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .context("the clock is before 1970")?
            .as_secs();
        let exp_unix_s = now_s
            .checked_add(valid_for.as_secs())
            .context("token lifetime overflows")?;
        Ok(Self {
            key: EncodingKey::from_secret(secret.as_bytes()),
            header: Header::new(Algorithm::HS256),
            exp_unix_s,
        })
    }

    /// A `customer` token for `user`.
    ///
    /// # Errors
    ///
    /// Signing failed (it does not for HS256 with a valid key).
    pub fn customer(&self, user: &str) -> Result<String> {
        self.sign(user, "customer")
    }

    /// An `admin` token for `user`.
    ///
    /// # Errors
    ///
    /// Signing failed (it does not for HS256 with a valid key).
    pub fn admin(&self, user: &str) -> Result<String> {
        self.sign(user, "admin")
    }

    fn sign(&self, sub: &str, role: &str) -> Result<String> {
        let claims = Claims {
            sub,
            role,
            exp: self.exp_unix_s,
        };
        jsonwebtoken::encode(&self.header, &claims, &self.key).context("signing a token")
    }
}

/// Picks the pure-Rust crypto backend explicitly, so a workspace build that
/// also enables another backend (feature unification) cannot make token
/// signing panic on an ambiguous default.
fn install_crypto_provider() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        // Err means a provider is already installed, which is just as good.
        let _ = jsonwebtoken::crypto::rust_crypto::DEFAULT_PROVIDER.install_default();
    });
}

/// A fresh secret: [`limits::SECRET_BYTES`] bytes from the OS, hex-encoded.
///
/// # Errors
///
/// `/dev/urandom` cannot be read.
pub fn random_secret_hex() -> Result<String> {
    let mut bytes = [0_u8; limits::SECRET_BYTES];
    let mut urandom = std::fs::File::open("/dev/urandom").context("opening /dev/urandom")?;
    urandom
        .read_exact(&mut bytes)
        .context("reading /dev/urandom")?;
    if bytes.iter().all(|b| *b == 0) {
        bail!("/dev/urandom gave only zeros");
    }
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_carry_the_claims_and_verify_with_the_secret() {
        let secret = "0123456789abcdef0123456789abcdef-test";
        let minter = Minter::new(secret, Duration::from_secs(3600)).unwrap();
        let token = minter.customer("buyer-00001").unwrap();
        let mut validation = jsonwebtoken::Validation::new(Algorithm::HS256);
        validation.set_required_spec_claims(&["exp", "sub"]);
        let data = jsonwebtoken::decode::<serde_json::Value>(
            &token,
            &jsonwebtoken::DecodingKey::from_secret(secret.as_bytes()),
            &validation,
        )
        .unwrap();
        assert_eq!(data.claims["sub"], "buyer-00001");
        assert_eq!(data.claims["role"], "customer");
        assert_eq!(data.header.alg, Algorithm::HS256);
        let admin = minter.admin("ops").unwrap();
        assert_ne!(admin, token);
    }

    #[test]
    fn short_secrets_are_refused() {
        assert!(Minter::new("too-short", Duration::from_secs(1)).is_err());
    }

    #[test]
    fn random_secrets_are_long_and_differ() {
        let a = random_secret_hex().unwrap();
        let b = random_secret_hex().unwrap();
        assert_eq!(a.len(), limits::SECRET_BYTES * 2);
        assert_ne!(a, b);
    }
}
