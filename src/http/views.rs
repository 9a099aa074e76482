//! The JSON shapes of the contract: request bodies in, SKUs, orders, carts
//! and promotions out. Field names here are fixed by `../shared/API.md`.
//!
//! Request bodies refuse unknown fields (a typo such as `"qtty"` is a `400`,
//! not a silently ignored field) and validate ids while parsing. Times go
//! out as RFC 3339 UTC strings, money as integer cents, order ids as
//! decimal strings.

use std::time::{Duration, UNIX_EPOCH};

use crate::domain::sale::{SalePatch, SaleWindow};
use crate::http::error::ApiError;

use serde::{Deserialize, Deserializer, Serialize};
use utoipa::ToSchema;

use crate::domain::cart::Cart;
use crate::domain::event::SkuQty;
use crate::domain::order::{Order, OrderStatus};
use crate::domain::promo::Promotion;
use crate::domain::sku::SkuView;
use crate::domain::{PaymentRef, PromoCode, SkuId};
use crate::limits::BUCKETS_MAX;

/// RFC 3339 UTC, millisecond precision.
pub fn rfc3339(ms: u64) -> String {
    humantime::format_rfc3339_millis(UNIX_EPOCH + Duration::from_millis(ms)).to_string()
}

/// Reads an RFC 3339 UTC time (`2026-01-01T09:00:00Z`, fractions allowed)
/// as unix milliseconds.
///
/// # Errors
/// `400` for anything else: another offset, a time before 1970, not a time.
pub fn parse_rfc3339(field: &str, text: &str) -> Result<u64, ApiError> {
    let bad = || {
        ApiError::invalid(format!(
            "{field} must be an RFC 3339 UTC time such as 2026-01-01T09:00:00Z, not {text:?}"
        ))
    };
    let at = humantime::parse_rfc3339(text).map_err(|_| bad())?;
    let since = at.duration_since(UNIX_EPOCH).map_err(|_| bad())?;
    u64::try_from(since.as_millis()).map_err(|_| bad())
}

fn parse_optional_time(field: &str, text: Option<&str>) -> Result<Option<u64>, ApiError> {
    text.map(|t| parse_rfc3339(field, t)).transpose()
}

// The document's patterns are literals in the `#[schema]` attributes (utoipa
// takes no constants there): ids `^[A-Za-z0-9_.-]{1,64}$` (contract,
// "Limits"); a name of 1..=200 characters none of which is a control
// character (`char::is_control`, Unicode's `Cc`, as `validate::name`
// refuses); a time as `parse_rfc3339` reads it: RFC 3339 UTC (`Z` or
// `+00:00`), a real date from 1970 on (leap years included), seconds up to
// a leap 60, any fraction. tests/http_api.rs checks them against the server.

/// An integer of a request body. JSON Schema (2020-12, the dialect of
/// OpenAPI 3.1) calls `1460.0` an integer, so a client built from the
/// document may send one: a number with no fraction reads as that integer,
/// as long as a float spells it exactly (up to 2^53); anything else, a
/// fraction, a negative, or a float past 2^53, is a `400`.
#[derive(Debug, Clone, Copy)]
struct Whole<T>(T);

/// The largest integer every float at or below it spells exactly.
const WHOLE_FLOAT_MAX: f64 = 9_007_199_254_740_992.0;

impl<'de, T: TryFrom<u64>> Deserialize<'de> for Whole<T> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Whole<T>, D::Error> {
        struct Visit<T>(std::marker::PhantomData<T>);
        impl<T: TryFrom<u64>> serde::de::Visitor<'_> for Visit<T> {
            type Value = Whole<T>;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a non-negative integer in range")
            }
            fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<Whole<T>, E> {
                T::try_from(v)
                    .map(Whole)
                    .map_err(|_| E::custom(format!("{v} is out of range")))
            }
            fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<Whole<T>, E> {
                let v = u64::try_from(v).map_err(|_| E::custom(format!("{v} is negative")))?;
                self.visit_u64(v)
            }
            fn visit_f64<E: serde::de::Error>(self, v: f64) -> Result<Whole<T>, E> {
                if v.fract() != 0.0 || !(0.0..=WHOLE_FLOAT_MAX).contains(&v) {
                    return Err(E::custom(format!(
                        "{v} is not an integer (or is past 2^53 written as a float)"
                    )));
                }
                // Exact: a whole float in 0..=2^53.
                #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
                self.visit_u64(v as u64)
            }
        }
        d.deserialize_any(Visit(std::marker::PhantomData))
    }
}

/// A required integer field ([`Whole`]).
fn whole<'de, D: Deserializer<'de>, T: TryFrom<u64>>(d: D) -> Result<T, D::Error> {
    Whole::deserialize(d).map(|Whole(v)| v)
}

/// An integer field that may be `null` ([`Whole`]).
fn whole_or_null<'de, D: Deserializer<'de>, T: TryFrom<u64>>(d: D) -> Result<Option<T>, D::Error> {
    Option::<Whole<T>>::deserialize(d).map(|v| v.map(|Whole(v)| v))
}

/// An integer field that may be absent but is never `null`: with
/// `#[serde(default)]`, absent is `None` and `null` is a `400`, as the
/// document says (the field is not nullable there).
fn present_whole<'de, D: Deserializer<'de>, T: TryFrom<u64>>(d: D) -> Result<Option<T>, D::Error> {
    Whole::deserialize(d).map(|Whole(v)| Some(v))
}

/// Like [`double_option`], for an integer ([`Whole`]).
fn double_option_whole<'de, D: Deserializer<'de>, T: TryFrom<u64>>(
    d: D,
) -> Result<Option<Option<T>>, D::Error> {
    whole_or_null(d).map(Some)
}

/// A field that may be absent but is never `null` (see [`present_whole`]).
fn present<'de, D: Deserializer<'de>, T: Deserialize<'de>>(d: D) -> Result<Option<T>, D::Error> {
    T::deserialize(d).map(Some)
}

/// `POST /v1/skus`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewSkuBody {
    /// The id.
    #[schema(value_type = String, pattern = "^[A-Za-z0-9_.-]{1,64}$", min_length = 1, max_length = 64)]
    pub sku_id: SkuId,
    /// The name (no control characters).
    #[schema(
        min_length = 1,
        max_length = 200,
        pattern = "^[^\\x00-\\x1f\\x7f-\\x9f]{1,200}$"
    )]
    pub name: String,
    /// The unit price.
    #[serde(deserialize_with = "whole")]
    #[schema(minimum = 0, maximum = 1_000_000_000_000_u64)]
    pub price_cents: u64,
    /// Initial stock.
    #[serde(deserialize_with = "whole")]
    #[schema(minimum = 0, maximum = 1_000_000_000)]
    pub stock: u64,
    /// Most units per user; absent or `null` for none.
    #[serde(default, deserialize_with = "whole_or_null")]
    #[schema(minimum = 1, maximum = 10_000)]
    pub per_user_limit: Option<u32>,
    /// When the sale opens (RFC 3339 UTC); absent or `null` for always.
    /// When both ends are set, the end must be after the start.
    #[serde(default)]
    #[schema(
        pattern = "^(?:(?:19[7-9][0-9]|[2-9][0-9]{3})-(?:0[13578]|1[02])-(?:0[1-9]|[12][0-9]|3[01])|(?:19[7-9][0-9]|[2-9][0-9]{3})-(?:0[469]|11)-(?:0[1-9]|[12][0-9]|30)|(?:19[7-9][0-9]|[2-9][0-9]{3})-02-(?:0[1-9]|1[0-9]|2[0-8])|(?:19(?:7[26]|8[048]|9[26])|[2-9][0-9](?:0[48]|[2468][048]|[13579][26])|(?:[2468][048]|[3579][26])00)-02-29)T(?:[01][0-9]|2[0-3]):[0-5][0-9]:(?:[0-5][0-9]|60)(?:\\.[0-9]*)?(?:Z|\\+00:00)$"
    )]
    pub sale_starts_at: Option<String>,
    /// When the sale closes (RFC 3339 UTC); absent or `null` for never.
    #[serde(default)]
    #[schema(
        pattern = "^(?:(?:19[7-9][0-9]|[2-9][0-9]{3})-(?:0[13578]|1[02])-(?:0[1-9]|[12][0-9]|3[01])|(?:19[7-9][0-9]|[2-9][0-9]{3})-(?:0[469]|11)-(?:0[1-9]|[12][0-9]|30)|(?:19[7-9][0-9]|[2-9][0-9]{3})-02-(?:0[1-9]|1[0-9]|2[0-8])|(?:19(?:7[26]|8[048]|9[26])|[2-9][0-9](?:0[48]|[2468][048]|[13579][26])|(?:[2468][048]|[3579][26])00)-02-29)T(?:[01][0-9]|2[0-3]):[0-5][0-9]:(?:[0-5][0-9]|60)(?:\\.[0-9]*)?(?:Z|\\+00:00)$"
    )]
    pub sale_ends_at: Option<String>,
    /// How many partitions the stock is spread over in cluster mode
    /// (default 1); a single node checks it and keeps one actor.
    #[serde(default, deserialize_with = "present_whole")]
    #[schema(value_type = u32, minimum = 1, maximum = 64)]
    pub buckets: Option<u32>,
}

impl NewSkuBody {
    /// `buckets`, checked (1..=[`BUCKETS_MAX`], default 1).
    ///
    /// # Errors
    /// `400` when out of range.
    pub fn buckets(&self) -> Result<u32, ApiError> {
        match self.buckets {
            None => Ok(1),
            Some(n) if (1..=BUCKETS_MAX).contains(&n) => Ok(n),
            Some(_) => Err(ApiError::invalid(format!(
                "buckets must be 1 to {BUCKETS_MAX}"
            ))),
        }
    }

    /// The sale window the body asks for (checked by the domain).
    ///
    /// # Errors
    /// `400` for a time that is not RFC 3339 UTC.
    pub fn sale(&self) -> Result<SaleWindow, ApiError> {
        Ok(SaleWindow {
            starts_at_ms: parse_optional_time("sale_starts_at", self.sale_starts_at.as_deref())?,
            ends_at_ms: parse_optional_time("sale_ends_at", self.sale_ends_at.as_deref())?,
        })
    }
}

/// Distinguishes an absent field (`None`) from an explicit `null`
/// (`Some(None)`), for `PATCH`.
fn double_option<'de, D: Deserializer<'de>, T: Deserialize<'de>>(
    d: D,
) -> Result<Option<Option<T>>, D::Error> {
    Option::<T>::deserialize(d).map(Some)
}

/// `PATCH /v1/skus/{sku_id}`: at least one field.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(min_properties = 1)]
pub struct PatchSkuBody {
    /// New name (no control characters).
    #[serde(default, deserialize_with = "present")]
    #[schema(value_type = String, min_length = 1, max_length = 200, pattern = "^[^\\x00-\\x1f\\x7f-\\x9f]{1,200}$")]
    pub name: Option<String>,
    /// New price.
    #[serde(default, deserialize_with = "present_whole")]
    #[schema(value_type = u64, minimum = 0, maximum = 1_000_000_000_000_u64)]
    pub price_cents: Option<u64>,
    /// New limit; `null` makes it unlimited.
    #[serde(default, deserialize_with = "double_option_whole")]
    #[schema(value_type = Option<u32>, minimum = 1, maximum = 10_000)]
    pub per_user_limit: Option<Option<u32>>,
    /// New sale start; `null` clears it. The window must stay with its end
    /// after its start.
    #[serde(default, deserialize_with = "double_option")]
    #[schema(value_type = Option<String>, pattern = "^(?:(?:19[7-9][0-9]|[2-9][0-9]{3})-(?:0[13578]|1[02])-(?:0[1-9]|[12][0-9]|3[01])|(?:19[7-9][0-9]|[2-9][0-9]{3})-(?:0[469]|11)-(?:0[1-9]|[12][0-9]|30)|(?:19[7-9][0-9]|[2-9][0-9]{3})-02-(?:0[1-9]|1[0-9]|2[0-8])|(?:19(?:7[26]|8[048]|9[26])|[2-9][0-9](?:0[48]|[2468][048]|[13579][26])|(?:[2468][048]|[3579][26])00)-02-29)T(?:[01][0-9]|2[0-3]):[0-5][0-9]:(?:[0-5][0-9]|60)(?:\\.[0-9]*)?(?:Z|\\+00:00)$")]
    pub sale_starts_at: Option<Option<String>>,
    /// New sale end; `null` clears it.
    #[serde(default, deserialize_with = "double_option")]
    #[schema(value_type = Option<String>, pattern = "^(?:(?:19[7-9][0-9]|[2-9][0-9]{3})-(?:0[13578]|1[02])-(?:0[1-9]|[12][0-9]|3[01])|(?:19[7-9][0-9]|[2-9][0-9]{3})-(?:0[469]|11)-(?:0[1-9]|[12][0-9]|30)|(?:19[7-9][0-9]|[2-9][0-9]{3})-02-(?:0[1-9]|1[0-9]|2[0-8])|(?:19(?:7[26]|8[048]|9[26])|[2-9][0-9](?:0[48]|[2468][048]|[13579][26])|(?:[2468][048]|[3579][26])00)-02-29)T(?:[01][0-9]|2[0-3]):[0-5][0-9]:(?:[0-5][0-9]|60)(?:\\.[0-9]*)?(?:Z|\\+00:00)$")]
    pub sale_ends_at: Option<Option<String>>,
}

impl PatchSkuBody {
    /// The change to the sale window the body asks for.
    ///
    /// # Errors
    /// `400` for a time that is not RFC 3339 UTC.
    pub fn sale(&self) -> Result<SalePatch, ApiError> {
        let field = |name: &str, value: &Option<Option<String>>| {
            value
                .as_ref()
                .map(|set| parse_optional_time(name, set.as_deref()))
                .transpose()
        };
        Ok(SalePatch {
            starts_at_ms: field("sale_starts_at", &self.sale_starts_at)?,
            ends_at_ms: field("sale_ends_at", &self.sale_ends_at)?,
        })
    }
}

/// `POST /v1/skus/{sku_id}/restock`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RestockBody {
    /// Units added.
    #[serde(deserialize_with = "whole")]
    #[schema(minimum = 1, maximum = 1_000_000_000)]
    pub qty: u64,
}

/// `POST /v1/promotions`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PromotionBody {
    /// The code.
    #[schema(value_type = String, pattern = "^[A-Za-z0-9_.-]{1,64}$", min_length = 1, max_length = 64)]
    pub code: PromoCode,
    /// Smallest subtotal it applies to.
    #[serde(deserialize_with = "whole")]
    #[schema(minimum = 0, maximum = 1_000_000_000_000_000_000_u64)]
    pub threshold_cents: u64,
    /// What it takes off.
    #[serde(deserialize_with = "whole")]
    #[schema(minimum = 1, maximum = 1_000_000_000_000_000_000_u64)]
    pub off_cents: u64,
}

/// One `{sku_id, qty}` line of a request.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct LineBody {
    /// The SKU.
    #[schema(value_type = String, pattern = "^[A-Za-z0-9_.-]{1,64}$", min_length = 1, max_length = 64)]
    pub sku_id: SkuId,
    /// Units (lines naming the same SKU are merged, to at most 10000).
    #[serde(deserialize_with = "whole")]
    #[schema(minimum = 1, maximum = 10_000)]
    pub qty: u32,
}

impl From<LineBody> for SkuQty {
    fn from(line: LineBody) -> SkuQty {
        SkuQty {
            sku: line.sku_id,
            qty: line.qty,
        }
    }
}

/// `POST /v1/orders`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PlaceOrderBody {
    /// The lines.
    #[schema(min_items = 1, max_items = 100)]
    pub items: Vec<LineBody>,
    /// A promotion code.
    #[serde(default)]
    #[schema(value_type = Option<String>, pattern = "^[A-Za-z0-9_.-]{1,64}$", min_length = 1, max_length = 64)]
    pub promo_code: Option<PromoCode>,
}

/// `POST /v1/cart/checkout` (the body may be absent).
#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CheckoutBody {
    /// A promotion code.
    #[serde(default)]
    #[schema(value_type = Option<String>, pattern = "^[A-Za-z0-9_.-]{1,64}$", min_length = 1, max_length = 64)]
    pub promo_code: Option<PromoCode>,
}

/// `POST /v1/orders/{order_id}/pay`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PayBody {
    /// The provider's reference.
    #[schema(value_type = String, pattern = "^[A-Za-z0-9_.-]{1,64}$", min_length = 1, max_length = 64)]
    pub payment_ref: PaymentRef,
    /// What was paid (the order's `total_cents`, else `409 payment_mismatch`).
    #[serde(deserialize_with = "whole")]
    #[schema(minimum = 0, maximum = 18_446_744_073_709_551_615_u64)]
    pub amount_cents: u64,
}

/// `POST /v1/orders/{order_id}/refund`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RefundBody {
    /// What to refund.
    #[schema(min_items = 1, max_items = 100)]
    pub lines: Vec<LineBody>,
    /// After shipment: whether the units come back to stock.
    #[serde(default)]
    pub restock: bool,
}

/// `PUT /v1/cart/items/{sku_id}`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CartItemBody {
    /// Units (0 removes the line).
    #[serde(deserialize_with = "whole")]
    #[schema(minimum = 0, maximum = 10_000)]
    pub qty: u32,
}

/// `GET /v1/orders` query.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListQuery {
    /// How many, newest first.
    #[serde(default)]
    pub limit: Option<String>,
    /// Only this user's (admins).
    #[serde(default)]
    pub user_id: Option<String>,
}

/// A SKU (contract: "SKU").
#[derive(Debug, Serialize, ToSchema)]
#[schema(as = Sku)]
pub struct SkuJson<'a> {
    sku_id: &'a str,
    name: &'a str,
    price_cents: u64,
    per_user_limit: Option<u32>,
    sale_starts_at: Option<String>,
    sale_ends_at: Option<String>,
    on_hand: u64,
    available: u64,
    reserved: u64,
    allocated: u64,
    shipped: u64,
}

impl<'a> From<&'a SkuView> for SkuJson<'a> {
    fn from(v: &'a SkuView) -> SkuJson<'a> {
        SkuJson {
            sku_id: v.sku.as_str(),
            name: &v.name,
            price_cents: v.price_cents,
            per_user_limit: v.per_user_limit,
            sale_starts_at: v.sale.starts_at_ms.map(rfc3339),
            sale_ends_at: v.sale.ends_at_ms.map(rfc3339),
            on_hand: v.levels.on_hand,
            available: v.levels.available,
            reserved: v.levels.reserved,
            allocated: v.levels.allocated,
            shipped: v.levels.shipped,
        }
    }
}

/// One page of SKUs: `{"skus": [...], "next": sku_id or null}`.
#[derive(Debug, Serialize, ToSchema)]
#[schema(as = SkuPage)]
pub struct SkuListJson<'a> {
    skus: Vec<SkuJson<'a>>,
    next: Option<&'a str>,
}

impl<'a> SkuListJson<'a> {
    /// A page, and the id to pass as `after` for the next one (`None` on
    /// the last page).
    pub fn new(views: &'a [SkuView], next: Option<&'a SkuId>) -> SkuListJson<'a> {
        SkuListJson {
            skus: views.iter().map(SkuJson::from).collect(),
            next: next.map(SkuId::as_str),
        }
    }
}

/// `GET /v1/skus` query.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SkuListQuery {
    /// Page size.
    #[serde(default)]
    pub limit: Option<String>,
    /// The last id of the previous page (exclusive).
    #[serde(default)]
    pub after: Option<String>,
}

/// One line of an order.
#[derive(Debug, Serialize, ToSchema)]
#[schema(as = OrderLine)]
pub struct LineJson<'a> {
    sku_id: &'a str,
    name: &'a str,
    qty: u32,
    unit_price_cents: u64,
    discount_cents: u64,
    refunded_qty: u32,
}

/// One entry of an order's history.
#[derive(Debug, Serialize, ToSchema)]
#[schema(as = StatusChange)]
pub struct HistoryJson {
    #[schema(value_type = String)]
    status: OrderStatus,
    at: String,
}

/// An order (contract: "Order").
#[derive(Debug, Serialize, ToSchema)]
#[schema(as = Order)]
pub struct OrderJson<'a> {
    order_id: String,
    user_id: &'a str,
    #[schema(value_type = String)]
    status: OrderStatus,
    lines: Vec<LineJson<'a>>,
    subtotal_cents: u64,
    discount_cents: u64,
    total_cents: u64,
    paid_cents: u64,
    refunded_cents: u64,
    promo_code: Option<&'a str>,
    payment_ref: Option<&'a str>,
    created_at: String,
    expires_at: String,
    history: Vec<HistoryJson>,
}

impl<'a> From<&'a Order> for OrderJson<'a> {
    fn from(o: &'a Order) -> OrderJson<'a> {
        OrderJson {
            order_id: o.id.to_string(),
            user_id: o.user.as_str(),
            status: o.status,
            lines: o
                .lines
                .iter()
                .map(|l| LineJson {
                    sku_id: l.sku.as_str(),
                    name: &l.name,
                    qty: l.qty,
                    unit_price_cents: l.unit_price_cents,
                    discount_cents: l.discount_cents,
                    refunded_qty: l.refunded_qty,
                })
                .collect(),
            subtotal_cents: o.subtotal_cents,
            discount_cents: o.discount_cents,
            total_cents: o.total_cents,
            paid_cents: o.paid_cents,
            refunded_cents: o.refunded_cents,
            promo_code: o.promo_code.as_ref().map(PromoCode::as_str),
            payment_ref: o.payment_ref.as_ref().map(PaymentRef::as_str),
            created_at: rfc3339(o.created_at_ms),
            expires_at: rfc3339(o.expires_at_ms),
            history: o
                .history
                .iter()
                .map(|h| HistoryJson {
                    status: h.status,
                    at: rfc3339(h.at_ms),
                })
                .collect(),
        }
    }
}

/// `{"orders": [...]}`.
#[derive(Debug, Serialize, ToSchema)]
#[schema(as = OrderList)]
pub struct OrderListJson<'a> {
    orders: Vec<OrderJson<'a>>,
}

impl<'a> OrderListJson<'a> {
    /// The list.
    pub fn new(orders: &'a [Order]) -> OrderListJson<'a> {
        OrderListJson {
            orders: orders.iter().map(OrderJson::from).collect(),
        }
    }
}

/// One line of a cart.
#[derive(Debug, Serialize, ToSchema)]
#[schema(as = CartLine)]
pub struct CartLineJson<'a> {
    sku_id: &'a str,
    qty: u32,
}

/// A cart: `{"items": [...]}`.
#[derive(Debug, Serialize, ToSchema)]
#[schema(as = Cart)]
pub struct CartJson<'a> {
    items: Vec<CartLineJson<'a>>,
}

impl<'a> From<&'a Cart> for CartJson<'a> {
    fn from(cart: &'a Cart) -> CartJson<'a> {
        CartJson {
            items: cart
                .items()
                .iter()
                .map(|l| CartLineJson {
                    sku_id: l.sku.as_str(),
                    qty: l.qty,
                })
                .collect(),
        }
    }
}

/// A promotion.
#[derive(Debug, Serialize, ToSchema)]
#[schema(as = Promotion)]
pub struct PromotionJson<'a> {
    code: &'a str,
    threshold_cents: u64,
    off_cents: u64,
}

impl<'a> From<&'a Promotion> for PromotionJson<'a> {
    fn from(p: &'a Promotion) -> PromotionJson<'a> {
        PromotionJson {
            code: p.code.as_str(),
            threshold_cents: p.threshold_cents,
            off_cents: p.off_cents,
        }
    }
}

/// `GET /v1/cluster` (contract: "Endpoints"). A single node answers
/// `{"node_id": null, "partitions": 1}`; a cluster's node adds `nodes`
/// and `owners`.
#[derive(Debug, Clone, Serialize, ToSchema)]
#[schema(as = Cluster)]
pub struct ClusterJson {
    /// This node's id; `null` on a single node.
    node_id: Option<String>,
    /// How many partitions the state is split into (1 on a single node).
    #[schema(minimum = 1)]
    partitions: u32,
    /// Cluster mode: every node, with its URL and how many partitions it owns.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(required = false)]
    nodes: Option<Vec<ClusterNodeJson>>,
    /// Cluster mode: each partition's owner and the age of its lease.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(required = false)]
    owners: Option<Vec<PartitionOwnerJson>>,
}

impl ClusterJson {
    /// What a single node answers.
    pub fn single_node() -> ClusterJson {
        ClusterJson {
            node_id: None,
            partitions: 1,
            nodes: None,
            owners: None,
        }
    }
}

impl From<&crate::cluster::node::ClusterView> for ClusterJson {
    fn from(view: &crate::cluster::node::ClusterView) -> ClusterJson {
        ClusterJson {
            node_id: Some(view.node_id.clone()),
            partitions: view.partitions,
            nodes: Some(
                view.nodes
                    .iter()
                    .map(|(info, owned)| ClusterNodeJson {
                        node_id: info.node_id.clone(),
                        url: info.url.clone(),
                        partitions_owned: *owned,
                    })
                    .collect(),
            ),
            owners: Some(
                view.owners
                    .iter()
                    .map(|owner| PartitionOwnerJson {
                        partition: owner.partition,
                        node_id: owner.node_id.clone(),
                        lease_age_ms: owner.lease_age_ms,
                    })
                    .collect(),
            ),
        }
    }
}

/// One node of a cluster.
#[derive(Debug, Clone, Serialize, ToSchema)]
#[schema(as = ClusterNode)]
pub struct ClusterNodeJson {
    node_id: String,
    url: String,
    partitions_owned: u32,
}

/// One partition's owner.
#[derive(Debug, Clone, Serialize, ToSchema)]
#[schema(as = PartitionOwner)]
pub struct PartitionOwnerJson {
    partition: u32,
    node_id: Option<String>,
    lease_age_ms: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_are_rfc3339_utc() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(rfc3339(1_767_225_600_123), "2026-01-01T00:00:00.123Z");
    }

    #[test]
    fn patch_tells_absent_from_null() {
        let absent: PatchSkuBody = serde_json::from_str("{}").expect("parses");
        assert_eq!(absent.per_user_limit, None);
        let null: PatchSkuBody =
            serde_json::from_str(r#"{"per_user_limit": null}"#).expect("parses");
        assert_eq!(null.per_user_limit, Some(None));
        let set: PatchSkuBody = serde_json::from_str(r#"{"per_user_limit": 3}"#).expect("parses");
        assert_eq!(set.per_user_limit, Some(Some(3)));
    }

    #[test]
    fn fields_the_document_does_not_make_nullable_refuse_null() {
        let null_name = serde_json::from_str::<PatchSkuBody>(r#"{"name": null}"#);
        assert!(null_name.is_err());
        let null_price = serde_json::from_str::<PatchSkuBody>(r#"{"price_cents": null}"#);
        assert!(null_price.is_err());
        let sku = r#"{"sku_id":"a","name":"A","price_cents":1,"stock":1"#;
        let null_buckets = format!(r#"{sku},"buckets":null}}"#);
        assert!(serde_json::from_str::<NewSkuBody>(&null_buckets).is_err());
        let absent: NewSkuBody = serde_json::from_str(&format!("{sku}}}")).expect("parses");
        assert_eq!(absent.buckets().ok(), Some(1));
        for (buckets, ok) in [(0, false), (1, true), (64, true), (65, false)] {
            let body: NewSkuBody =
                serde_json::from_str(&format!(r#"{sku},"buckets":{buckets}}}"#)).expect("parses");
            assert_eq!(body.buckets().is_ok(), ok, "{buckets}");
        }
    }

    #[test]
    fn bodies_refuse_unknown_fields_and_bad_ids() {
        assert!(serde_json::from_str::<RestockBody>(r#"{"qty": 1, "qtty": 2}"#).is_err());
        assert!(
            serde_json::from_str::<PlaceOrderBody>(r#"{"items": [{"sku_id": "a b", "qty": 1}]}"#)
                .is_err()
        );
        assert!(serde_json::from_str::<RestockBody>(r#"{"qty": -1}"#).is_err());
        assert!(serde_json::from_str::<RestockBody>(r#"{"qty": 1.5}"#).is_err());
        // A whole float is an integer (JSON Schema 2020-12), up to 2^53.
        let whole: RestockBody = serde_json::from_str(r#"{"qty": 1460.0}"#).expect("whole");
        assert_eq!(whole.qty, 1460);
        assert!(serde_json::from_str::<RestockBody>(r#"{"qty": 1e300}"#).is_err());
        assert!(serde_json::from_str::<RestockBody>(r#"{"qty": -1.0}"#).is_err());
        assert!(serde_json::from_str::<CartItemBody>(r#"{"qty": 4294967296}"#).is_err());
        let limit: NewSkuBody = serde_json::from_str(
            r#"{"sku_id":"a","name":"A","price_cents":1.0,"stock":2.0,"per_user_limit":3.0}"#,
        )
        .expect("whole");
        assert_eq!(
            (limit.price_cents, limit.stock, limit.per_user_limit),
            (1, 2, Some(3))
        );
    }
}
