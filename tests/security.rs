//! Issue 17 against the real binary: data at rest is the server's user's
//! alone (a fresh data dir, and one an earlier build left open to others),
//! a `jwt-secret` others may read or a placeholder secret stops the start
//! with a message that says why and how to fix it, and tokens whose `nbf` is
//! ahead or whose `exp` is more than a year ahead get 401.
#![cfg(unix)]

mod support;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::json;
use support::server::{Api, SECRET, Server, refused_start};

/// How long a refused start may take.
const REFUSAL_PATIENCE: Duration = Duration::from_secs(30);

const DAY_S: u64 = 24 * 60 * 60;

/// Most entries the test walks: far more than any data dir here holds.
const WALK_ENTRIES_MAX: usize = 100_000;

/// The mode of `path` itself (a link's own), permission bits only.
fn mode(path: &Path) -> u32 {
    std::fs::symlink_metadata(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .permissions()
        .mode()
        & 0o7777
}

fn chmod(path: &Path, mode: u32) {
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .unwrap_or_else(|e| panic!("chmod {mode:o} {}: {e}", path.display()));
}

/// `dir` and everything under it (symbolic links listed, not followed),
/// each with its mode.
fn walk(dir: &Path) -> Vec<(PathBuf, u32)> {
    let mut found = vec![(dir.to_path_buf(), mode(dir))];
    let mut pending = vec![dir.to_path_buf()];
    while let Some(listing) = pending.pop() {
        for entry in std::fs::read_dir(&listing).expect("lists") {
            let path = entry.expect("entry").path();
            let metadata = std::fs::symlink_metadata(&path).expect("metadata");
            found.push((path.clone(), metadata.permissions().mode() & 0o7777));
            assert!(
                found.len() < WALK_ENTRIES_MAX,
                "the data dir is not that big"
            );
            if metadata.is_dir() {
                pending.push(path);
            }
        }
    }
    found.sort();
    found
}

/// Entries under `dir` (itself included) that group or others have any
/// permission on; symbolic links aside (their mode means nothing).
fn open_to_others(dir: &Path) -> Vec<(PathBuf, u32)> {
    walk(dir)
        .into_iter()
        .filter(|(path, mode)| {
            let link = std::fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_symlink());
            !link && mode & 0o077 != 0
        })
        .collect()
}

/// `flashcore token` with `args`, `FLASHCORE_JWT_SECRET` set to `secret` or
/// unset.
fn token_command(args: &[&str], secret: Option<&str>) -> Output {
    let mut command = Command::new(env!("CARGO_BIN_EXE_flashcore"));
    command
        .arg("token")
        .args(args)
        .env_remove("FLASHCORE_JWT_SECRET")
        .env_remove("FLASHCORE_DATA_DIR")
        .stdin(Stdio::null());
    if let Some(secret) = secret {
        command.env("FLASHCORE_JWT_SECRET", secret);
    }
    command.output().expect("runs")
}

fn now_s() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// A token with exactly these claims, signed with the test secret.
fn sign(claims: &serde_json::Value) -> String {
    jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        claims,
        &EncodingKey::from_secret(SECRET.as_bytes()),
    )
    .expect("signs")
}

#[test]
fn the_data_dir_and_all_in_it_are_the_owners_alone_fresh_or_left_open_by_an_earlier_build() {
    let root = tempfile::tempdir().expect("tempdir");
    let data = root.path().join("var");
    // `token` creates the data dir and its secret file the first time.
    let made = token_command(
        &["--user", "ann", "--data-dir", data.to_str().expect("utf-8")],
        None,
    );
    assert!(made.status.success(), "{made:?}");
    assert_eq!(open_to_others(&data), vec![], "after `token`");

    let mut server = Server::start(&data, &[]);
    let mut api = Api::new(&server);
    assert_eq!(api.create_sku("a", 100, 50, None).status, 201);
    for user in ["ann", "bob", "cid"] {
        let token = server.customer(user);
        let placed = api.order(&token, &[("a", 2)], Some(&format!("key-{user}")));
        assert_eq!(
            placed.status,
            201,
            "{}",
            String::from_utf8_lossy(&placed.body)
        );
    }
    // A clean stop writes the last snapshot too.
    assert!(server.terminate().success(), "{}", server.log());
    let entries = walk(&data);
    assert!(entries.len() > 5, "journal, snapshots, secret: {entries:?}");
    assert_eq!(open_to_others(&data), vec![], "after a start and orders");

    // What an earlier build (umask 022) left: everything open to reading,
    // plus a link to a file outside, which must not be followed.
    for (path, _) in &entries {
        let metadata = std::fs::symlink_metadata(path).expect("metadata");
        if metadata.is_dir() {
            chmod(path, 0o755);
        } else if path.file_name().is_some_and(|n| n != "jwt-secret") {
            chmod(path, 0o644);
        }
    }
    let outside = root.path().join("outside.txt");
    std::fs::write(&outside, b"not the server's").expect("write");
    chmod(&outside, 0o644);
    std::os::unix::fs::symlink(&outside, data.join("link-outside")).expect("symlink");
    assert!(open_to_others(&data).len() > 5);

    let mut server = Server::start(&data, &[]);
    assert_eq!(open_to_others(&data), vec![], "tightened at start");
    assert_eq!(mode(&data), 0o700);
    assert_eq!(mode(&outside), 0o644, "a link is not followed");
    let log = server.log();
    assert!(
        log.contains("the data dir was open to group or others"),
        "a warning for the data dir:\n{log}"
    );
    let mut api = Api::new(&server);
    let orders = api
        .call("GET", "/v1/orders", Some(&server.admin()), None, None)
        .json();
    assert_eq!(
        orders["orders"].as_array().map(Vec::len),
        Some(3),
        "{orders}"
    );
    assert!(server.terminate().success(), "{}", server.log());
    assert_eq!(open_to_others(&data), vec![], "after the second run");
}

#[test]
fn a_secret_file_others_can_read_stops_the_start_before_anything_changes() {
    let root = tempfile::tempdir().expect("tempdir");
    let data = root.path().join("var");
    std::fs::create_dir(&data).expect("mkdir");
    chmod(&data, 0o755);
    let secret = data.join("jwt-secret");
    std::fs::write(&secret, "0123456789abcdef".repeat(6)).expect("write");
    chmod(&secret, 0o644);
    let notes = data.join("notes");
    std::fs::write(&notes, b"an earlier build's file").expect("write");
    chmod(&notes, 0o644);
    let before = walk(&data);

    let (status, stderr) = refused_start(&data, &[], REFUSAL_PATIENCE);
    assert!(!status.success(), "{status}: {stderr}");
    assert!(stderr.contains(&secret.display().to_string()), "{stderr}");
    let fix = format!("chmod 600 {}", secret.display());
    assert!(stderr.contains(&fix), "names the fix `{fix}`:\n{stderr}");
    assert!(!stderr.contains("listening"), "never listened:\n{stderr}");
    assert_eq!(walk(&data), before, "nothing created, nothing chmod'ed");
    assert_eq!(
        std::fs::read(&secret).expect("read"),
        "0123456789abcdef".repeat(6).as_bytes()
    );

    // The fix it names is the whole fix.
    chmod(&secret, 0o600);
    let server = Server::start(&data, &[]);
    assert_eq!(open_to_others(&data), vec![], "{}", server.log());
}

#[test]
fn a_placeholder_secret_in_the_environment_stops_the_start_and_says_why() {
    let root = tempfile::tempdir().expect("tempdir");
    let data = root.path().join("var");
    let cases = [
        ("a".repeat(32), "FLASHCORE_JWT_SECRET is one byte repeated"),
        (
            "ab".repeat(16),
            "FLASHCORE_JWT_SECRET has only 2 distinct bytes",
        ),
        ("changeme".repeat(4), "has only 7 distinct bytes"),
    ];
    for (secret, why) in &cases {
        let (status, stderr) = refused_start(
            &data,
            &[("FLASHCORE_JWT_SECRET", secret.as_str())],
            REFUSAL_PATIENCE,
        );
        assert!(!status.success(), "{secret}: {status}: {stderr}");
        assert!(stderr.contains(why), "{secret}: wanted `{why}`:\n{stderr}");
        assert!(stderr.contains("placeholder"), "{stderr}");
    }
    // `token` refuses it as well: it would sign with a secret anyone guesses.
    let signed = token_command(
        &["--user", "ann", "--data-dir", data.to_str().expect("utf-8")],
        Some(&"a".repeat(32)),
    );
    assert!(!signed.status.success(), "{signed:?}");
    assert!(String::from_utf8_lossy(&signed.stderr).contains("one byte repeated"));
}

#[test]
fn tokens_with_nbf_ahead_or_exp_more_than_a_year_ahead_get_401() {
    let root = tempfile::tempdir().expect("tempdir");
    let server = Server::start(root.path(), &[]);
    let mut api = Api::new(&server);
    let now = now_s();
    let claims = |extra: serde_json::Value| {
        let mut claims = json!({"sub": "ann", "role": "customer", "exp": now + 3_600});
        for (k, v) in extra.as_object().expect("object") {
            claims[k] = v.clone();
        }
        sign(&claims)
    };
    // The largest NumericDate a u64 holds, written as the JSON number.
    let exp_max = sign(
        &serde_json::from_str(r#"{"sub":"ann","role":"customer","exp":18446744073709551615}"#)
            .expect("JSON"),
    );
    let cases: Vec<(&str, String, u16)> = vec![
        ("a normal token", claims(json!({})), 200),
        ("nbf a day ahead", claims(json!({"nbf": now + DAY_S})), 401),
        ("nbf a day ago", claims(json!({"nbf": now - DAY_S})), 200),
        ("exp = 2^64 - 1", exp_max.clone(), 401),
        (
            "exp 400 days ahead",
            claims(json!({"exp": now + 400 * DAY_S})),
            401,
        ),
        (
            "exp a year and a day ahead",
            claims(json!({"exp": now + 366 * DAY_S})),
            401,
        ),
        (
            "exp a minute short of a year ahead",
            claims(json!({"exp": now + 365 * DAY_S - 60})),
            200,
        ),
    ];
    // Twice: a refused token is not remembered as verified, and a good one
    // is still good when it is.
    for round in 0..2 {
        for (what, token, status) in &cases {
            let r = api.call("GET", "/v1/orders", Some(token), None, None);
            assert_eq!(
                r.status,
                *status,
                "round {round}, {what}: {}",
                String::from_utf8_lossy(&r.body)
            );
            if *status == 401 {
                assert_eq!(r.code(), "unauthorized");
            }
        }
    }
    let r = api.call("GET", "/v1/orders", Some(&exp_max), None, None);
    let message = r.json()["error"]["message"]
        .as_str()
        .unwrap_or("")
        .to_string();
    assert!(message.contains("more than a year ahead"), "{message}");
}

#[test]
fn flashcore_token_refuses_a_ttl_over_a_year_and_its_year_token_is_accepted() {
    let root = tempfile::tempdir().expect("tempdir");
    let dir = root.path().to_str().expect("utf-8");
    for ttl in ["366d", "1y", "400days"] {
        let refused = token_command(
            &["--user", "ann", "--ttl", ttl, "--data-dir", dir],
            Some(SECRET),
        );
        let stderr = String::from_utf8_lossy(&refused.stderr);
        assert!(!refused.status.success(), "--ttl {ttl}: {refused:?}");
        assert!(stderr.contains("--ttl must be"), "--ttl {ttl}: {stderr}");
        assert!(refused.stdout.is_empty(), "no token printed");
    }
    let year = token_command(
        &["--user", "ann", "--ttl", "365d", "--data-dir", dir],
        Some(SECRET),
    );
    assert!(year.status.success(), "{year:?}");
    let token = String::from_utf8(year.stdout).expect("utf-8");
    let server = Server::start(&root.path().join("var"), &[]);
    let mut api = Api::new(&server);
    let r = api.call("GET", "/v1/orders", Some(token.trim()), None, None);
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
}
