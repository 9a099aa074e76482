//! `Event`: every state change flashcore can make, as a value.
//!
//! Events are what the journal stores, so this enum is a persisted format:
//! variants and fields are only ever appended, never reordered or removed
//! (bincode encodes a variant by its index), and nothing here uses `usize`,
//! `flatten` or `untagged`. A change to the shape of an existing variant needs
//! a new `FORMAT_VERSION` in the codec.
//!
//! Events are self-contained: an order event carries the SKU moves it makes
//! (`lines`), so a SKU applies it without looking the order up, and replay
//! cross-checks those moves against the order it finds.

use serde::{Deserialize, Serialize};

use crate::domain::idem::Refusal;
use crate::domain::order::{Order, OrderLine};
use crate::domain::promo::Promotion;
use crate::domain::sale::SaleWindow;
use crate::domain::{IdempotencyKey, OrderId, PaymentRef, SkuId, UserId};

/// An `Idempotency-Key` attached to the change it made, so the key's record
/// and the change are one journal record: a crash can keep both or neither.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IdemStamp {
    /// The key's scope: the caller's `sub`.
    pub user: UserId,
    /// The key.
    pub key: IdempotencyKey,
    /// A hash of the request (route and canonical body): the same key with a
    /// different fingerprint is an `idempotency_conflict`.
    pub fingerprint: [u8; 16],
}

/// Units of one SKU moved by an order event.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct SkuQty {
    /// The SKU.
    pub sku: SkuId,
    /// How many units.
    pub qty: u32,
}

/// One line of a refund.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct RefundedLine {
    /// Index of the line in the order.
    pub line: u32,
    /// The line's SKU.
    pub sku: SkuId,
    /// Units refunded now.
    pub qty: u32,
    /// Money returned for them.
    pub cents: u64,
}

/// What a refund does to stock.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum RefundStock {
    /// Not shipped yet: `allocated -> available`.
    Unallocate,
    /// Shipped and returned to the warehouse: `on_hand` and `available` rise.
    Restock,
    /// Shipped and not returned: stock is unchanged.
    Keep,
}

/// Why a reserved order let go of its units.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ReleaseReason {
    /// Cancelled by its owner or an admin.
    Cancelled,
    /// Unpaid past its deadline.
    Expired,
}

/// Every state change. See the module doc for the rules of this format.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Event {
    /// A SKU joined the catalog.
    SkuCreated {
        /// Its id.
        sku: SkuId,
        /// Its name.
        name: String,
        /// Its unit price.
        price_cents: u64,
        /// Most units one user may hold, or none.
        per_user_limit: Option<u32>,
        /// Its initial stock.
        stock: u64,
        /// When.
        at_ms: u64,
    },
    /// A SKU's name, price or limit changed (absent fields stay).
    SkuUpdated {
        /// The SKU.
        sku: SkuId,
        /// New name.
        name: Option<String>,
        /// New price.
        price_cents: Option<u64>,
        /// New limit (`Some(None)` makes it unlimited).
        per_user_limit: Option<Option<u32>>,
        /// When.
        at_ms: u64,
    },
    /// Units arrived.
    Restocked {
        /// The SKU.
        sku: SkuId,
        /// How many.
        qty: u64,
        /// The request's idempotency key, if any.
        idem: Option<IdemStamp>,
        /// When.
        at_ms: u64,
    },
    /// Units of a SKU were held for an order being placed
    /// (`available -> reserved`).
    StockReserved {
        /// The SKU.
        sku: SkuId,
        /// The reservation's id, from the order id sequence.
        reservation: OrderId,
        /// Who holds them.
        user: UserId,
        /// How many.
        qty: u32,
        /// When.
        at_ms: u64,
    },
    /// A reservation that never became an order was let go
    /// (`reserved -> available`).
    ReservationReleased {
        /// The SKU.
        sku: SkuId,
        /// The reservation.
        reservation: OrderId,
        /// Who held them.
        user: UserId,
        /// How many.
        qty: u32,
        /// When.
        at_ms: u64,
    },
    /// A promotion was created.
    PromotionCreated {
        /// The promotion.
        promo: Promotion,
        /// When.
        at_ms: u64,
    },
    /// An order was placed from reservations it now owns.
    OrderPlaced {
        /// The new order, as placed (`reserved`, one history entry).
        order: Box<Order>,
        /// The reservation behind each line, in line order.
        reservations: Vec<OrderId>,
        /// Placed by a cart checkout, which empties the cart.
        from_cart: bool,
        /// The request's idempotency key, if any.
        idem: Option<IdemStamp>,
    },
    /// A payment was recorded (`reserved -> allocated` for each line).
    OrderPaid {
        /// The order.
        order: OrderId,
        /// The provider's reference.
        payment_ref: PaymentRef,
        /// What was paid: the order's total.
        amount_cents: u64,
        /// The units moved.
        lines: Vec<SkuQty>,
        /// The request's idempotency key, if any.
        idem: Option<IdemStamp>,
        /// When.
        at_ms: u64,
    },
    /// A reserved order was cancelled or expired (`reserved -> available`).
    OrderReleased {
        /// The order.
        order: OrderId,
        /// Its owner, whose per-user counts fall.
        user: UserId,
        /// Cancelled or expired.
        reason: ReleaseReason,
        /// The units let go.
        lines: Vec<SkuQty>,
        /// When.
        at_ms: u64,
    },
    /// A paid order left the warehouse (its unrefunded units).
    OrderShipped {
        /// The order.
        order: OrderId,
        /// The units shipped.
        lines: Vec<SkuQty>,
        /// When.
        at_ms: u64,
    },
    /// A shipped order arrived.
    OrderDelivered {
        /// The order.
        order: OrderId,
        /// When.
        at_ms: u64,
    },
    /// Units of a paid, shipped or delivered order were refunded.
    OrderRefunded {
        /// The order.
        order: OrderId,
        /// Its owner, whose per-user counts fall.
        user: UserId,
        /// What was refunded, line by line.
        lines: Vec<RefundedLine>,
        /// What happens to the units.
        stock: RefundStock,
        /// The request's idempotency key, if any.
        idem: Option<IdemStamp>,
        /// When.
        at_ms: u64,
    },
    /// A cart line was set (`qty` 0 removes it).
    CartItemSet {
        /// The cart's owner.
        user: UserId,
        /// The SKU.
        sku: SkuId,
        /// The new quantity.
        qty: u32,
        /// When.
        at_ms: u64,
    },
    /// A cart was emptied.
    CartCleared {
        /// The cart's owner.
        user: UserId,
        /// When.
        at_ms: u64,
    },
    /// A keyed request was refused by the business rules, and v1 kept the
    /// answer under the key. Written by v1 only: v2 records only changes
    /// under a key (see `idem.rs`), and replay ignores this record. Kept so
    /// old journals decode (variants are append-only).
    IdempotentRefusal {
        /// The key.
        idem: IdemStamp,
        /// The answer.
        refusal: Refusal,
        /// When.
        at_ms: u64,
    },
    /// An order placed in one step at the SKU actor of its only line: the
    /// SKU held the units for it (`available -> reserved`) and the order owns
    /// them, with no separate reservation before it. A single-line order is
    /// the flash-sale case, and this halves what it journals.
    OrderPlacedAtSku {
        /// The new order, as placed (`reserved`, one history entry, one line).
        order: Box<Order>,
        /// The request's idempotency key, if any.
        idem: Option<IdemStamp>,
    },
    /// A SKU joined the catalog with a sale window (format version 2; a SKU
    /// without one is still a `SkuCreated`).
    SkuCreatedWithSale {
        /// Its id.
        sku: SkuId,
        /// Its name.
        name: String,
        /// Its unit price.
        price_cents: u64,
        /// Most units one user may hold, or none.
        per_user_limit: Option<u32>,
        /// Its initial stock.
        stock: u64,
        /// When it sells.
        sale: SaleWindow,
        /// When.
        at_ms: u64,
    },
    /// A SKU's settings changed, its sale window among them (format version
    /// 2; a change that leaves the window alone is still a `SkuUpdated`).
    SkuUpdatedWithSale {
        /// The SKU.
        sku: SkuId,
        /// New name.
        name: Option<String>,
        /// New price.
        price_cents: Option<u64>,
        /// New limit (`Some(None)` makes it unlimited).
        per_user_limit: Option<Option<u32>>,
        /// The whole window after the change.
        sale: SaleWindow,
        /// When.
        at_ms: u64,
    },
    /// Finished orders left memory for the archive. The archive already
    /// holds each of them, durably, when this is journaled; applying it only
    /// drops them from the order book. Every id is of an order in a final
    /// state (`delivered`, `cancelled`, `expired`, `refunded`).
    OrdersArchived {
        /// The orders, in increasing id order.
        ids: Vec<OrderId>,
        /// When.
        at_ms: u64,
    },
    /// An archived order came back into memory, as the archive held it,
    /// because a change was asked of it (a refund of a delivered order).
    /// Carrying the order makes replay independent of the archive.
    OrderRestored {
        /// The order, exactly as archived.
        order: Box<Order>,
        /// When.
        at_ms: u64,
    },
    /// Order ids up to `through` may be handed out (`engine/ids.rs`). An id
    /// is answered only once the reservation covering it is durable, and a
    /// start hands out ids only above every reservation in the journal, so
    /// an id that was ever answered never names another order, whatever a
    /// crash took back (relaxed mode may lose answered orders, never reuse
    /// their ids).
    OrderIdsReserved {
        /// The highest id reserved.
        through: u64,
        /// When.
        at_ms: u64,
    },
    /// Cluster mode: a node took this partition over. Its first append,
    /// made with compare-and-set on the journal's last record as the node
    /// replayed it, so every later append of the previous owner fails
    /// (`cluster/partition.rs`). Changes no state.
    OwnerChanged {
        /// The lease's term (it grows with every acquisition).
        term: u64,
        /// When.
        at_ms: u64,
    },
}

impl Event {
    /// The SKUs whose counters or settings this event changes. Every SKU
    /// actor named here must apply the event; no other needs to.
    pub fn touched_skus(&self) -> TouchedSkus<'_> {
        match self {
            Event::SkuCreated { sku, .. }
            | Event::SkuCreatedWithSale { sku, .. }
            | Event::SkuUpdated { sku, .. }
            | Event::SkuUpdatedWithSale { sku, .. }
            | Event::Restocked { sku, .. }
            | Event::StockReserved { sku, .. }
            | Event::ReservationReleased { sku, .. } => TouchedSkus::One(Some(*sku)),
            Event::OrderPaid { lines, .. }
            | Event::OrderReleased { lines, .. }
            | Event::OrderShipped { lines, .. } => TouchedSkus::Moves(lines.iter()),
            Event::OrderRefunded { lines, .. } => TouchedSkus::Refunds(lines.iter()),
            Event::OrderPlacedAtSku { order, .. } => TouchedSkus::Lines(order.lines.iter()),
            Event::PromotionCreated { .. }
            | Event::OrderPlaced { .. }
            | Event::OrderDelivered { .. }
            | Event::CartItemSet { .. }
            | Event::CartCleared { .. }
            | Event::IdempotentRefusal { .. }
            | Event::OrdersArchived { .. }
            | Event::OrderRestored { .. }
            | Event::OrderIdsReserved { .. }
            | Event::OwnerChanged { .. } => TouchedSkus::One(None),
        }
    }

    /// The order this event changes, if it changes one that exists already.
    pub fn order_id(&self) -> Option<OrderId> {
        match self {
            Event::OrderPaid { order, .. }
            | Event::OrderReleased { order, .. }
            | Event::OrderShipped { order, .. }
            | Event::OrderDelivered { order, .. }
            | Event::OrderRefunded { order, .. } => Some(*order),
            _ => None,
        }
    }

    /// The idempotency key this change carries, if any.
    pub fn idem(&self) -> Option<&IdemStamp> {
        match self {
            Event::Restocked { idem, .. }
            | Event::OrderPlaced { idem, .. }
            | Event::OrderPlacedAtSku { idem, .. }
            | Event::OrderPaid { idem, .. }
            | Event::OrderRefunded { idem, .. } => idem.as_ref(),
            _ => None,
        }
    }

    /// When the change happened, in unix milliseconds.
    pub fn at_ms(&self) -> u64 {
        match self {
            Event::OrderPlaced { order, .. } | Event::OrderPlacedAtSku { order, .. } => {
                order.created_at_ms
            }
            Event::SkuCreated { at_ms, .. }
            | Event::SkuCreatedWithSale { at_ms, .. }
            | Event::SkuUpdated { at_ms, .. }
            | Event::SkuUpdatedWithSale { at_ms, .. }
            | Event::Restocked { at_ms, .. }
            | Event::StockReserved { at_ms, .. }
            | Event::ReservationReleased { at_ms, .. }
            | Event::PromotionCreated { at_ms, .. }
            | Event::OrderPaid { at_ms, .. }
            | Event::OrderReleased { at_ms, .. }
            | Event::OrderShipped { at_ms, .. }
            | Event::OrderDelivered { at_ms, .. }
            | Event::OrderRefunded { at_ms, .. }
            | Event::CartItemSet { at_ms, .. }
            | Event::CartCleared { at_ms, .. }
            | Event::IdempotentRefusal { at_ms, .. }
            | Event::OrdersArchived { at_ms, .. }
            | Event::OrderRestored { at_ms, .. }
            | Event::OrderIdsReserved { at_ms, .. }
            | Event::OwnerChanged { at_ms, .. } => *at_ms,
        }
    }
}

/// The SKUs an event touches (see [`Event::touched_skus`]), without
/// allocating: this runs for every event, live and on replay.
#[derive(Debug, Clone)]
pub enum TouchedSkus<'a> {
    /// At most one SKU.
    One(Option<SkuId>),
    /// The SKUs of order moves.
    Moves(std::slice::Iter<'a, SkuQty>),
    /// The SKUs of refund lines.
    Refunds(std::slice::Iter<'a, RefundedLine>),
    /// The SKUs of an order's lines.
    Lines(std::slice::Iter<'a, OrderLine>),
}

impl Iterator for TouchedSkus<'_> {
    type Item = SkuId;

    fn next(&mut self) -> Option<SkuId> {
        match self {
            TouchedSkus::One(sku) => sku.take(),
            TouchedSkus::Moves(lines) => lines.next().map(|l| l.sku),
            TouchedSkus::Refunds(lines) => lines.next().map(|l| l.sku),
            TouchedSkus::Lines(lines) => lines.next().map(|l| l.sku),
        }
    }
}
