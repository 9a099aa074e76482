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

/// `POST /v1/skus`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewSkuBody {
    /// The id.
    #[schema(value_type = String)]
    pub sku_id: SkuId,
    /// The name.
    pub name: String,
    /// The unit price.
    pub price_cents: u64,
    /// Initial stock.
    pub stock: u64,
    /// Most units per user; absent or `null` for none.
    #[serde(default)]
    pub per_user_limit: Option<u32>,
    /// When the sale opens (RFC 3339 UTC); absent or `null` for always.
    #[serde(default)]
    pub sale_starts_at: Option<String>,
    /// When the sale closes (RFC 3339 UTC); absent or `null` for never.
    #[serde(default)]
    pub sale_ends_at: Option<String>,
}

impl NewSkuBody {
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

/// `PATCH /v1/skus/{sku_id}`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PatchSkuBody {
    /// New name.
    #[serde(default)]
    pub name: Option<String>,
    /// New price.
    #[serde(default)]
    pub price_cents: Option<u64>,
    /// New limit; `null` makes it unlimited.
    #[serde(default, deserialize_with = "double_option")]
    #[schema(value_type = Option<u32>)]
    pub per_user_limit: Option<Option<u32>>,
    /// New sale start; `null` clears it.
    #[serde(default, deserialize_with = "double_option")]
    #[schema(value_type = Option<String>, format = DateTime)]
    pub sale_starts_at: Option<Option<String>>,
    /// New sale end; `null` clears it.
    #[serde(default, deserialize_with = "double_option")]
    #[schema(value_type = Option<String>, format = DateTime)]
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
    pub qty: u64,
}

/// `POST /v1/promotions`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PromotionBody {
    /// The code.
    #[schema(value_type = String)]
    pub code: PromoCode,
    /// Smallest subtotal it applies to.
    pub threshold_cents: u64,
    /// What it takes off.
    pub off_cents: u64,
}

/// One `{sku_id, qty}` line of a request.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct LineBody {
    /// The SKU.
    #[schema(value_type = String)]
    pub sku_id: SkuId,
    /// Units.
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
    pub items: Vec<LineBody>,
    /// A promotion code.
    #[serde(default)]
    #[schema(value_type = Option<String>)]
    pub promo_code: Option<PromoCode>,
}

/// `POST /v1/cart/checkout` (the body may be absent).
#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CheckoutBody {
    /// A promotion code.
    #[serde(default)]
    #[schema(value_type = Option<String>)]
    pub promo_code: Option<PromoCode>,
}

/// `POST /v1/orders/{order_id}/pay`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PayBody {
    /// The provider's reference.
    #[schema(value_type = String)]
    pub payment_ref: PaymentRef,
    /// What was paid.
    pub amount_cents: u64,
}

/// `POST /v1/orders/{order_id}/refund`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RefundBody {
    /// What to refund.
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
    fn bodies_refuse_unknown_fields_and_bad_ids() {
        assert!(serde_json::from_str::<RestockBody>(r#"{"qty": 1, "qtty": 2}"#).is_err());
        assert!(
            serde_json::from_str::<PlaceOrderBody>(r#"{"items": [{"sku_id": "a b", "qty": 1}]}"#)
                .is_err()
        );
        assert!(serde_json::from_str::<RestockBody>(r#"{"qty": -1}"#).is_err());
        assert!(serde_json::from_str::<RestockBody>(r#"{"qty": 1.5}"#).is_err());
    }
}
