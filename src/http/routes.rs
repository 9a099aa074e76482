//! The route table: every route of the router, once, with what the OpenAPI
//! document says about it.
//!
//! The router (`router` in `mod.rs`) and the document (`openapi.rs`) are
//! both built from [`table`], so a route cannot be served without being
//! documented, nor documented without being served. Each entry is one
//! method of one path; entries of the same path are merged into one
//! `MethodRouter`.

use axum::http::Method;
use axum::routing::{MethodFilter, MethodRouter, on};

use crate::http::{AppState, handlers, live, openapi};
use crate::limits::{ORDERS_LIST_MAX, SKUS_PAGE_MAX};

/// Who may call a route (contract: "Authentication").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// Anyone, without a token.
    Public,
    /// Any valid token (a customer, or an admin acting for one).
    Signed,
    /// A token with `role = admin`.
    Admin,
}

/// What a successful answer carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Body {
    /// Nothing (`204`).
    Empty,
    /// JSON of the named component schema.
    Json(&'static str),
    /// Text of this media type (HTML, Prometheus, an event stream).
    Text(&'static str),
}

/// What a query parameter holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Param {
    /// An id (`[A-Za-z0-9_.-]{1,64}`).
    Id,
    /// A decimal integer in this range.
    Range(u64, u64),
}

/// What the OpenAPI document says about one method of one path.
#[derive(Debug, Clone)]
pub struct RouteDoc {
    /// The method.
    pub method: Method,
    /// The path, with `{param}` segments as axum and OpenAPI both write them.
    pub path: &'static str,
    /// One line on what it does.
    pub summary: &'static str,
    /// Who may call it.
    pub access: Access,
    /// The request body's component schema, if it takes one.
    pub request: Option<&'static str>,
    /// Whether the request body may be left out (checkout).
    pub request_optional: bool,
    /// The success status.
    pub status: u16,
    /// The success answer.
    pub answer: Body,
    /// Query parameters: name, description and schema.
    pub query: &'static [(&'static str, &'static str, Param)],
    /// Whether it takes an `Idempotency-Key`.
    pub idempotent: bool,
    /// The answers that depend on what the route does (`403` beyond the
    /// admin check, `404`, `409`), each with its codes; the document adds
    /// those that follow from what it takes (`openapi.rs`).
    pub errors: &'static [(u16, &'static str)],
}

impl RouteDoc {
    const fn new(method: Method, path: &'static str, summary: &'static str) -> RouteDoc {
        RouteDoc {
            method,
            path,
            summary,
            access: Access::Public,
            request: None,
            request_optional: false,
            status: 200,
            answer: Body::Json("Status"),
            query: &[],
            idempotent: false,
            errors: &[],
        }
    }

    const fn errors(mut self, errors: &'static [(u16, &'static str)]) -> RouteDoc {
        self.errors = errors;
        self
    }

    const fn access(mut self, access: Access) -> RouteDoc {
        self.access = access;
        self
    }

    const fn request(mut self, schema: &'static str) -> RouteDoc {
        self.request = Some(schema);
        self
    }

    const fn answer(mut self, status: u16, answer: Body) -> RouteDoc {
        self.status = status;
        self.answer = answer;
        self
    }

    const fn query(mut self, query: &'static [(&'static str, &'static str, Param)]) -> RouteDoc {
        self.query = query;
        self
    }

    const fn idempotent(mut self) -> RouteDoc {
        self.idempotent = true;
        self
    }
}

/// One route: its documentation and its handler.
pub(crate) struct Route {
    pub(crate) doc: RouteDoc,
    pub(crate) handler: MethodRouter<AppState>,
}

fn route<H, T>(doc: RouteDoc, handler: H) -> Route
where
    H: axum::handler::Handler<T, AppState>,
    T: 'static,
{
    let filter = match doc.method {
        Method::POST => MethodFilter::POST,
        Method::PUT => MethodFilter::PUT,
        Method::PATCH => MethodFilter::PATCH,
        Method::DELETE => MethodFilter::DELETE,
        _ => MethodFilter::GET,
    };
    debug_assert!(
        [
            Method::GET,
            Method::POST,
            Method::PUT,
            Method::PATCH,
            Method::DELETE
        ]
        .contains(&doc.method),
        "a method the filter does not map"
    );
    Route {
        doc,
        handler: on(filter, handler),
    }
}

/// The `Allow` header of `path`: the methods the route table serves it
/// with, `HEAD` after `GET` (axum answers `HEAD` on a `GET` route, as RFC
/// 9110 asks of every server that takes `GET`), in the table's order.
/// Empty for a path the table does not have.
pub fn allow(path: &str) -> String {
    let mut methods: Vec<String> = Vec::new();
    for route in table() {
        if route.doc.path != path {
            continue;
        }
        methods.push(route.doc.method.to_string());
        if route.doc.method == Method::GET {
            methods.push(Method::HEAD.to_string());
        }
    }
    methods.join(", ")
}

const SKU: Body = Body::Json("Sku");
const NOT_FOUND_SKU: &str = "not_found: no such SKU";
const NOT_FOUND_ORDER: &str =
    "not_found: no such order (an order_id that is not a decimal number names none)";
const NOT_OWNER: &str = "forbidden: another user's order";
const TRANSITION: &str = "invalid_transition: the order's state does not allow it";
const SELL_CONFLICTS: &str = "out_of_stock, limit_exceeded, sale_not_started or sale_ended";
const ORDER: Body = Body::Json("Order");
const CART: Body = Body::Json("Cart");

/// Every route the router serves.
#[allow(clippy::too_many_lines)] // One table, one entry per route.
pub(crate) fn table() -> Vec<Route> {
    use {Access::Admin, Access::Signed, Method as M, RouteDoc as D};
    vec![
        route(
            D::new(M::GET, "/healthz", "The process is up"),
            handlers::healthz,
        ),
        route(
            D::new(
                M::GET,
                "/readyz",
                "Recovery has finished and changes are taken",
            ),
            handlers::readyz,
        ),
        route(
            D::new(M::GET, "/metrics", "Prometheus metrics").answer(200, Body::Text("text/plain")),
            handlers::metrics,
        ),
        route(
            D::new(M::GET, "/dashboard", "The live sale dashboard (HTML)")
                .answer(200, Body::Text("text/html")),
            live::dashboard,
        ),
        route(
            D::new(
                M::GET,
                "/v1/stream",
                "One JSON event a second with the dashboard's public counters",
            )
            .answer(200, Body::Text("text/event-stream")),
            live::stream,
        ),
        route(
            D::new(M::GET, "/openapi.json", "This document (OpenAPI 3.1)")
                .answer(200, Body::Json("OpenApiDocument")),
            openapi::serve,
        ),
        route(
            D::new(
                M::GET,
                "/v1/cluster",
                "The cluster's nodes and partition owners (a single node: no node id, one partition)",
            )
            .answer(200, Body::Json("Cluster")),
            handlers::cluster,
        ),
        route(
            D::new(M::POST, "/v1/skus", "Create a SKU")
                .access(Admin)
                .request("NewSkuBody")
                .answer(201, SKU)
                .errors(&[(409, "already_exists: the sku_id is taken")]),
            handlers::create_sku,
        ),
        route(
            D::new(M::GET, "/v1/skus", "One page of SKUs in sku_id order")
                .answer(200, Body::Json("SkuPage"))
                .query(&[
                    (
                        "limit",
                        "Page size, 1 to 1000 (default 100)",
                        Param::Range(1, SKUS_PAGE_MAX as u64),
                    ),
                    (
                        "after",
                        "The `next` of the previous page (exclusive)",
                        Param::Id,
                    ),
                ]),
            handlers::list_skus,
        ),
        route(
            D::new(M::GET, "/v1/skus/{sku_id}", "Read a SKU")
                .answer(200, SKU)
                .errors(&[(404, NOT_FOUND_SKU)]),
            handlers::get_sku,
        ),
        route(
            D::new(
                M::PATCH,
                "/v1/skus/{sku_id}",
                "Change a SKU's settings or sale window",
            )
            .access(Admin)
            .request("PatchSkuBody")
            .answer(200, SKU)
            .errors(&[(404, NOT_FOUND_SKU)]),
            handlers::patch_sku,
        ),
        route(
            D::new(M::POST, "/v1/skus/{sku_id}/restock", "Add units")
                .access(Admin)
                .request("RestockBody")
                .answer(200, SKU)
                .idempotent()
                .errors(&[(404, NOT_FOUND_SKU)]),
            handlers::restock,
        ),
        route(
            D::new(M::POST, "/v1/promotions", "Create a promotion")
                .access(Admin)
                .request("PromotionBody")
                .answer(201, Body::Json("Promotion"))
                .errors(&[(409, "already_exists: the code is taken")]),
            handlers::create_promotion,
        ),
        route(
            D::new(M::POST, "/v1/orders", "Place an order (all lines or none)")
                .access(Signed)
                .request("PlaceOrderBody")
                .answer(201, ORDER)
                .idempotent()
                .errors(&[
                    (404, "not_found: an unknown SKU or promotion code"),
                    (409, SELL_CONFLICTS),
                ]),
            handlers::place_order,
        ),
        route(
            D::new(M::GET, "/v1/orders", "List orders, newest first")
                .access(Signed)
                .answer(200, Body::Json("OrderList"))
                .query(&[
                    (
                        "limit",
                        "How many, 1 to 500 (default 50)",
                        Param::Range(1, ORDERS_LIST_MAX as u64),
                    ),
                    (
                        "user_id",
                        "Only this user's (admins; a customer may name only itself)",
                        Param::Id,
                    ),
                ])
                .errors(&[(403, "forbidden: a customer asking for another user's orders")]),
            handlers::list_orders,
        ),
        route(
            D::new(
                M::GET,
                "/v1/orders/{order_id}",
                "Read an order (owner or admin)",
            )
            .access(Signed)
            .answer(200, ORDER)
            .errors(&[(403, NOT_OWNER), (404, NOT_FOUND_ORDER)]),
            handlers::get_order,
        ),
        route(
            D::new(M::POST, "/v1/orders/{order_id}/pay", "Record a payment")
                .access(Admin)
                .request("PayBody")
                .answer(200, ORDER)
                .idempotent()
                .errors(&[
                    (404, NOT_FOUND_ORDER),
                    (409, "invalid_transition or payment_mismatch"),
                ]),
            handlers::pay,
        ),
        route(
            D::new(
                M::POST,
                "/v1/orders/{order_id}/cancel",
                "Cancel a reserved order",
            )
            .access(Signed)
            .answer(200, ORDER)
            .errors(&[(403, NOT_OWNER), (404, NOT_FOUND_ORDER), (409, TRANSITION)]),
            handlers::cancel,
        ),
        route(
            D::new(M::POST, "/v1/orders/{order_id}/ship", "Ship a paid order")
                .access(Admin)
                .answer(200, ORDER)
                .errors(&[(404, NOT_FOUND_ORDER), (409, TRANSITION)]),
            handlers::ship,
        ),
        route(
            D::new(
                M::POST,
                "/v1/orders/{order_id}/deliver",
                "Mark a shipped order delivered",
            )
            .access(Admin)
            .answer(200, ORDER)
            .errors(&[(404, NOT_FOUND_ORDER), (409, TRANSITION)]),
            handlers::deliver,
        ),
        route(
            D::new(
                M::POST,
                "/v1/orders/{order_id}/refund",
                "Refund units of an order",
            )
            .access(Admin)
            .request("RefundBody")
            .answer(200, ORDER)
            .idempotent()
            .errors(&[(404, NOT_FOUND_ORDER), (409, TRANSITION)]),
            handlers::refund,
        ),
        route(
            D::new(M::GET, "/v1/cart", "Read the caller's cart")
                .access(Signed)
                .answer(200, CART),
            handlers::get_cart,
        ),
        route(
            D::new(M::DELETE, "/v1/cart", "Empty the caller's cart")
                .access(Signed)
                .answer(204, Body::Empty),
            handlers::clear_cart,
        ),
        route(
            D::new(
                M::PUT,
                "/v1/cart/items/{sku_id}",
                "Set a cart line (0 removes it)",
            )
            .access(Signed)
            .request("CartItemBody")
            .answer(200, CART)
            .errors(&[(404, NOT_FOUND_SKU)]),
            handlers::put_cart_item,
        ),
        route(
            RouteDoc {
                request_optional: true,
                ..D::new(M::POST, "/v1/cart/checkout", "Place the cart as an order")
                    .access(Signed)
                    .request("CheckoutBody")
                    .answer(201, ORDER)
                    .idempotent()
                    .errors(&[
                        (404, "not_found: an unknown SKU or promotion code"),
                        (409, SELL_CONFLICTS),
                    ])
            },
            handlers::checkout,
        ),
    ]
}
