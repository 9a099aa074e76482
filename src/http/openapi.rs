//! `GET /openapi.json`: an OpenAPI 3.1 document of every route, built from
//! the code.
//!
//! Paths come from the route table (`routes.rs`), the one list the router
//! is built from too; schemas come from the `ToSchema` derives on the JSON
//! shapes (`views.rs`, the error body in `error.rs`). Error answers follow
//! from what a route takes (a body, path parameters, a token, a key). The
//! document is built once and served as bytes.

use std::sync::OnceLock;

use axum::http::header::CONTENT_TYPE;
use axum::response::{IntoResponse, Response};
use utoipa::openapi::header::HeaderBuilder;
use utoipa::openapi::link::{Link, LinkBuilder};
use utoipa::openapi::path::{
    HttpMethod, OperationBuilder, ParameterBuilder, ParameterIn, PathsBuilder,
};
use utoipa::openapi::request_body::RequestBodyBuilder;
use utoipa::openapi::response::{Response as DocResponse, ResponseBuilder};
use utoipa::openapi::schema::{ComponentsBuilder, ObjectBuilder, Type};
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityRequirement, SecurityScheme};
use utoipa::openapi::{
    ContentBuilder, InfoBuilder, OpenApi, OpenApiBuilder, Ref, RefOr, Required, Schema,
};

use crate::http::error::{ErrorBody, ErrorFields};
use crate::http::routes::{self, Access, Body, Param, RouteDoc};
use crate::http::views;

/// The name of the bearer security scheme.
const BEARER: &str = "bearer";

/// `GET /openapi.json`.
pub async fn serve() -> Response {
    static DOCUMENT: OnceLock<String> = OnceLock::new();
    let text = DOCUMENT.get_or_init(|| document_json().to_string());
    ([(CONTENT_TYPE, "application/json")], text.clone()).into_response()
}

/// Every route's documentation: the router's table.
pub fn documented_routes() -> Vec<RouteDoc> {
    routes::table().into_iter().map(|route| route.doc).collect()
}

/// The document as served: [`document`] as JSON, with the keys of its
/// links spelled as OpenAPI spells them (utoipa 5.5 writes a link's
/// `operationId` and `requestBody` in snake case).
pub fn document_json() -> serde_json::Value {
    // Serializing plain data cannot fail; an empty object would still be
    // answered rather than a panic.
    let mut json = serde_json::to_value(document()).unwrap_or_default();
    let Some(paths) = json.get_mut("paths").and_then(|p| p.as_object_mut()) else {
        return json;
    };
    for operation in paths.values_mut().filter_map(|item| item.as_object_mut()) {
        for op in operation.values_mut() {
            let Some(responses) = op.get_mut("responses").and_then(|r| r.as_object_mut()) else {
                continue;
            };
            for response in responses.values_mut() {
                let Some(links) = response.get_mut("links").and_then(|l| l.as_object_mut()) else {
                    continue;
                };
                for link in links.values_mut().filter_map(|l| l.as_object_mut()) {
                    for (snake, camel) in [
                        ("operation_id", "operationId"),
                        ("operation_ref", "operationRef"),
                        ("request_body", "requestBody"),
                    ] {
                        if let Some(value) = link.remove(snake) {
                            link.insert(camel.into(), value);
                        }
                    }
                }
            }
        }
    }
    json
}

/// The document.
pub fn document() -> OpenApi {
    let mut paths = PathsBuilder::new().build();
    let all = documented_routes();
    for doc in &all {
        paths.add_path_operation(
            doc.path,
            vec![http_method(&doc.method)],
            operation(doc, &all),
        );
    }
    OpenApiBuilder::new()
        .info(
            InfoBuilder::new()
                .title("flashcore")
                .version(env!("CARGO_PKG_VERSION"))
                .description(Some(
                    "A trading core for e-commerce flash sales (the contract: API.md, v3). \
                     A known path answers a method it does not take with \
                     405 method_not_allowed and an Allow header; GET routes also take HEAD.",
                ))
                .build(),
        )
        .paths(paths)
        .components(Some(components()))
        .build()
}

fn components() -> utoipa::openapi::Components {
    let status = ObjectBuilder::new()
        .property("status", ObjectBuilder::new().schema_type(Type::String))
        .required("status")
        .build();
    let document = ObjectBuilder::new()
        .property("openapi", ObjectBuilder::new().schema_type(Type::String))
        .required("openapi")
        .build();
    let mut components = ComponentsBuilder::new()
        .schema_from::<views::NewSkuBody>()
        .schema_from::<views::PatchSkuBody>()
        .schema_from::<views::RestockBody>()
        .schema_from::<views::PromotionBody>()
        .schema_from::<views::LineBody>()
        .schema_from::<views::PlaceOrderBody>()
        .schema_from::<views::CheckoutBody>()
        .schema_from::<views::PayBody>()
        .schema_from::<views::RefundBody>()
        .schema_from::<views::CartItemBody>()
        .schema_from::<views::SkuJson<'static>>()
        .schema_from::<views::SkuListJson<'static>>()
        .schema_from::<views::LineJson<'static>>()
        .schema_from::<views::HistoryJson>()
        .schema_from::<views::OrderJson<'static>>()
        .schema_from::<views::OrderListJson<'static>>()
        .schema_from::<views::CartLineJson<'static>>()
        .schema_from::<views::CartJson<'static>>()
        .schema_from::<views::PromotionJson<'static>>()
        .schema_from::<views::ClusterJson>()
        .schema_from::<views::ClusterNodeJson>()
        .schema_from::<views::PartitionOwnerJson>()
        .schema_from::<ErrorBody<'static>>()
        .schema_from::<ErrorFields<'static>>()
        .schema("Status", status)
        .schema("OpenApiDocument", document)
        .security_scheme(
            BEARER,
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .bearer_format("JWT")
                    .build(),
            ),
        )
        .build();
    // utoipa 5.5 writes `#[schema(min_properties = 1)]` as `maxProperties`:
    // a PATCH names at least one field, and any number of them.
    if let Some(RefOr::T(Schema::Object(patch))) = components.schemas.get_mut("PatchSkuBody") {
        patch.min_properties = Some(1);
        patch.max_properties = None;
    }
    components
}

fn http_method(method: &axum::http::Method) -> HttpMethod {
    match *method {
        axum::http::Method::POST => HttpMethod::Post,
        axum::http::Method::PUT => HttpMethod::Put,
        axum::http::Method::PATCH => HttpMethod::Patch,
        axum::http::Method::DELETE => HttpMethod::Delete,
        _ => HttpMethod::Get,
    }
}

fn schema_ref(name: &str) -> RefOr<Schema> {
    RefOr::Ref(Ref::from_schema_name(name))
}

fn string_schema() -> ObjectBuilder {
    ObjectBuilder::new().schema_type(Type::String)
}

fn json_response(description: &str, schema: &str) -> DocResponse {
    ResponseBuilder::new()
        .description(description)
        .content(
            "application/json",
            ContentBuilder::new()
                .schema(Some(schema_ref(schema)))
                .build(),
        )
        .build()
}

fn error_response(description: &str, retry_after: bool) -> DocResponse {
    let mut response = json_response(description, "Error");
    if retry_after {
        response.headers.insert(
            "Retry-After".into(),
            HeaderBuilder::new()
                .schema(ObjectBuilder::new().schema_type(Type::Integer))
                .description(Some("Seconds to wait before retrying"))
                .build(),
        );
    }
    response
}

fn success_response(doc: &RouteDoc) -> DocResponse {
    match doc.answer {
        Body::Empty => ResponseBuilder::new().description("Done").build(),
        Body::Json(schema) => json_response("Success", schema),
        // An event stream is a sequence of events, not one string: no schema.
        Body::Text(media @ "text/event-stream") => ResponseBuilder::new()
            .description("Success: one `data:` event of JSON a second")
            .content(media, ContentBuilder::new().build())
            .build(),
        Body::Text(media) => ResponseBuilder::new()
            .description("Success")
            .content(
                media,
                ContentBuilder::new().schema(Some(string_schema())).build(),
            )
            .build(),
    }
}

/// The path's `{name}` segments.
fn path_params(path: &str) -> impl Iterator<Item = &str> {
    path.split('/')
        .filter_map(|seg| seg.strip_prefix('{').and_then(|s| s.strip_suffix('}')))
}

/// An id (contract, "Limits").
const ID_PATTERN: &str = "^[A-Za-z0-9_.-]{1,64}$";
/// An order id: a decimal number (anything else names no order: `404`).
const ORDER_ID_PATTERN: &str = "^[1-9][0-9]{0,19}$";
/// An `Idempotency-Key`: 1 to 255 visible ASCII characters.
const IDEMPOTENCY_KEY_PATTERN: &str = "^[!-~]{1,255}$";

fn id_schema() -> ObjectBuilder {
    string_schema()
        .pattern(Some(ID_PATTERN))
        .min_length(Some(1))
        .max_length(Some(crate::limits::ID_BYTES_MAX))
}

fn path_param_schema(name: &str) -> ObjectBuilder {
    match name {
        "order_id" => string_schema().pattern(Some(ORDER_ID_PATTERN)),
        _ => id_schema(),
    }
}

fn query_schema(param: Param) -> ObjectBuilder {
    match param {
        Param::Id => id_schema(),
        Param::Range(low, high) => ObjectBuilder::new()
            .schema_type(Type::Integer)
            .minimum(Some(low))
            .maximum(Some(high)),
    }
}

fn description(doc: &RouteDoc) -> String {
    match doc.access {
        Access::Public => "Public: no token.".into(),
        Access::Signed => "Needs a bearer token (a customer, or an admin).".into(),
        Access::Admin => {
            "Admin only: a bearer token with role = admin (a customer's token gets 403).".into()
        }
    }
}

/// The statuses and codes every route answers from what it takes (its
/// body, parameters, token, key), then its own (`doc.errors`), in order.
fn error_statuses(doc: &RouteDoc) -> Vec<(u16, String)> {
    let mut errors: Vec<(u16, String)> = Vec::new();
    let path_sku = path_params(doc.path).any(|name| name != "order_id");
    if doc.request.is_some() || !doc.query.is_empty() || path_sku || doc.idempotent {
        errors.push((
            400,
            "invalid_request: malformed JSON, wrong types, missing or unknown fields, \
             bad ids, a value out of range"
                .into(),
        ));
    }
    if doc.access != Access::Public {
        errors.push((401, "unauthorized: a missing or refused token".into()));
    }
    let mut forbidden: Vec<&str> = Vec::new();
    if doc.access == Access::Admin {
        forbidden.push("forbidden: the route needs role = admin");
    }
    for (status, codes) in doc.errors {
        if *status == 403 {
            forbidden.push(codes);
        } else {
            errors.push((*status, (*codes).into()));
        }
    }
    if !forbidden.is_empty() {
        errors.push((403, forbidden.join("; ")));
    }
    errors.push((413, "payload_too_large: a body over 64 KiB".into()));
    if doc.idempotent {
        errors.push((
            422,
            "idempotency_conflict: the key was used with another request".into(),
        ));
    }
    if !matches!(doc.path, "/healthz" | "/readyz") {
        errors.push((
            429,
            "rate_limited: over the caller's rate (`--rate-limit`)".into(),
        ));
    }
    let unavailable = if doc.path == "/readyz" {
        "storage_unavailable: recovering, or the journal cannot write"
    } else if doc.path.starts_with("/v1/") && doc.method != axum::http::Method::GET {
        "overloaded, storage_unavailable: the journal cannot make changes durable, \
         or partition_unavailable (cluster mode): the partition is between owners"
    } else if doc.path.starts_with("/v1/") {
        "overloaded: the server sheds load, or partition_unavailable (cluster mode): \
         the partition is between owners"
    } else {
        "overloaded: the server sheds load"
    };
    errors.push((503, unavailable.into()));
    errors.sort_by_key(|(status, _)| *status);
    errors
}

/// The `links` of a success answer: from what it returns (an order, a
/// SKU) to every route that takes its id, so that a client (or a stateful
/// fuzzer) can follow an order's life and a SKU's.
fn links(doc: &RouteDoc, all: &[RouteDoc]) -> Vec<(String, Link)> {
    let (param, body_field) = match doc.answer {
        Body::Json("Order") => ("order_id", "$response.body#/order_id"),
        Body::Json("Sku") => ("sku_id", "$response.body#/sku_id"),
        _ => return Vec::new(),
    };
    let mut links = Vec::new();
    for target in all {
        if !path_params(target.path).any(|name| name == param) {
            continue;
        }
        let mut link = LinkBuilder::new()
            .operation_id(operation_id(target))
            .parameter(param, body_field);
        // A payment of the order's total, so that the link leads on to
        // `paid` (and from there to ship, deliver and refund).
        if target.request == Some("PayBody") {
            link = link.request_body(Some(serde_json::json!({
                "payment_ref": "psp-link",
                "amount_cents": "$response.body#/total_cents",
            })));
        }
        links.push((operation_id(target), link.build()));
    }
    // A new SKU can be ordered at once.
    if param == "sku_id"
        && let Some(place) = all
            .iter()
            .find(|t| t.method == axum::http::Method::POST && t.path == "/v1/orders")
    {
        let link = LinkBuilder::new()
            .operation_id(operation_id(place))
            .request_body(Some(serde_json::json!({
                "items": [{"sku_id": "$response.body#/sku_id", "qty": 1}],
            })))
            .build();
        links.push((operation_id(place), link));
    }
    links
}

fn operation(doc: &RouteDoc, all: &[RouteDoc]) -> utoipa::openapi::path::Operation {
    let mut success = success_response(doc);
    for (name, link) in links(doc, all) {
        success.links.insert(name, RefOr::T(link));
    }
    let mut op = OperationBuilder::new()
        .summary(Some(doc.summary))
        .description(Some(description(doc)))
        .operation_id(Some(operation_id(doc)))
        .response(doc.status.to_string(), success);
    for name in path_params(doc.path) {
        op = op.parameter(
            ParameterBuilder::new()
                .name(name)
                .parameter_in(ParameterIn::Path)
                .required(Required::True)
                .schema(Some(path_param_schema(name))),
        );
    }
    for (name, description, param) in doc.query {
        op = op.parameter(
            ParameterBuilder::new()
                .name(*name)
                .parameter_in(ParameterIn::Query)
                .required(Required::False)
                .description(Some(*description))
                .schema(Some(query_schema(*param))),
        );
    }
    if doc.idempotent {
        op = op.parameter(
            ParameterBuilder::new()
                .name("Idempotency-Key")
                .parameter_in(ParameterIn::Header)
                .required(Required::False)
                .description(Some(
                    "1 to 255 visible ASCII characters; scoped to the user",
                ))
                .schema(Some(
                    string_schema()
                        .pattern(Some(IDEMPOTENCY_KEY_PATTERN))
                        .min_length(Some(1))
                        .max_length(Some(crate::limits::IDEMPOTENCY_KEY_BYTES_MAX)),
                )),
        );
    }
    if let Some(schema) = doc.request {
        let required = if doc.request_optional {
            Required::False
        } else {
            Required::True
        };
        op = op.request_body(Some(
            RequestBodyBuilder::new()
                .required(Some(required))
                .content(
                    "application/json",
                    ContentBuilder::new()
                        .schema(Some(schema_ref(schema)))
                        .build(),
                )
                .build(),
        ));
    }
    for (status, codes) in error_statuses(doc) {
        let retry_after = matches!(status, 429 | 503);
        op = op.response(status.to_string(), error_response(&codes, retry_after));
    }
    // Public routes say so: no security requirement at all.
    op = if doc.access == Access::Public {
        op.securities(Some(Vec::<SecurityRequirement>::new()))
    } else {
        op.security(SecurityRequirement::new(BEARER, Vec::<String>::new()))
    };
    op.build()
}

/// `get_v1_skus_sku_id` and the like: unique per method and path.
fn operation_id(doc: &RouteDoc) -> String {
    let path: String = doc
        .path
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
        .collect();
    format!(
        "{}{}",
        doc.method.as_str().to_ascii_lowercase(),
        path.trim_end_matches('_')
    )
    .replace("__", "_")
}

/// Checks the shape of a document. Used by the tests, and kept here so
/// what "valid" means sits beside what builds it.
///
/// # Errors
/// What is wrong, as text.
pub fn check(document: &serde_json::Value) -> Result<(), String> {
    let version = document["openapi"].as_str().unwrap_or("");
    if !version.starts_with("3.1") {
        return Err(format!("openapi is {version:?}, not 3.1.x"));
    }
    if document["info"]["title"].as_str().is_none()
        || document["info"]["version"].as_str().is_none()
    {
        return Err("info needs a title and a version".into());
    }
    let paths = document["paths"].as_object().ok_or("no paths")?;
    let schemas = document["components"]["schemas"]
        .as_object()
        .ok_or("no component schemas")?;
    let methods = [
        "get", "put", "post", "delete", "options", "head", "patch", "trace",
    ];
    for (path, item) in paths {
        if !path.starts_with('/') {
            return Err(format!("path {path} does not start with /"));
        }
        let item = item.as_object().ok_or(format!("{path} is not an object"))?;
        let operations: Vec<_> = item
            .iter()
            .filter(|(k, _)| methods.contains(&k.as_str()))
            .collect();
        if operations.is_empty() {
            return Err(format!("{path} has no operation"));
        }
        for (method, op) in operations {
            let responses = op["responses"]
                .as_object()
                .ok_or(format!("{method} {path} has no responses"))?;
            if responses.is_empty() {
                return Err(format!("{method} {path} has no responses"));
            }
            for (status, response) in responses {
                let valid = status.len() == 3 && status.chars().all(|c| c.is_ascii_digit());
                if !valid || response["description"].as_str().is_none() {
                    return Err(format!("{method} {path}: response {status} is malformed"));
                }
            }
            let declared: Vec<&str> = op["parameters"]
                .as_array()
                .map(|ps| {
                    ps.iter()
                        .filter(|p| p["in"] == "path")
                        .filter_map(|p| p["name"].as_str())
                        .collect()
                })
                .unwrap_or_default();
            for name in path_params(path) {
                if !declared.contains(&name) {
                    return Err(format!("{method} {path}: path parameter {name} undeclared"));
                }
            }
        }
    }
    check_refs(document, schemas)
}

/// Every `$ref` names a component schema that exists.
fn check_refs(
    value: &serde_json::Value,
    schemas: &serde_json::Map<String, serde_json::Value>,
) -> Result<(), String> {
    // Iterative, not recursive (TIGER_STYLE): a stack of values to visit.
    let mut stack = vec![value];
    while let Some(value) = stack.pop() {
        match value {
            serde_json::Value::Object(map) => {
                if let Some(target) = map.get("$ref").and_then(|r| r.as_str()) {
                    let name = target
                        .strip_prefix("#/components/schemas/")
                        .ok_or(format!("unexpected $ref {target}"))?;
                    if !schemas.contains_key(name) {
                        return Err(format!("$ref to missing schema {name}"));
                    }
                }
                stack.extend(map.values());
            }
            serde_json::Value::Array(items) => stack.extend(items),
            _ => {}
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_route_is_documented_and_the_document_is_valid_openapi_3_1() {
        let json: serde_json::Value = document_json();
        check(&json).expect("a valid document");
        // Every path of the built document is served (utoipa 5.5 no longer
        // reads its own output back: a content without a schema, the event
        // stream's, is not one of its `RefOr` variants).
        assert_eq!(
            document().paths.paths.len(),
            json["paths"].as_object().map_or(0, |p| p.len())
        );
        for route in routes::table() {
            let method = route.doc.method.as_str().to_ascii_lowercase();
            let op = &json["paths"][route.doc.path][&method];
            assert!(
                op.is_object(),
                "{method} {} is in the document",
                route.doc.path
            );
            assert!(
                op["responses"][route.doc.status.to_string()].is_object(),
                "{method} {} documents its success",
                route.doc.path
            );
            if route.doc.access != Access::Public {
                assert_eq!(op["security"][0][BEARER], serde_json::json!([]));
            }
        }
        for extra in [
            "/dashboard",
            "/v1/stream",
            "/openapi.json",
            "/healthz",
            "/readyz",
            "/metrics",
        ] {
            assert!(json["paths"][extra]["get"].is_object(), "{extra}");
        }
        assert_eq!(
            json["paths"]["/v1/stream"]["get"]["responses"]["200"]["content"]
                .as_object()
                .map(|c| c.keys().cloned().collect::<Vec<_>>()),
            Some(vec!["text/event-stream".to_string()])
        );
        assert_eq!(
            json["components"]["securitySchemes"][BEARER]["scheme"],
            "bearer"
        );
        let sku = &json["components"]["schemas"]["Sku"]["properties"];
        for field in ["sku_id", "sale_starts_at", "sale_ends_at", "available"] {
            assert!(sku[field].is_object(), "Sku.{field}");
        }
        assert!(json["components"]["schemas"]["Error"]["properties"]["error"].is_object());
    }

    #[test]
    fn the_check_catches_broken_documents() {
        let good: serde_json::Value =
            serde_json::from_str(&document().to_json().expect("serializes")).expect("parses");
        let mut old = good.clone();
        old["openapi"] = "3.0.3".into();
        assert!(check(&old).is_err());
        let mut no_responses = good.clone();
        no_responses["paths"]["/healthz"]["get"]["responses"] = serde_json::json!({});
        assert!(check(&no_responses).is_err());
        let mut dangling = good.clone();
        dangling["paths"]["/healthz"]["get"]["responses"]["200"]["content"]["application/json"]["schema"] =
            serde_json::json!({"$ref": "#/components/schemas/Nope"});
        assert!(check(&dangling).is_err());
        let mut empty = good;
        empty["paths"]["/healthz"] = serde_json::json!({});
        assert!(check(&empty).is_err());
    }

    #[test]
    fn operation_ids_are_unique() {
        let docs = documented_routes();
        let mut ids: Vec<String> = docs.iter().map(operation_id).collect();
        ids.sort();
        let before = ids.len();
        ids.dedup();
        assert_eq!(ids.len(), before, "{ids:?}");
        let mut keys: Vec<(String, &str)> = docs
            .iter()
            .map(|d| (d.method.to_string(), d.path))
            .collect();
        keys.sort();
        keys.dedup();
        assert_eq!(keys.len(), before, "no route twice");
    }
}
