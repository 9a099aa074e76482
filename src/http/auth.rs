//! Authentication: HS256 JWTs (contract: "Authentication").
//!
//! The secret comes from `FLASHCORE_JWT_SECRET` (at least 32 bytes) or, when
//! that is unset, from `jwt-secret` in the data dir, created once with 48
//! random bytes and mode 0600. Either must hold at least
//! [`JWT_SECRET_DISTINCT_BYTES_MIN`] distinct bytes (a placeholder such as
//! one byte repeated is refused), and a `jwt-secret` file that group or
//! others may read or change stops the start: its secret may be known.
//!
//! A token is accepted only when its `alg` is HS256, its signature verifies,
//! `exp` is not past and at most [`TOKEN_TTL_MAX_S`] ahead, `nbf` (if any)
//! is not ahead, `sub` is a valid user id and `role` is `customer` or
//! `admin`; anything else is `401`. The time rules are one function,
//! [`check_times`], applied on every request, to remembered tokens too.

use std::path::{Path, PathBuf};

use dashmap::DashMap;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use rand::RngCore;
use serde::{Deserialize, Serialize};

use crate::domain::UserId;
use crate::engine::Caller;
use crate::files::{Existing, create_dir_durably, write_file_durably};
use crate::http::error::ApiError;
use crate::limits::{
    JWT_SECRET_BYTES_MIN, JWT_SECRET_DISTINCT_BYTES_MIN, TOKEN_BYTES_MAX, TOKEN_TTL_MAX_S,
    VERIFIED_TOKENS_MAX,
};

/// The environment variable holding the secret.
pub const SECRET_ENV: &str = "FLASHCORE_JWT_SECRET";

/// The secret's file in the data dir.
pub fn secret_path(data_dir: &Path) -> PathBuf {
    data_dir.join("jwt-secret")
}

/// Where a secret came from, to name it in an error.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SecretOrigin {
    /// [`SECRET_ENV`].
    Env,
    /// The data dir's `jwt-secret`.
    File(PathBuf),
}

impl std::fmt::Display for SecretOrigin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SecretOrigin::Env => write!(f, "{SECRET_ENV}"),
            SecretOrigin::File(path) => write!(f, "the JWT secret file {}", path.display()),
        }
    }
}

/// Why the secret could not be had.
#[derive(Debug, thiserror::Error)]
pub enum SecretError {
    /// Cluster mode needs the secret from the environment: every node
    /// verifies every token, so all must share one.
    #[error(
        "cluster mode requires {SECRET_ENV}, the same on every node (e.g. `openssl rand -hex 32`)"
    )]
    Required,
    /// The environment's secret is too short.
    #[error("{SECRET_ENV} must be at least {JWT_SECRET_BYTES_MIN} bytes")]
    TooShort,
    /// The secret has too few distinct bytes to be anything but a
    /// placeholder (see [`JWT_SECRET_DISTINCT_BYTES_MIN`]).
    #[error(
        "{origin} {}: that is a placeholder, not a secret (at least \
         {JWT_SECRET_DISTINCT_BYTES_MIN} distinct bytes are needed); use \
         {JWT_SECRET_BYTES_MIN} or more random bytes, e.g. `openssl rand -hex 32`",
        plainness(*.distinct)
    )]
    TooPlain {
        /// Where it came from.
        origin: SecretOrigin,
        /// How many distinct byte values it holds.
        distinct: usize,
    },
    /// The secret file may be read or changed by group or others, so the
    /// secret may be known to them: the server does not start on it.
    #[error(
        "the JWT secret file {} has mode {mode:03o}: group or others have access to it; \
         fix: `chmod 600 {}` (and replace the secret if others may have read it)",
        .path.display(),
        .path.display()
    )]
    Exposed {
        /// The file.
        path: PathBuf,
        /// Its permission bits.
        mode: u32,
    },
    /// The secret file cannot be read or written.
    #[error("the JWT secret file {path}: {source}")]
    File {
        /// The file.
        path: PathBuf,
        /// What failed.
        source: std::io::Error,
    },
}

/// How a too-plain secret is described.
fn plainness(distinct: usize) -> String {
    if distinct <= 1 {
        "is one byte repeated".to_string()
    } else {
        format!("has only {distinct} distinct bytes")
    }
}

/// Refuses a secret with fewer than [`JWT_SECRET_DISTINCT_BYTES_MIN`]
/// distinct bytes.
fn check_variety(secret: &[u8], origin: impl FnOnce() -> SecretOrigin) -> Result<(), SecretError> {
    let mut seen = [false; 256];
    for &byte in secret {
        seen[usize::from(byte)] = true;
    }
    let distinct = seen.iter().filter(|&&s| s).count();
    if distinct < JWT_SECRET_DISTINCT_BYTES_MIN {
        return Err(SecretError::TooPlain {
            origin: origin(),
            distinct,
        });
    }
    Ok(())
}

/// Refuses a `jwt-secret` file in `data_dir` that group or others may
/// read, write or execute (`mode & 0o077 != 0`); a missing file is fine.
/// `serve` calls it before it changes anything in the data dir, whether or
/// not [`SECRET_ENV`] is set: the file may be used on the next start.
///
/// # Errors
/// `Exposed` for such a file, `File` when its mode cannot be read.
pub fn check_secret_file(data_dir: &Path) -> Result<(), SecretError> {
    let path = secret_path(data_dir);
    match std::fs::metadata(&path) {
        Ok(metadata) => check_mode(&path, &metadata),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(source) => Err(SecretError::File { path, source }),
    }
}

/// `Exposed` when group or others have any permission on the file.
fn check_mode(path: &Path, metadata: &std::fs::Metadata) -> Result<(), SecretError> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = metadata.permissions().mode() & 0o7777;
        if mode & 0o077 != 0 {
            return Err(SecretError::Exposed {
                path: path.to_path_buf(),
                mode,
            });
        }
    }
    #[cfg(not(unix))]
    let _ = (path, metadata);
    Ok(())
}

/// Reads the secret file, refusing it when its mode lets group or others
/// in (checked on the open file, so the mode and the bytes are the same
/// file's), too short, or too plain. `Ok(None)` when there is no file.
fn read_secret_file(path: &Path) -> Result<Option<Vec<u8>>, SecretError> {
    use std::io::Read;
    let file_error = |source| SecretError::File {
        path: path.to_path_buf(),
        source,
    };
    let mut file = match std::fs::File::open(path) {
        Ok(file) => file,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(file_error(e)),
    };
    check_mode(path, &file.metadata().map_err(file_error)?)?;
    let mut secret = Vec::new();
    file.read_to_end(&mut secret).map_err(file_error)?;
    if secret.len() < JWT_SECRET_BYTES_MIN {
        return Err(SecretError::TooShort);
    }
    check_variety(&secret, || SecretOrigin::File(path.to_path_buf()))?;
    Ok(Some(secret))
}

/// Loads the secret: `from_env` (the value of [`SECRET_ENV`]) if given,
/// else the data dir's file, creating it (mode 0600) the first time.
///
/// # Errors
/// `TooShort` for a short environment secret or file, `TooPlain` for one
/// with too few distinct bytes, `Exposed` for a file group or others may
/// read, `File` when the file cannot be read or created.
pub fn load_secret(from_env: Option<String>, data_dir: &Path) -> Result<Vec<u8>, SecretError> {
    if let Some(secret) = from_env {
        if secret.len() < JWT_SECRET_BYTES_MIN {
            return Err(SecretError::TooShort);
        }
        check_variety(secret.as_bytes(), || SecretOrigin::Env)?;
        return Ok(secret.into_bytes());
    }
    let path = secret_path(data_dir);
    let file_error = |source| SecretError::File {
        path: path.clone(),
        source,
    };
    if let Some(secret) = read_secret_file(&path)? {
        return Ok(secret);
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
            return read_secret_file(&path)?
                .ok_or_else(|| file_error(std::io::ErrorKind::NotFound.into()));
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
    /// Expiry, unix seconds: valid through this second.
    pub exp: u64,
    /// Not before, unix seconds (optional): valid from this second on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nbf: Option<u64>,
}

/// The time rules of a token at `now_s` (unix seconds), the same for a
/// token checked in full and for one remembered as verified.
///
/// # Errors
/// Why the token is refused: `exp` past, `exp` more than
/// [`TOKEN_TTL_MAX_S`] ahead, or `nbf` ahead (no leeway either way).
pub fn check_times(exp: u64, nbf: Option<u64>, now_s: u64) -> Result<(), &'static str> {
    if exp < now_s {
        return Err("the token has expired");
    }
    if exp > now_s.saturating_add(TOKEN_TTL_MAX_S) {
        return Err("the token's exp is more than a year ahead");
    }
    if nbf.is_some_and(|nbf| nbf > now_s) {
        return Err("the token is not valid yet (its nbf is ahead)");
    }
    Ok(())
}

/// A token remembered as verified: who it names and its time claims, which
/// [`check_times`] checks again on every use.
#[derive(Debug, Clone, Copy)]
struct Verified {
    caller: Caller,
    exp: u64,
    nbf: Option<u64>,
}

/// The keys for signing and checking tokens, and the tokens already
/// checked: a flash-sale buyer sends the same token with every request, and
/// an HMAC, two base64 decodes and two JSON parses per request are most of
/// what authentication costs. A remembered token obeys the same time rules
/// as a new one (its `exp` and `nbf` are kept beside it), and is forgotten
/// once it breaks one; a token refused for any reason is never remembered.
/// The memory is bounded and simply cleared when full.
pub struct JwtKeys {
    encoding: EncodingKey,
    decoding: DecodingKey,
    validation: Validation,
    verified: DashMap<Box<str>, Verified>,
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
        // `exp` and `nbf` are checked by `check_times`, one rule for new and
        // remembered tokens; the library only insists that `exp` is there.
        validation.validate_exp = false;
        validation.validate_nbf = false;
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
            nbf: None,
        };
        jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, &self.encoding)
    }

    /// Checks a bearer token and returns who is calling.
    ///
    /// # Errors
    /// `Unauthorized` for a token that is malformed, badly signed, not HS256,
    /// expired, not yet valid (`nbf`), valid for more than a year ahead, or
    /// names an invalid user or role.
    pub fn verify(&self, token: &str) -> Result<Caller, ApiError> {
        self.verify_at(token, jsonwebtoken::get_current_timestamp())
    }

    /// [`JwtKeys::verify`] at `now_s` (unix seconds).
    fn verify_at(&self, token: &str, now_s: u64) -> Result<Caller, ApiError> {
        let unauthorized = |why: &str| ApiError::Unauthorized(why.to_string());
        if token.len() > TOKEN_BYTES_MAX {
            return Err(unauthorized("the token is too long"));
        }
        if let Some(known) = self.verified.get(token) {
            let remembered = *known;
            drop(known);
            return match check_times(remembered.exp, remembered.nbf, now_s) {
                Ok(()) => Ok(remembered.caller),
                Err(why) => {
                    self.verified.remove(token);
                    Err(unauthorized(why))
                }
            };
        }
        let data = jsonwebtoken::decode::<Claims>(token, &self.decoding, &self.validation)
            .map_err(|e| {
                use jsonwebtoken::errors::ErrorKind;
                match e.kind() {
                    ErrorKind::InvalidSignature => unauthorized("the token's signature is wrong"),
                    ErrorKind::InvalidAlgorithm => unauthorized("the token is not HS256"),
                    _ => unauthorized("the token is malformed"),
                }
            })?;
        let claims = data.claims;
        check_times(claims.exp, claims.nbf, now_s).map_err(unauthorized)?;
        let user = UserId::parse(&claims.sub)
            .map_err(|_| unauthorized("the token's sub is not a valid user id"))?;
        let admin = match claims.role.as_str() {
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
        self.verified.insert(
            token.into(),
            Verified {
                caller,
                exp: claims.exp,
                nbf: claims.nbf,
            },
        );
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
            nbf: None,
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
        let varied = "env-secret-0123456789-abcdefghijk";
        let from_env = load_secret(Some(varied.into()), dir.path()).expect("env");
        assert_eq!(from_env, varied.as_bytes());
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

    /// Signs `claims` (as JSON, so any number fits) with `secret`.
    fn sign_json(secret: &[u8], claims: &serde_json::Value) -> String {
        jsonwebtoken::encode(
            &Header::new(Algorithm::HS256),
            claims,
            &EncodingKey::from_secret(secret),
        )
        .expect("signs")
    }

    const DAY_S: u64 = 24 * 60 * 60;

    #[test]
    fn a_token_whose_nbf_is_ahead_is_refused_and_not_remembered() {
        let secret = [3u8; 32];
        let keys = JwtKeys::new(&secret);
        let t = now();
        let token = sign_json(
            &secret,
            &serde_json::json!({"sub": "ann", "role": "customer", "exp": t + DAY_S, "nbf": t + 1}),
        );
        assert!(
            matches!(keys.verify_at(&token, t), Err(ApiError::Unauthorized(m)) if m.contains("nbf")),
            "nbf one second ahead, no leeway"
        );
        assert!(
            !keys.verified.contains_key(token.as_str()),
            "not remembered"
        );
        assert!(
            keys.verify_at(&token, t + 1).is_ok(),
            "valid from its nbf second"
        );
    }

    #[test]
    fn a_token_whose_nbf_is_past_or_now_is_accepted() {
        let secret = [3u8; 32];
        let keys = JwtKeys::new(&secret);
        let t = now();
        for nbf in [0, t - DAY_S, t] {
            let token = sign_json(
                &secret,
                &serde_json::json!({"sub": "ann", "role": "customer", "exp": t + 60, "nbf": nbf}),
            );
            assert!(keys.verify_at(&token, t).is_ok(), "nbf {nbf} at {t}");
        }
    }

    #[test]
    fn an_exp_more_than_a_year_ahead_is_refused() {
        let secret = [4u8; 32];
        let keys = JwtKeys::new(&secret);
        let t = now();
        let year_and_a_day = t + TOKEN_TTL_MAX_S + DAY_S;
        for exp in [u64::MAX, year_and_a_day, t + TOKEN_TTL_MAX_S + 1] {
            let token = sign_json(
                &secret,
                &serde_json::json!({"sub": "ann", "role": "customer", "exp": exp}),
            );
            assert!(
                matches!(keys.verify_at(&token, t), Err(ApiError::Unauthorized(m)) if m.contains("more than a year ahead")),
                "exp {exp} at {t}"
            );
            assert!(
                !keys.verified.contains_key(token.as_str()),
                "not remembered"
            );
        }
    }

    #[test]
    fn an_exp_exactly_a_year_ahead_is_accepted() {
        let secret = [4u8; 32];
        let keys = JwtKeys::new(&secret);
        let alice = UserId::parse("alice").expect("valid");
        let t = now();
        let token = keys.issue(alice, false, t, TOKEN_TTL_MAX_S).expect("signs");
        assert!(keys.verify_at(&token, t).is_ok(), "exactly the bound");
        assert!(keys.verify_at(&token, t).is_ok(), "and remembered");
        let over = keys
            .issue(alice, false, t, TOKEN_TTL_MAX_S + 1)
            .expect("signs");
        assert!(keys.verify_at(&over, t).is_err(), "one second past it");
    }

    #[test]
    fn a_remembered_token_obeys_the_same_time_rules() {
        let secret = [5u8; 32];
        let keys = JwtKeys::new(&secret);
        let t = now();
        // Accepted (and remembered) at `t`, its `nbf` at the edge...
        let token = sign_json(
            &secret,
            &serde_json::json!({"sub": "ann", "role": "customer", "exp": t + 60, "nbf": t}),
        );
        assert!(keys.verify_at(&token, t).is_ok());
        assert!(keys.verified.contains_key(token.as_str()));
        // ...and refused from memory when the clock says otherwise: a step
        // back puts `nbf` ahead; past `exp`, it has expired.
        let refused = |at: u64, why: &str| {
            assert!(
                matches!(keys.verify_at(&token, at), Err(ApiError::Unauthorized(m)) if m.contains(why)),
                "at {at}: {why}"
            );
            assert!(!keys.verified.contains_key(token.as_str()), "forgotten");
            assert!(keys.verify_at(&token, t).is_ok(), "remembered again");
        };
        refused(t - 1, "nbf");
        refused(t + 61, "expired");
        let far = sign_json(
            &secret,
            &serde_json::json!({"sub": "bob", "role": "customer", "exp": t + TOKEN_TTL_MAX_S}),
        );
        // At the edge of the year bound; a step back of a second breaks it.
        assert!(keys.verify_at(&far, t).is_ok());
        assert!(
            matches!(keys.verify_at(&far, t - 1), Err(ApiError::Unauthorized(m)) if m.contains("more than a year ahead")),
            "the year bound holds from memory too"
        );
        assert!(!keys.verified.contains_key(far.as_str()), "forgotten");
    }

    #[test]
    fn plain_secrets_are_refused_with_why_and_varied_ones_pass() {
        let dir = tempfile::tempdir().expect("tempdir");
        let refused = |secret: &str, why: &str| match load_secret(Some(secret.into()), dir.path()) {
            Err(e @ SecretError::TooPlain { .. }) => {
                let message = e.to_string();
                assert!(message.contains(why), "{secret}: {message}");
                assert!(message.contains(SECRET_ENV), "{message}");
            }
            other => panic!("{secret}: {other:?}"),
        };
        refused(&"a".repeat(32), "is one byte repeated");
        refused(&"\0".repeat(40), "is one byte repeated");
        refused(&"ab".repeat(16), "has only 2 distinct bytes");
        refused(&"changeme".repeat(4), "has only 7 distinct bytes");
        refused(&"password".repeat(4), "has only 7 distinct bytes");
        // The test servers' secret and loadtest/wrk/compare.sh's.
        for ok in [
            "test-secret-0123456789-0123456789-abcdef",
            "compare-sh-fixed-secret-0123456789abcdef",
            "01234567".repeat(4).as_str(),
        ] {
            assert!(load_secret(Some(ok.into()), dir.path()).is_ok(), "{ok}");
        }
    }

    #[cfg(unix)]
    #[test]
    fn a_secret_file_others_may_read_or_a_plain_one_is_refused() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().expect("tempdir");
        let path = secret_path(dir.path());
        let created = load_secret(None, dir.path()).expect("created");
        assert!(check_secret_file(dir.path()).is_ok());
        for mode in [0o644, 0o640, 0o604, 0o660, 0o601] {
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).expect("chmod");
            let fix = format!("chmod 600 {}", path.display());
            for refused in [
                check_secret_file(dir.path()),
                load_secret(None, dir.path()).map(drop),
            ] {
                match refused {
                    Err(e @ SecretError::Exposed { .. }) => {
                        assert!(e.to_string().contains(&fix), "{e}");
                    }
                    other => panic!("mode {mode:o}: {other:?}"),
                }
            }
        }
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o400)).expect("chmod");
        assert_eq!(load_secret(None, dir.path()).expect("owner only"), created);
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).expect("chmod");
        std::fs::write(&path, "x".repeat(48)).expect("write");
        assert!(matches!(
            load_secret(None, dir.path()),
            Err(SecretError::TooPlain { origin: SecretOrigin::File(p), distinct: 1 }) if p == path
        ));
        assert!(
            check_secret_file(&dir.path().join("missing")).is_ok(),
            "no file, nothing to refuse"
        );
    }
}
