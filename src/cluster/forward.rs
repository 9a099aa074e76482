//! A request for a partition this node does not own, carried to the node
//! that does over a NATS request, and its answer carried back.
//!
//! The owner of partition `p` serves the subject `fc.req.{p}`: it
//! subscribes when it takes the partition over and unsubscribes when it
//! lets go, and a node that still holds a subscription but may no longer
//! answer for the partition stays silent (`node.rs`). The request is the HTTP
//! request itself, already admitted by the node that received it: method,
//! path with query, the headers that carry meaning (token, idempotency key,
//! content type) and the body (at most the front's 64 KiB). The owner runs
//! it through its own front, so the answer is exactly what a client talking
//! to the owner would get, and sends back status, the headers that carry
//! meaning (`Content-Type`, `Retry-After`, `Allow`) and the body.
//!
//! No responder (no owner right now) is a `503 partition_unavailable`; so
//! is an answer that does not come within [`FORWARD_TIMEOUT`]: the change
//! may or may not have happened, which is what a client's `Idempotency-Key`
//! retry is for.

use std::time::Duration;

use async_nats::HeaderMap;
use bytes::Bytes;

/// How long the receiving node waits for the owner's answer. An owner
/// answers in milliseconds; a stall past this is an owner that is stopped
/// or gone, and the client hears `503` with `Retry-After`.
pub const FORWARD_TIMEOUT: Duration = Duration::from_secs(5);

/// The request headers carried to the owner (lowercase). Everything else
/// (connection management, the client's address) belongs to the hop that
/// received it.
pub const REQUEST_HEADERS: [&str; 3] = ["authorization", "idempotency-key", "content-type"];

/// The answer headers carried back (lowercase).
pub const ANSWER_HEADERS: [&str; 3] = ["content-type", "retry-after", "allow"];

/// The header that marks a key probe (`claims.rs`) instead of a request.
pub const PROBE: &str = "Fc-Probe";

const METHOD: &str = "Fc-Method";
const URI: &str = "Fc-Uri";
const STATUS: &str = "Fc-Status";

/// The subject partition `partition`'s owner serves.
pub fn subject(partition: u32) -> String {
    format!("fc.req.{partition}")
}

/// An HTTP request on its way to a partition's owner.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ForwardedRequest {
    /// The method (`GET`, `POST`, ...).
    pub method: String,
    /// Path and query.
    pub uri: String,
    /// The headers of [`REQUEST_HEADERS`] that were sent.
    pub headers: Vec<(String, String)>,
    /// The body.
    pub body: Bytes,
}

/// The owner's answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ForwardedAnswer {
    /// The HTTP status.
    pub status: u16,
    /// The headers of [`ANSWER_HEADERS`] that were set.
    pub headers: Vec<(String, String)>,
    /// The body.
    pub body: Bytes,
}

/// Why a message is not a forwarded request or answer.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("a forwarded message without a valid {0} header")]
pub struct Malformed(&'static str);

fn copy_headers(from: &[(String, String)], allowed: &[&str], to: &mut HeaderMap) {
    for (name, value) in from {
        if allowed.contains(&name.to_ascii_lowercase().as_str()) {
            to.insert(name.as_str(), value.as_str());
        }
    }
}

fn read_headers(from: &HeaderMap, allowed: &[&str]) -> Vec<(String, String)> {
    allowed
        .iter()
        .filter_map(|name| {
            from.get(*name)
                .map(|value| ((*name).to_string(), value.as_str().to_string()))
        })
        .collect()
}

impl ForwardedRequest {
    /// The NATS headers and payload of this request.
    pub fn encode(&self) -> (HeaderMap, Bytes) {
        let mut headers = HeaderMap::new();
        headers.insert(METHOD, self.method.as_str());
        headers.insert(URI, self.uri.as_str());
        copy_headers(&self.headers, &REQUEST_HEADERS, &mut headers);
        (headers, self.body.clone())
    }

    /// A request from a NATS message's headers and payload.
    ///
    /// # Errors
    /// [`Malformed`] without a method or a path.
    pub fn decode(headers: Option<&HeaderMap>, body: Bytes) -> Result<ForwardedRequest, Malformed> {
        let headers = headers.ok_or(Malformed(METHOD))?;
        let method = headers.get(METHOD).ok_or(Malformed(METHOD))?.to_string();
        let uri = headers.get(URI).ok_or(Malformed(URI))?.to_string();
        if !uri.starts_with('/') {
            return Err(Malformed(URI));
        }
        Ok(ForwardedRequest {
            method,
            uri,
            headers: read_headers(headers, &REQUEST_HEADERS),
            body,
        })
    }
}

impl ForwardedAnswer {
    /// The NATS headers and payload of this answer.
    pub fn encode(&self) -> (HeaderMap, Bytes) {
        let mut headers = HeaderMap::new();
        headers.insert(STATUS, self.status.to_string().as_str());
        copy_headers(&self.headers, &ANSWER_HEADERS, &mut headers);
        (headers, self.body.clone())
    }

    /// An answer from a NATS message's headers and payload.
    ///
    /// # Errors
    /// [`Malformed`] without a status from 100 to 599.
    pub fn decode(headers: Option<&HeaderMap>, body: Bytes) -> Result<ForwardedAnswer, Malformed> {
        let headers = headers.ok_or(Malformed(STATUS))?;
        let status = headers
            .get(STATUS)
            .and_then(|s| s.as_str().parse::<u16>().ok())
            .filter(|s| (100..600).contains(s))
            .ok_or(Malformed(STATUS))?;
        Ok(ForwardedAnswer {
            status,
            headers: read_headers(headers, &ANSWER_HEADERS),
            body,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_request_and_an_answer_survive_the_trip_with_only_their_meaningful_headers() {
        let request = ForwardedRequest {
            method: "POST".into(),
            uri: "/v1/orders?x=1".into(),
            headers: vec![
                ("authorization".into(), "Bearer abc".into()),
                ("idempotency-key".into(), "k-1".into()),
                ("content-type".into(), "application/json".into()),
                ("x-forwarded-for".into(), "10.0.0.1".into()),
            ],
            body: Bytes::from_static(br#"{"items":[]}"#),
        };
        let (headers, body) = request.encode();
        let back = ForwardedRequest::decode(Some(&headers), body).expect("decodes");
        assert_eq!(back.method, "POST");
        assert_eq!(back.uri, "/v1/orders?x=1");
        assert_eq!(back.headers, request.headers[..3].to_vec());
        assert_eq!(back.body, request.body);

        let answer = ForwardedAnswer {
            status: 503,
            headers: vec![
                ("content-type".into(), "application/json".into()),
                ("retry-after".into(), "1".into()),
            ],
            body: Bytes::from_static(b"{}"),
        };
        let (headers, body) = answer.encode();
        assert_eq!(
            ForwardedAnswer::decode(Some(&headers), body).expect("decodes"),
            answer
        );
    }

    #[test]
    fn a_message_without_its_headers_is_malformed() {
        assert!(ForwardedRequest::decode(None, Bytes::new()).is_err());
        let mut headers = HeaderMap::new();
        headers.insert(METHOD, "GET");
        headers.insert(URI, "no-slash");
        assert!(ForwardedRequest::decode(Some(&headers), Bytes::new()).is_err());
        let mut headers = HeaderMap::new();
        headers.insert(STATUS, "999");
        assert!(ForwardedAnswer::decode(Some(&headers), Bytes::new()).is_err());
    }
}
