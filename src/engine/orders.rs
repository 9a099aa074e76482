//! The order side of the [`Engine`] handle: reservations, placements and
//! every later step of an order, listing and expiry.

#[allow(clippy::wildcard_imports)]
use super::*;

impl Engine {
    /// Holds `qty` units of `sku` for `user`: the first step of placing an
    /// order. Dropping the reservation gives the units back. A sold-out SKU
    /// answers `OutOfStock` without asking its actor.
    ///
    /// # Errors
    /// `NotFound`, `Domain(OutOfStock | LimitExceeded | Invalid)`,
    /// `Overloaded`, journal errors.
    pub async fn reserve(
        &self,
        user: UserId,
        sku: SkuId,
        qty: u32,
    ) -> Result<Reservation, EngineError> {
        validate::qty(qty)?;
        let handle = self.sku_handle(&sku)?;
        self.reserve_at(handle, user, qty).await
    }

    /// Answers `OutOfStock` when a SKU's hint says it cannot serve the
    /// units (`sold_out` is [`SkuHint::sold_out_for`]), once the state that
    /// answer saw is durable.
    async fn refuse_if_sold_out(
        &self,
        sku: SkuId,
        sold_out: Option<Seq>,
    ) -> Result<(), EngineError> {
        match sold_out {
            None => Ok(()),
            Some(seen) => {
                self.refuse(seen, DomainError::OutOfStock { sku }.into())
                    .await
            }
        }
    }

    /// Answers `SaleNotStarted` or `SaleEnded` when a SKU's hint says its
    /// sale window is closed now, once the state that answer saw is durable.
    /// Like the sold-out answer, it costs no mailbox round trip; the actor
    /// checks the window again when it decides.
    async fn refuse_if_closed(&self, handle: &SkuHandle) -> Result<(), EngineError> {
        match handle.hint.closed_at(handle.id, self.now_ms()) {
            None => Ok(()),
            Some((refusal, seen)) => self.refuse(seen, refusal.into()).await,
        }
    }

    async fn reserve_at(
        &self,
        handle: Arc<SkuHandle>,
        user: UserId,
        qty: u32,
    ) -> Result<Reservation, EngineError> {
        self.refuse_if_closed(&handle).await?;
        self.refuse_if_sold_out(handle.id, handle.hint.sold_out_for(qty))
            .await?;
        let (reply, rx) = reply_channel();
        let reserve = Reserve {
            handle: Arc::clone(&handle),
            reservation: self.next_order_id().await?,
            user,
            qty,
            reply,
        };
        handle.send(reserve)?;
        let answer = rx.await.map_err(|_| EngineError::Stopped)?;
        match answer.result {
            // The order that takes it waits for durability; waiting here too
            // would cost a second flush.
            Ok(reservation) => Ok(reservation),
            Err(error) => self.refuse(answer.seen, error).await,
        }
    }

    /// Places an order for `user`: every line or none.
    ///
    /// # Errors
    /// `Domain(Invalid)` for bad lines, `NotFound` for an unknown SKU or
    /// promotion, `Domain(OutOfStock | LimitExceeded)`, `Overloaded`,
    /// journal errors.
    pub async fn place_order(
        &self,
        user: UserId,
        items: &[SkuQty],
        promo: Option<PromoCode>,
        idem: Option<IdemStamp>,
    ) -> Result<Order, EngineError> {
        // The flash-sale fast path: a single line of a SKU whose sale is
        // closed, or that is sold out, is refused from the hint, before any
        // allocation.
        if let [line] = items {
            validate::qty(line.qty)?;
            let refused = {
                let handle = self
                    .inner
                    .skus
                    .get(&line.sku)
                    .ok_or_else(|| EngineError::sku_not_found(line.sku))?;
                handle.hint.closed_at(line.sku, self.now_ms()).or_else(|| {
                    let seen = handle.hint.sold_out_for(line.qty)?;
                    Some((DomainError::OutOfStock { sku: line.sku }, seen))
                })
            };
            if let Some((refusal, seen)) = refused {
                if let Some(code) = promo {
                    self.promotion(code)?;
                }
                return self.refuse(seen, refusal.into()).await;
            }
        }
        let lines = validate::merge_lines(items)?;
        let promo = promo.map(|code| self.promotion(code)).transpose()?;
        let placed = self.place_lines(user, &lines, promo, None, idem).await?;
        placed.ok_or(EngineError::Stopped)
    }

    /// Places an order from `user`'s cart and empties it.
    ///
    /// # Errors
    /// As [`Engine::place_order`]; `Domain(Invalid)` for an empty cart.
    pub async fn checkout(
        &self,
        user: UserId,
        promo: Option<PromoCode>,
        idem: Option<IdemStamp>,
    ) -> Result<Order, EngineError> {
        let promo = promo.map(|code| self.promotion(code)).transpose()?;
        for _ in 0..CHECKOUT_ATTEMPTS_MAX {
            let cart = self.cart(user).await?;
            if cart.is_empty() {
                return Err(DomainError::invalid("the cart is empty").into());
            }
            let items = cart.items().to_vec();
            let placed = self
                .place_lines(user, &items, promo, Some(items.clone()), idem.clone())
                .await?;
            if let Some(order) = placed {
                return Ok(order);
            }
        }
        Err(DomainError::invalid("the cart kept changing during checkout; try again").into())
    }

    async fn place_lines(
        &self,
        user: UserId,
        lines: &[SkuQty],
        promo: Option<Promotion>,
        from_cart: Option<Vec<SkuQty>>,
        idem: Option<IdemStamp>,
    ) -> Result<Option<Order>, EngineError> {
        let mut pending = Vec::with_capacity(lines.len());
        // Reversed: the placement pops its next line off the end.
        for line in lines.iter().rev() {
            let handle = self.sku_handle(&line.sku)?;
            // Refuse a closed or sold-out line before holding anything.
            self.refuse_if_closed(&handle).await?;
            self.refuse_if_sold_out(handle.id, handle.hint.sold_out_for(line.qty))
                .await?;
            pending.push((handle, line.qty, self.next_order_id().await?));
        }
        let first = pending
            .last()
            .map(|(handle, ..)| Arc::clone(handle))
            .ok_or_else(|| DomainError::invalid("an order needs at least one line"))?;
        let (reply, rx) = reply_channel();
        let placement = Placement {
            order_id: self.next_order_id().await?,
            user,
            pending,
            held: Vec::with_capacity(lines.len()),
            shard: Arc::clone(self.shard_of_user(&user)),
            promo,
            from_cart,
            idem,
            ttl_ms: self.inner.config.reservation_ttl_ms,
            reply,
        };
        first.send(placement)?;
        self.answer(rx).await
    }

    pub(super) async fn act(
        &self,
        caller: Caller,
        id: OrderId,
        op: OrderOp,
    ) -> Result<Order, EngineError> {
        let shard = self.shard_of_order(id)?;
        let (reply, rx) = reply_channel();
        send(
            shard,
            Act {
                order_id: id,
                caller,
                op,
                reply,
            },
        )?;
        let acted = self.answer(rx).await?;
        // Every SKU has applied the move once this resolves (an error only
        // means the completion was dropped, which also happens after that).
        let _ = acted.applied.await;
        Ok(acted.order)
    }

    /// Reads an order (its owner or an admin). An unpaid order past its
    /// deadline is expired first.
    ///
    /// # Errors
    /// `NotFound`, `Forbidden`, `Overloaded`, journal errors.
    pub async fn order(&self, caller: Caller, id: OrderId) -> Result<Order, EngineError> {
        self.durably(move |engine| async move { engine.order_now(caller, id).await })
            .await
    }

    async fn order_now(&self, caller: Caller, id: OrderId) -> Result<Order, EngineError> {
        self.act(caller, id, OrderOp::Get).await
    }

    /// Lists orders, newest first, at most `limit` (capped at 500).
    ///
    /// # Errors
    /// `Overloaded`, journal errors.
    pub async fn orders(&self, scope: OrderScope, limit: usize) -> Result<Vec<Order>, EngineError> {
        self.durably(move |engine| async move { engine.orders_now(scope, limit).await })
            .await
    }

    async fn orders_now(&self, scope: OrderScope, limit: usize) -> Result<Vec<Order>, EngineError> {
        let limit = limit.min(ORDERS_LIST_MAX);
        let shards: Vec<&Arc<Addr<OrderShard>>> = match scope {
            OrderScope::User(user) => vec![self.shard_of_user(&user)],
            OrderScope::All => self.inner.shards.iter().collect(),
        };
        let user = match scope {
            OrderScope::User(user) => Some(user),
            OrderScope::All => None,
        };
        let mut pending = Vec::with_capacity(shards.len());
        for shard in shards {
            let (reply, rx) = reply_channel();
            send(shard, List { user, limit, reply })?;
            pending.push(rx);
        }
        let parts = try_join_all(pending.into_iter().map(|rx| self.answer(rx))).await?;
        let mut orders: Vec<Order> = parts.into_iter().flatten().collect();
        // Read after memory: an order leaves memory only once the archive
        // holds it, so none slips between the two reads. One in both (live
        // again after a refund, or archived and not yet dropped) is shown
        // once, as memory has it.
        if let Some(archive) = &self.inner.shared.archive {
            let archived = match scope {
                OrderScope::User(user) => archive.list_user(&user, limit)?,
                OrderScope::All => archive.list_all(limit)?,
            };
            let live: std::collections::HashSet<OrderId> = orders.iter().map(|o| o.id).collect();
            orders.extend(archived.into_iter().filter(|o| !live.contains(&o.id)));
        }
        orders.sort_by_key(|o| std::cmp::Reverse(o.id));
        orders.truncate(limit);
        Ok(orders)
    }

    /// Moves every finished order past the retention window to the archive
    /// now, and answers how many left memory (the shards also do this on a
    /// timer). Nothing moves without an archive or a retention window.
    ///
    /// # Errors
    /// `Overloaded`, `Stopped`, `Storage`.
    pub async fn archive_due(&self) -> Result<usize, EngineError> {
        let mut pending = Vec::with_capacity(self.inner.shards.len());
        for shard in &self.inner.shards {
            let (reply, rx) = reply_channel();
            send(shard, ArchiveDue { reply })?;
            pending.push(rx);
        }
        let mut archived = 0;
        for rx in pending {
            archived += self.answer(rx).await?;
        }
        Ok(archived)
    }

    /// Records the payment provider's callback (admin). A repeat with the
    /// same `payment_ref` and amount answers with the order unchanged.
    ///
    /// # Errors
    /// `NotFound`, `Forbidden`, `Domain(PaymentMismatch | InvalidTransition)`,
    /// `Overloaded`, journal errors.
    pub async fn pay(
        &self,
        caller: Caller,
        id: OrderId,
        payment_ref: PaymentRef,
        amount_cents: u64,
        idem: Option<IdemStamp>,
    ) -> Result<Order, EngineError> {
        let op = OrderOp::Pay {
            payment_ref,
            amount_cents,
            idem,
        };
        self.act(caller, id, op).await
    }

    /// Cancels a reserved order (its owner or an admin).
    ///
    /// # Errors
    /// `NotFound`, `Forbidden`, `Domain(InvalidTransition)`, `Overloaded`,
    /// journal errors.
    pub async fn cancel(&self, caller: Caller, id: OrderId) -> Result<Order, EngineError> {
        self.act(caller, id, OrderOp::Cancel).await
    }

    /// Ships a paid order (admin).
    ///
    /// # Errors
    /// As [`Engine::cancel`].
    pub async fn ship(&self, caller: Caller, id: OrderId) -> Result<Order, EngineError> {
        self.act(caller, id, OrderOp::Ship).await
    }

    /// Marks a shipped order delivered (admin).
    ///
    /// # Errors
    /// As [`Engine::cancel`].
    pub async fn deliver(&self, caller: Caller, id: OrderId) -> Result<Order, EngineError> {
        self.act(caller, id, OrderOp::Deliver).await
    }

    /// Refunds units of a paid, shipped or delivered order (admin).
    ///
    /// # Errors
    /// As [`Engine::cancel`]; `Domain(Invalid)` for more units than are left.
    pub async fn refund(
        &self,
        caller: Caller,
        id: OrderId,
        lines: Vec<SkuQty>,
        restock: bool,
        idem: Option<IdemStamp>,
    ) -> Result<Order, EngineError> {
        for line in &lines {
            validate::qty(line.qty)?;
        }
        let op = OrderOp::Refund {
            lines,
            restock,
            idem,
        };
        self.act(caller, id, op).await
    }

    /// Expires every unpaid order past its deadline now, and waits until the
    /// units are back (the shards also do this on a timer).
    ///
    /// # Errors
    /// `Overloaded`, `Stopped`.
    pub async fn expire_due(&self) -> Result<usize, EngineError> {
        let mut pending = Vec::with_capacity(self.inner.shards.len());
        for shard in &self.inner.shards {
            let (reply, rx) = reply_channel();
            send(shard, ExpireDue { reply })?;
            pending.push(rx);
        }
        let mut expired = 0;
        for rx in pending {
            let (count, applied) = self.answer(rx).await?;
            let _ = applied.await;
            expired += count;
        }
        Ok(expired)
    }

    /// How many orders are in each state.
    ///
    /// # Errors
    /// `Overloaded`, `Stopped`.
    pub async fn order_counts(&self) -> Result<Vec<(OrderStatus, u64)>, EngineError> {
        let mut totals: Vec<(OrderStatus, u64)> =
            OrderStatus::ALL.iter().map(|s| (*s, 0)).collect();
        for shard in &self.inner.shards {
            let (reply, rx) = reply_channel();
            send(shard, CountByStatus { reply })?;
            let counts = rx.await.map_err(|_| EngineError::Stopped)?.result?;
            for ((_, total), (_, count)) in totals.iter_mut().zip(counts) {
                *total += count;
            }
        }
        Ok(totals)
    }
}
