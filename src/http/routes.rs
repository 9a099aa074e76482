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
    /// Query parameters: name and description.
    pub query: &'static [(&'static str, &'static str)],
    /// Whether it takes an `Idempotency-Key`.
    pub idempotent: bool,
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
        }
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

    const fn query(mut self, query: &'static [(&'static str, &'static str)]) -> RouteDoc {
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

const SKU: Body = Body::Json("Sku");
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
            D::new(M::POST, "/v1/skus", "Create a SKU")
                .access(Admin)
                .request("NewSkuBody")
                .answer(201, SKU),
            handlers::create_sku,
        ),
        route(
            D::new(M::GET, "/v1/skus", "One page of SKUs in sku_id order")
                .answer(200, Body::Json("SkuPage"))
                .query(&[
                    ("limit", "Page size, 1 to 1000 (default 100)"),
                    ("after", "The `next` of the previous page (exclusive)"),
                ]),
            handlers::list_skus,
        ),
        route(
            D::new(M::GET, "/v1/skus/{sku_id}", "Read a SKU").answer(200, SKU),
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
            .answer(200, SKU),
            handlers::patch_sku,
        ),
        route(
            D::new(M::POST, "/v1/skus/{sku_id}/restock", "Add units")
                .access(Admin)
                .request("RestockBody")
                .answer(200, SKU)
                .idempotent(),
            handlers::restock,
        ),
        route(
            D::new(M::POST, "/v1/promotions", "Create a promotion")
                .access(Admin)
                .request("PromotionBody")
                .answer(201, Body::Json("Promotion")),
            handlers::create_promotion,
        ),
        route(
            D::new(M::POST, "/v1/orders", "Place an order (all lines or none)")
                .access(Signed)
                .request("PlaceOrderBody")
                .answer(201, ORDER)
                .idempotent(),
            handlers::place_order,
        ),
        route(
            D::new(M::GET, "/v1/orders", "List orders, newest first")
                .access(Signed)
                .answer(200, Body::Json("OrderList"))
                .query(&[
                    ("limit", "How many, 1 to 500 (default 50)"),
                    ("user_id", "Only this user's (admins)"),
                ]),
            handlers::list_orders,
        ),
        route(
            D::new(
                M::GET,
                "/v1/orders/{order_id}",
                "Read an order (owner or admin)",
            )
            .access(Signed)
            .answer(200, ORDER),
            handlers::get_order,
        ),
        route(
            D::new(M::POST, "/v1/orders/{order_id}/pay", "Record a payment")
                .access(Admin)
                .request("PayBody")
                .answer(200, ORDER)
                .idempotent(),
            handlers::pay,
        ),
        route(
            D::new(
                M::POST,
                "/v1/orders/{order_id}/cancel",
                "Cancel a reserved order",
            )
            .access(Signed)
            .answer(200, ORDER),
            handlers::cancel,
        ),
        route(
            D::new(M::POST, "/v1/orders/{order_id}/ship", "Ship a paid order")
                .access(Admin)
                .answer(200, ORDER),
            handlers::ship,
        ),
        route(
            D::new(
                M::POST,
                "/v1/orders/{order_id}/deliver",
                "Mark a shipped order delivered",
            )
            .access(Admin)
            .answer(200, ORDER),
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
            .idempotent(),
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
            .answer(200, CART),
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
            },
            handlers::checkout,
        ),
    ]
}
