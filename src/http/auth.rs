//! Authentication: HS256 JWTs (contract: "Authentication").
//!
//! The secret comes from `FLASHCORE_JWT_SECRET` (at least 32 bytes) or, when
//! that is unset, from `jwt-secret` in the data dir, created once with 48
//! random bytes and mode 0600. A token is accepted only when its `alg` is
//! HS256, its signature verifies, `exp` is in the future, `sub` is a valid
//! user id and `role` is `customer` or `admin`; anything else is `401`.

use std::path::{Path, PathBuf};

use dashmap::DashMap;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use rand::RngCore;
use serde::{Deserialize, Serialize};

use crate::domain::UserId;
use crate::engine::Caller;
use crate::http::error::ApiError;
use crate::journal::files::{Existing, create_dir_durably, write_file_durably};
use crate::limits::{JWT_SECRET_BYTES_MIN, TOKEN_BYTES_MAX, VERIFIED_TOKENS_MAX};

/// The environment variable holding the secret.
pub const SECRET_ENV: &str = "FLASHCORE_JWT_SECRET";

/// The secret's file in the data dir.
pub fn secret_path(data_dir: &Path) -> PathBuf {
    data_dir.join("jwt-secret")
}

/// Why the secret could not be had.
#[derive(Debug, thiserror::Error)]
pub enum SecretError {
    /// The environment's secret is too short.
    #[error("{SECRET_ENV} must be at least {JWT_SECRET_BYTES_MIN} bytes")]
    TooShort,
    /// The secret file cannot be read or written.
    #[error("the JWT secret file {path}: {source}")]
    File {
        /// The file.
        path: PathBuf,
        /// What failed.
        source: std::io::Error,
    },
}

/// Loads the secret: `from_env` (the value of [`SECRET_ENV`]) if given,
/// else the data dir's file, creating it (mode 0600) the first time.
///
/// # Errors
/// `TooShort` for a short environment secret or file, `File` when the file
/// cannot be read or created.
pub fn load_secret(from_env: Option<String>, data_dir: &Path) -> Result<Vec<u8>, SecretError> {
    if let Some(secret) = from_env {
        if secret.len() < JWT_SECRET_BYTES_MIN {
            return Err(SecretError::TooShort);
        }
        return Ok(secret.into_bytes());
    }
    let path = secret_path(data_dir);
    let file_error = |source| SecretError::File {
        path: path.clone(),
        source,
    };
    match std::fs::read(&path) {
        Ok(secret) if secret.len() >= JWT_SECRET_BYTES_MIN => return Ok(secret),
        Ok(_) => return Err(SecretError::TooShort),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(file_error(e)),
    }
    create_dir_durably(data_dir).map_err(file_error)?;
    let mut raw = [0u8; 48];
    rand::rng().fill_bytes(&mut raw);
    let secret: String = raw.iter().map(|b| format!("{b:02x}")).collect();
    // Whole or absent after a power cut (a torn secret would keep the
    // server from ever starting again), and never over one another process
    // wrote first: then that one is the secret.
    match write_file_durably(&path, secret.as_bytes(), Some(0o600), Existing::Keep) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
            return std::fs::read(&path).map_err(file_error);
        }
        Err(e) => return Err(file_error(e)),
    }
    Ok(secret.into_bytes())
}

/// A token's claims.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Claims {
    /// The user id.
    pub sub: String,
    /// `customer` or `admin`.
    pub role: String,
    /// Expiry, unix seconds.
    pub exp: u64,
}

/// The keys for signing and checking tokens, and the tokens already
/// checked: a flash-sale buyer sends the same token with every request, and
/// an HMAC, two base64 decodes and two JSON parses per request are most of
/// what authentication costs. A remembered token is still refused once its
/// `exp` passes; the memory is bounded and simply cleared when full.
pub struct JwtKeys {
    encoding: EncodingKey,
    decoding: DecodingKey,
    validation: Validation,
    verified: DashMap<Box<str>, (Caller, u64)>,
}

impl std::fmt::Debug for JwtKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("JwtKeys(..)")
    }
}

impl JwtKeys {
    /// Keys from a secret.
    pub fn new(secret: &[u8]) -> JwtKeys {
        // Only one crypto backend is compiled in; installing it explicitly
        // keeps working if another crate in the build enables a second one.
        let _ = jsonwebtoken::crypto::rust_crypto::DEFAULT_PROVIDER.install_default();
        let mut validation = Validation::new(Algorithm::HS256);
        validation.leeway = 0;
        validation.set_required_spec_claims(&["exp", "sub"]);
        JwtKeys {
            encoding: EncodingKey::from_secret(secret),
            decoding: DecodingKey::from_secret(secret),
            validation,
            verified: DashMap::new(),
        }
    }

    /// Signs a token for `user` valid for `ttl_secs` from `now_secs`.
    ///
    /// # Errors
    /// A `jsonwebtoken` error if signing fails (it does not for HS256).
    pub fn issue(
        &self,
        user: UserId,
        admin: bool,
        now_secs: u64,
        ttl_secs: u64,
    ) -> Result<String, jsonwebtoken::errors::Error> {
        let claims = Claims {
            sub: user.to_string(),
            role: if admin { "admin" } else { "customer" }.into(),
            exp: now_secs.saturating_add(ttl_secs),
        };
        jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, &self.encoding)
    }

    /// Checks a bearer token and returns who is calling.
    ///
    /// # Errors
    /// `Unauthorized` for a token that is malformed, badly signed, not HS256,
    /// expired, or names an invalid user or role.
    pub fn verify(&self, token: &str) -> Result<Caller, ApiError> {
        let unauthorized = |why: &str| ApiError::Unauthorized(why.to_string());
        if token.len() > TOKEN_BYTES_MAX {
            return Err(unauthorized("the token is too long"));
        }
        let now = jsonwebtoken::get_current_timestamp();
        if let Some(known) = self.verified.get(token) {
            let (caller, exp) = *known;
            // The same rule as the full check: expired once `exp` is past.
            if exp >= now {
                return Ok(caller);
            }
            drop(known);
            self.verified.remove(token);
            return Err(unauthorized("the token has expired"));
        }
        let data = jsonwebtoken::decode::<Claims>(token, &self.decoding, &self.validation)
            .map_err(|e| {
                use jsonwebtoken::errors::ErrorKind;
                match e.kind() {
                    ErrorKind::ExpiredSignature => unauthorized("the token has expired"),
                    ErrorKind::InvalidSignature => unauthorized("the token's signature is wrong"),
                    ErrorKind::InvalidAlgorithm => unauthorized("the token is not HS256"),
                    _ => unauthorized("the token is malformed"),
                }
            })?;
        let user = UserId::parse(&data.claims.sub)
            .map_err(|_| unauthorized("the token's sub is not a valid user id"))?;
        let admin = match data.claims.role.as_str() {
            "admin" => true,
            "customer" => false,
            _ => {
                return Err(unauthorized(
                    "the token's role is neither customer nor admin",
                ));
            }
        };
        let caller = Caller { user, admin };
        if self.verified.len() >= VERIFIED_TOKENS_MAX {
            self.verified.clear();
        }
        self.verified
            .insert(token.into(), (caller, data.claims.exp));
        Ok(caller)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn now() -> u64 {
        jsonwebtoken::get_current_timestamp()
    }

    #[test]
    fn a_token_round_trips_and_tampering_is_refused() {
        let keys = JwtKeys::new(&[7u8; 32]);
        let alice = UserId::parse("alice").expect("valid");
        let token = keys.issue(alice, false, now(), 60).expect("signs");
        assert_eq!(
            keys.verify(&token),
            Ok(Caller {
                user: alice,
                admin: false
            })
        );
        let admin = keys.issue(alice, true, now(), 60).expect("signs");
        assert!(keys.verify(&admin).expect("valid").admin);
        let other = JwtKeys::new(&[8u8; 32]);
        assert!(matches!(
            other.verify(&token),
            Err(ApiError::Unauthorized(_))
        ));
        assert_eq!(
            keys.verify(&token),
            Ok(Caller {
                user: alice,
                admin: false
            }),
            "remembered"
        );
        let short = keys.issue(alice, false, now(), 0).expect("signs");
        assert!(keys.verify(&short).is_ok(), "valid through its exp second");
        let expired = keys.issue(alice, false, now() - 120, 60).expect("signs");
        assert!(
            matches!(keys.verify(&expired), Err(ApiError::Unauthorized(m)) if m.contains("expired"))
        );
        assert!(keys.verify("not.a.token").is_err());
        assert!(keys.verify("").is_err());
    }

    #[test]
    fn bad_claims_and_algorithms_are_refused() {
        let secret = [9u8; 32];
        let keys = JwtKeys::new(&secret);
        let sign = |claims: &Claims, alg: Algorithm| {
            jsonwebtoken::encode(
                &Header::new(alg),
                claims,
                &EncodingKey::from_secret(&secret),
            )
            .expect("signs")
        };
        let ok = Claims {
            sub: "bob".into(),
            role: "customer".into(),
            exp: now() + 60,
        };
        assert!(keys.verify(&sign(&ok, Algorithm::HS256)).is_ok());
        assert!(
            keys.verify(&sign(&ok, Algorithm::HS512)).is_err(),
            "not HS256"
        );
        let bad_sub = Claims {
            sub: "bob smith".into(),
            ..ok.clone()
        };
        assert!(keys.verify(&sign(&bad_sub, Algorithm::HS256)).is_err());
        let bad_role = Claims {
            role: "root".into(),
            ..ok.clone()
        };
        assert!(keys.verify(&sign(&bad_role, Algorithm::HS256)).is_err());
    }

    #[test]
    fn the_secret_file_is_created_once_with_owner_only_access() {
        let dir = tempfile::tempdir().expect("tempdir");
        let first = load_secret(None, dir.path()).expect("created");
        let again = load_secret(None, dir.path()).expect("read");
        assert!(matches!(
            load_secret(Some("short".into()), dir.path()),
            Err(SecretError::TooShort)
        ));
        let from_env = load_secret(Some("e".repeat(32)), dir.path()).expect("env");
        assert_eq!(from_env, b"e".repeat(32));
        assert_eq!(first, again);
        assert!(first.len() >= JWT_SECRET_BYTES_MIN);
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(secret_path(dir.path()))
                .expect("exists")
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600);
        }
    }
}
