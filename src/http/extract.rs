//! Extractors that answer bad input with the contract's JSON error body
//! instead of axum's plain-text rejections: JSON bodies, path and query
//! parameters (an `{order_id}` that is not an order id is an unknown order),
//! the bearer token, and the `Idempotency-Key` header.

use axum::body::Bytes;
use axum::extract::rejection::{BytesRejection, PathRejection, QueryRejection};
use axum::extract::{FromRequest, FromRequestParts, Path, Query, Request};
use axum::http::header::{AUTHORIZATION, CONTENT_TYPE};
use axum::http::request::Parts;
use axum::http::{HeaderMap, StatusCode};
use serde::de::DeserializeOwned;

use crate::domain::{IdempotencyKey, OrderId};
use crate::engine::Caller;
use crate::http::auth::JwtKeys;
use crate::http::error::ApiError;
use crate::http::{AppState, Verified};

fn is_json(headers: &HeaderMap) -> bool {
    headers
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .is_some_and(|mime| mime.trim().eq_ignore_ascii_case("application/json"))
}

fn body_error(rejection: BytesRejection) -> ApiError {
    if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
        ApiError::PayloadTooLarge
    } else {
        ApiError::invalid(format!("cannot read the body: {rejection}"))
    }
}

fn parse_json<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    serde_json::from_slice(bytes).map_err(|e| ApiError::invalid(format!("invalid JSON body: {e}")))
}

/// A JSON body (`Content-Type: application/json`), within the body limit.
#[derive(Debug, Clone)]
pub struct ApiJson<T>(pub T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequest<S> for ApiJson<T> {
    type Rejection = ApiError;

    async fn from_request(request: Request, state: &S) -> Result<Self, ApiError> {
        if !is_json(request.headers()) {
            return Err(ApiError::invalid("expected Content-Type: application/json"));
        }
        let bytes = Bytes::from_request(request, state)
            .await
            .map_err(body_error)?;
        parse_json(&bytes).map(ApiJson)
    }
}

/// A JSON body that may be absent (empty, with or without a content type);
/// when present it must be JSON.
#[derive(Debug, Clone)]
pub struct OptionalJson<T>(pub T);

impl<T: DeserializeOwned + Default, S: Send + Sync> FromRequest<S> for OptionalJson<T> {
    type Rejection = ApiError;

    async fn from_request(request: Request, state: &S) -> Result<Self, ApiError> {
        let json = is_json(request.headers());
        let bytes = Bytes::from_request(request, state)
            .await
            .map_err(body_error)?;
        if bytes.iter().all(u8::is_ascii_whitespace) {
            return Ok(OptionalJson(T::default()));
        }
        if !json {
            return Err(ApiError::invalid("expected Content-Type: application/json"));
        }
        parse_json(&bytes).map(OptionalJson)
    }
}

/// Path parameters, with a JSON `400` for anything undecodable.
#[derive(Debug, Clone)]
pub struct ApiPath<T>(pub T);

impl<T: DeserializeOwned + Send, S: Send + Sync> FromRequestParts<S> for ApiPath<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        Path::<T>::from_request_parts(parts, state)
            .await
            .map(|Path(value)| ApiPath(value))
            .map_err(|e: PathRejection| ApiError::invalid(format!("bad path: {e}")))
    }
}

/// The `{order_id}` path parameter. Text that is not the decimal form of an
/// order id (not digits, zero, past `u64::MAX`, not UTF-8) names no order:
/// `404 not_found`, like an id no order has (contract: "Errors").
#[derive(Debug, Clone, Copy)]
pub struct OrderPath(pub OrderId);

impl<S: Send + Sync> FromRequestParts<S> for OrderPath {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        let unknown = || ApiError::NotFound("no such order (order ids are decimal numbers)".into());
        let Path(text) = Path::<String>::from_request_parts(parts, state)
            .await
            .map_err(|_: PathRejection| unknown())?;
        OrderId::parse(&text).map(OrderPath).map_err(|_| unknown())
    }
}

/// Query parameters, with a JSON `400` for anything undecodable or unknown.
#[derive(Debug, Clone)]
pub struct ApiQuery<T>(pub T);

impl<T: DeserializeOwned + Send, S: Send + Sync> FromRequestParts<S> for ApiQuery<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        Query::<T>::from_request_parts(parts, state)
            .await
            .map(|Query(value)| ApiQuery(value))
            .map_err(|e: QueryRejection| ApiError::invalid(format!("bad query: {e}")))
    }
}

/// The caller named by `Authorization: Bearer <JWT>` in `headers`.
///
/// # Errors
/// `Unauthorized` for a missing, malformed or refused token.
pub fn bearer_caller(headers: &HeaderMap, keys: &JwtKeys) -> Result<Caller, ApiError> {
    let header = headers
        .get(AUTHORIZATION)
        .ok_or_else(|| ApiError::Unauthorized("missing Authorization: Bearer token".into()))?;
    let value = header
        .to_str()
        .map_err(|_| ApiError::Unauthorized("malformed Authorization header".into()))?;
    let token = value
        .strip_prefix("Bearer ")
        .or_else(|| value.strip_prefix("bearer "))
        .ok_or_else(|| ApiError::Unauthorized("expected Authorization: Bearer <token>".into()))?;
    keys.verify(token.trim())
}

/// The caller, from `Authorization: Bearer <JWT>` (verified once, by
/// admission, when the request came through the front).
#[derive(Debug, Clone, Copy)]
pub struct Auth(pub Caller);

impl FromRequestParts<AppState> for Auth {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        if let Some(Verified(caller)) = parts.extensions.get::<Verified>() {
            return Ok(Auth(*caller));
        }
        bearer_caller(&parts.headers, &state.keys).map(Auth)
    }
}

/// An admin caller (`role = admin`), else `403`.
#[derive(Debug, Clone, Copy)]
pub struct Admin(pub Caller);

impl FromRequestParts<AppState> for Admin {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        let Auth(caller) = Auth::from_request_parts(parts, state).await?;
        if !caller.admin {
            return Err(ApiError::Forbidden("this route needs role = admin".into()));
        }
        Ok(Admin(caller))
    }
}

/// The `Idempotency-Key` header, if sent.
#[derive(Debug, Clone)]
pub struct IdemKey(pub Option<IdempotencyKey>);

impl<S: Send + Sync> FromRequestParts<S> for IdemKey {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, ApiError> {
        let mut values = parts.headers.get_all("idempotency-key").iter();
        let Some(value) = values.next() else {
            return Ok(IdemKey(None));
        };
        if values.next().is_some() {
            return Err(ApiError::invalid("send one Idempotency-Key header"));
        }
        let text = value
            .to_str()
            .map_err(|_| ApiError::invalid("Idempotency-Key must be visible ASCII"))?;
        IdempotencyKey::parse(text)
            .map(|key| IdemKey(Some(key)))
            .map_err(|e| ApiError::invalid(e.to_string()))
    }
}
