//! `OrderBook`: the orders and carts of a set of users.
//!
//! Live, each order shard owns the book of the users hashed to it; on replay
//! one book holds everyone. The same [`OrderBook::apply`] serves both. Orders
//! are kept by id (ids grow with time, so id order is age order) with a
//! per-user index for listings.
//!
//! Every map is persistent (`imbl`: a B-tree for the orders, hash tries for
//! the index and the carts): a copy of the book shares every node with the
//! live one, so a snapshot's copy, taken inside the shard's handler, costs
//! a few pointer copies however many orders the shard holds; a node the
//! live book changes after a copy is copied then, alone. The maps serialise
//! as plain maps, byte for byte what the `std` maps they replaced wrote.

use std::borrow::Cow;
use std::sync::Arc;

use imbl::{HashMap, OrdMap};

use serde::{Deserialize, Serialize};

use crate::domain::cart::Cart;
use crate::domain::idem::{IdemBook, Outcome};
use crate::domain::order::Order;
use crate::domain::{DomainError, Event, OrderId, OrderStatus, UserId};

/// Which of `parts` order shards holds `user`'s orders and cart: FNV-1a of
/// the id's bytes, so the answer is the same in every build and process
/// (snapshots record per-shard progress, and recovery must find the shard
/// of an event's user again; `std`'s hasher promises no such stability).
pub fn shard_of(user: &UserId, parts: usize) -> usize {
    const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
    const FNV_PRIME: u64 = 0x0000_0100_0000_01b3;
    let hash = user.as_str().bytes().fold(FNV_OFFSET, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(FNV_PRIME)
    });
    usize::try_from(hash % (parts.max(1) as u64)).unwrap_or(0)
}

/// Orders and carts of some users.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct OrderBook {
    /// Each order shared too, so that changing one order after a copy
    /// copies that order alone (`Arc::make_mut`).
    orders: OrdMap<OrderId, Arc<Order>>,
    /// A user's order ids, ascending; shared, so a copy's list is copied
    /// only when the live one changes it.
    by_user: HashMap<UserId, Arc<Vec<OrderId>>>,
    carts: HashMap<UserId, Cart>,
}

impl OrderBook {
    /// The order with this id.
    pub fn get(&self, id: OrderId) -> Option<&Order> {
        self.orders.get(&id).map(Arc::as_ref)
    }

    /// How many orders there are.
    pub fn len(&self) -> usize {
        self.orders.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.orders.is_empty()
    }

    /// Every order, oldest first.
    pub fn orders(&self) -> impl DoubleEndedIterator<Item = &Order> {
        self.orders.values().map(Arc::as_ref)
    }

    /// A user's orders, newest first, at most `limit`.
    pub fn list_user(&self, user: &UserId, limit: usize) -> Vec<&Order> {
        self.by_user
            .get(user)
            .map(|ids| {
                ids.iter()
                    .rev()
                    .filter_map(|id| self.orders.get(id).map(Arc::as_ref))
                    .take(limit)
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Everyone's orders, newest first, at most `limit`.
    pub fn list_all(&self, limit: usize) -> Vec<&Order> {
        self.orders
            .values()
            .rev()
            .take(limit)
            .map(Arc::as_ref)
            .collect()
    }

    /// A user's cart (empty when they never had one).
    pub fn cart(&self, user: &UserId) -> Cart {
        self.carts.get(user).cloned().unwrap_or_default()
    }

    /// Joins books of disjoint users into one (the inverse of
    /// [`OrderBook::split`]): recovery loads a snapshot's per-shard books
    /// into one. A user found in two books keeps the first one's cart.
    pub fn merge(books: impl IntoIterator<Item = OrderBook>) -> OrderBook {
        let mut all = OrderBook::default();
        for book in books {
            if all.orders.is_empty() && all.carts.is_empty() {
                all = book;
                continue;
            }
            all.orders.extend(book.orders);
            for (user, ids) in book.by_user {
                let index = Arc::make_mut(all.by_user.entry(user).or_default());
                index.extend(ids.iter().copied());
                index.sort_unstable();
            }
            for (user, cart) in book.carts {
                all.carts.entry(user).or_insert(cart);
            }
        }
        all
    }

    /// Splits the book by a function of the user, into `parts` books.
    pub fn split(self, parts: usize, part_of: impl Fn(&UserId) -> usize) -> Vec<OrderBook> {
        let mut books: Vec<OrderBook> = (0..parts.max(1)).map(|_| OrderBook::default()).collect();
        let count = books.len();
        for (id, order) in self.orders {
            let book = &mut books[part_of(&order.user) % count];
            Arc::make_mut(book.by_user.entry(order.user).or_default()).push(id);
            book.orders.insert(id, order);
        }
        for (user, cart) in self.carts {
            books[part_of(&user) % count].carts.insert(user, cart);
        }
        books
    }

    /// Applies an order or cart event; other events change nothing. Records
    /// the idempotency outcome of a stamped event in `idem`. On `Err` the
    /// book is unchanged.
    ///
    /// # Errors
    /// `Inconsistent` when the event does not fit (a bug or a damaged
    /// journal).
    pub fn apply(&mut self, idem: &IdemBook, event: &Event) -> Result<(), DomainError> {
        self.apply_cow(idem, Cow::Borrowed(event))
    }

    /// [`OrderBook::apply`] for an event the caller no longer needs: a
    /// placed order moves into the book instead of being copied (replay).
    ///
    /// # Errors
    /// As [`OrderBook::apply`].
    pub fn apply_owned(&mut self, idem: &IdemBook, event: Event) -> Result<(), DomainError> {
        self.apply_cow(idem, Cow::Owned(event))
    }

    fn apply_cow(&mut self, idem: &IdemBook, event: Cow<'_, Event>) -> Result<(), DomainError> {
        match &*event {
            Event::OrderPlaced { .. } | Event::OrderPlacedAtSku { .. } => self.place(idem, event),
            Event::OrderPaid { order: id, .. }
            | Event::OrderReleased { order: id, .. }
            | Event::OrderShipped { order: id, .. }
            | Event::OrderDelivered { order: id, .. }
            | Event::OrderRefunded { order: id, .. } => {
                let order = self.orders.get_mut(id).ok_or_else(|| {
                    DomainError::inconsistent(format!("event for unknown order {id}"))
                })?;
                // The record refers to the order as the event leaves it;
                // what could make that fail (a history past `u32` entries)
                // is checked first, so on `Err` the book is unchanged.
                if event.idem().is_some() {
                    u32::try_from(order.history.len().saturating_add(1))
                        .map_err(|_| DomainError::Overflow { what: "history" })?;
                }
                Arc::make_mut(order).apply(&event)?;
                if let Some(stamp) = event.idem() {
                    idem.record(stamp, event.at_ms(), Outcome::of_order(order)?);
                }
                Ok(())
            }
            Event::CartItemSet { user, sku, qty, .. } => {
                let cart = self.carts.entry(*user).or_default();
                cart.set(*sku, *qty)?;
                if cart.is_empty() {
                    self.carts.remove(user);
                }
                Ok(())
            }
            Event::CartCleared { user, .. } => {
                self.carts.remove(user);
                Ok(())
            }
            Event::OrdersArchived { ids, .. } => self.archive(ids),
            Event::OrderRestored { order, .. } => self.restore(order),
            _ => Ok(()),
        }
    }

    /// Applies an `OrdersArchived`: the orders leave the book (the archive
    /// holds them). Checked whole before anything moves, so an `Err` leaves
    /// the book unchanged.
    fn archive(&mut self, ids: &[OrderId]) -> Result<(), DomainError> {
        for id in ids {
            match self.orders.get(id) {
                Some(order) if order.status.is_final() => {}
                Some(order) => {
                    return Err(DomainError::inconsistent(format!(
                        "order {id} archived while {}",
                        order.status
                    )));
                }
                None => {
                    return Err(DomainError::inconsistent(format!(
                        "archive of unknown order {id}"
                    )));
                }
            }
        }
        for id in ids {
            let Some(order) = self.orders.remove(id) else {
                return Err(DomainError::inconsistent(format!(
                    "order {id} archived twice in one event"
                )));
            };
            if let Some(user_ids) = self.by_user.get_mut(&order.user) {
                if let Ok(at) = user_ids.binary_search(id) {
                    Arc::make_mut(user_ids).remove(at);
                }
                if user_ids.is_empty() {
                    self.by_user.remove(&order.user);
                }
            }
        }
        Ok(())
    }

    /// Applies an `OrderRestored`: an archived order comes back, as it was.
    fn restore(&mut self, order: &Order) -> Result<(), DomainError> {
        if self.orders.contains_key(&order.id) {
            return Err(DomainError::inconsistent(format!(
                "order {} restored while in memory",
                order.id
            )));
        }
        if !order.status.is_final() {
            return Err(DomainError::inconsistent(format!(
                "order {} restored while {}: only finished orders are archived",
                order.id, order.status
            )));
        }
        let ids = self.by_user.entry(order.user).or_default();
        if let Err(at) = ids.binary_search(&order.id) {
            Arc::make_mut(ids).insert(at, order.id);
        }
        self.orders.insert(order.id, Arc::new(order.clone()));
        Ok(())
    }

    /// Applies an `OrderPlaced` or an `OrderPlacedAtSku`.
    fn place(&mut self, idem: &IdemBook, event: Cow<'_, Event>) -> Result<(), DomainError> {
        let (order, lines_expected) = match &*event {
            Event::OrderPlaced {
                order,
                reservations,
                ..
            } => (order, reservations.len()),
            // Placed in one step at the SKU of its only line.
            Event::OrderPlacedAtSku { order, .. } => (order, 1),
            _ => return Err(DomainError::inconsistent("not a placement")),
        };
        if self.orders.contains_key(&order.id) {
            return Err(DomainError::inconsistent(format!(
                "order {} placed twice",
                order.id
            )));
        }
        if order.status != OrderStatus::Reserved
            || order.history.len() != 1
            || lines_expected != order.lines.len()
            || order.paid_cents != 0
            || order.refunded_cents != 0
        {
            return Err(DomainError::inconsistent(format!(
                "order {} placed in an impossible shape",
                order.id
            )));
        }
        let (order, from_cart, stamp) = match event {
            Cow::Owned(Event::OrderPlaced {
                order,
                from_cart,
                idem,
                ..
            }) => (*order, from_cart, idem),
            Cow::Owned(Event::OrderPlacedAtSku { order, idem }) => (*order, false, idem),
            Cow::Borrowed(Event::OrderPlaced {
                order,
                from_cart,
                idem,
                ..
            }) => (Order::clone(order), *from_cart, idem.clone()),
            Cow::Borrowed(Event::OrderPlacedAtSku { order, idem }) => {
                (Order::clone(order), false, idem.clone())
            }
            _ => return Err(DomainError::inconsistent("not a placement")),
        };
        // Taken before anything changes: on `Err` the book is unchanged.
        let keyed = match stamp {
            Some(stamp) => Some((stamp, Outcome::of_order(&order)?)),
            None => None,
        };
        let ids = Arc::make_mut(self.by_user.entry(order.user).or_default());
        if ids.last().is_some_and(|last| *last > order.id) {
            // Out-of-order ids (a restored snapshot): keep the index sorted.
            ids.push(order.id);
            ids.sort_unstable();
        } else {
            ids.push(order.id);
        }
        if from_cart {
            self.carts.remove(&order.user);
        }
        if let Some((stamp, outcome)) = keyed {
            idem.record(&stamp, order.created_at_ms, outcome);
        }
        self.orders.insert(order.id, Arc::new(order));
        Ok(())
    }
}
