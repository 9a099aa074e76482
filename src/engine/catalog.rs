//! The catalog side of the [`Engine`] handle: SKUs and promotions.

#[allow(clippy::wildcard_imports)]
use super::*;

impl Engine {
    /// Creates a SKU.
    ///
    /// # Errors
    /// `AlreadyExists` for a taken id, `Domain(Invalid)` for values out of
    /// range or a full catalog, journal errors.
    pub async fn create_sku(&self, new: NewSku) -> Result<SkuView, EngineError> {
        let (view, seq) = {
            let serial = lock(&self.inner.create_lock);
            let refused = if self.inner.skus.contains(&new.sku) {
                Some(EngineError::AlreadyExists {
                    what: "SKU",
                    id: new.sku.to_string(),
                })
            } else if self.inner.skus.len() >= SKUS_MAX {
                Some(DomainError::invalid(format!("the catalog is full ({SKUS_MAX} SKUs)")).into())
            } else {
                None
            };
            if let Some(error) = refused {
                // The SKUs this answer saw may still be on their way to disk.
                let seen = self.inner.journal.last_seq();
                drop(serial);
                return self.refuse(seen, error).await;
            }
            let event = SkuState::decide_create(
                new.sku,
                new.name,
                new.price_cents,
                new.per_user_limit,
                new.stock,
                new.sale,
                self.now_ms(),
            )?;
            let seq = self.inner.journal.append(&event)?;
            let state = SkuState::from_created(&event)?;
            let view = state.view();
            // Asleep: its actor starts with its first order.
            let handle = SkuHandle::asleep(state, seq, &self.inner.lives);
            if !self.inner.skus.insert(handle) {
                // Checked above under the same lock.
                return Err(DomainError::inconsistent("a SKU id taken twice").into());
            }
            (view, seq)
        };
        self.settle(seq).await?;
        Ok(view)
    }

    /// Changes a SKU's name, price, per-user limit (`Some(None)` makes it
    /// unlimited) or sale window. Orders placed earlier keep their snapshot.
    ///
    /// # Errors
    /// `NotFound`, `Domain(Invalid)`, `Overloaded`, journal errors.
    pub async fn update_sku(
        &self,
        sku: SkuId,
        name: Option<String>,
        price_cents: Option<u64>,
        per_user_limit: Option<Option<u32>>,
        sale: SalePatch,
    ) -> Result<SkuView, EngineError> {
        let handle = self.sku_handle(&sku)?;
        let (reply, rx) = reply_channel();
        handle.send(Update {
            name,
            price_cents,
            per_user_limit,
            sale,
            reply,
        })?;
        self.answer(rx).await
    }

    /// Adds units to a SKU.
    ///
    /// # Errors
    /// `NotFound`, `Domain(Invalid | Overflow)`, `Overloaded`, journal errors.
    pub async fn restock(
        &self,
        sku: SkuId,
        qty: u64,
        idem: Option<IdemStamp>,
    ) -> Result<SkuView, EngineError> {
        let handle = self.sku_handle(&sku)?;
        let (reply, rx) = reply_channel();
        handle.send(Restock { qty, idem, reply })?;
        self.answer(rx).await
    }

    /// Reads a SKU.
    ///
    /// # Errors
    /// `NotFound`, `Overloaded`.
    pub async fn sku(&self, sku: SkuId) -> Result<SkuView, EngineError> {
        self.durably(move |engine| async move { engine.sku_now(sku).await })
            .await
    }

    async fn sku_now(&self, sku: SkuId) -> Result<SkuView, EngineError> {
        let handle = self.sku_handle(&sku)?;
        // A sleeping SKU answers from the catalog, without waking.
        let rx = handle.read(|reply| View { reply })?;
        self.answer(rx).await
    }

    /// Reads one page of SKUs in id order: at most `limit` of them after
    /// `after` (exclusive; from the first when `None`), and the id to pass
    /// as `after` for the next page (`None` when this is the last). Reads
    /// only the page's ids from the sorted index and asks only their actors,
    /// so a page costs the same in a catalog of any size.
    ///
    /// # Errors
    /// `Overloaded` when a SKU's mailbox is full.
    pub async fn skus_page(
        &self,
        after: Option<SkuId>,
        limit: usize,
    ) -> Result<(Vec<SkuView>, Option<SkuId>), EngineError> {
        self.durably(move |engine| async move { engine.skus_page_now(after, limit).await })
            .await
    }

    async fn skus_page_now(
        &self,
        after: Option<SkuId>,
        limit: usize,
    ) -> Result<(Vec<SkuView>, Option<SkuId>), EngineError> {
        let limit = limit.max(1);
        // One SKU past the page tells whether there is a next page.
        let mut handles = self.inner.skus.page(after, limit.saturating_add(1));
        let more = handles.len() > limit;
        handles.truncate(limit);
        let views = self.views_of(&handles).await?;
        let next = if more {
            views.last().map(|v| v.sku)
        } else {
            None
        };
        Ok((views, next))
    }

    /// Reads `handles`: the sleeping ones from the catalog (none is woken),
    /// the awake ones from their actors, all at once.
    async fn views_of(&self, handles: &[Arc<SkuHandle>]) -> Result<Vec<SkuView>, EngineError> {
        let mut pending = Vec::with_capacity(handles.len());
        for handle in handles {
            pending.push(handle.read(|reply| View { reply })?);
        }
        try_join_all(pending.into_iter().map(|rx| self.answer(rx))).await
    }

    /// Reads every SKU, sorted by id, a page at a time (tests: callers
    /// that know the catalog is small; sleeping SKUs are not woken).
    ///
    /// # Errors
    /// `Overloaded` when a SKU's mailbox is full.
    pub async fn skus(&self) -> Result<Vec<SkuView>, EngineError> {
        let mut all = Vec::new();
        let mut after = None;
        // The catalog holds at most SKUS_MAX, so this many pages reach its end.
        for _ in 0..=SKUS_MAX.div_ceil(SKUS_PAGE_MAX) {
            let (page, next) = self.skus_page(after, SKUS_PAGE_MAX).await?;
            all.extend(page);
            match next {
                Some(id) => after = Some(id),
                None => return Ok(all),
            }
        }
        Err(EngineError::Domain(DomainError::inconsistent(
            "the SKU index is longer than the catalog's bound",
        )))
    }

    /// The first `limit` SKUs in id order, and how many SKUs there are: a
    /// bounded read for the live dashboard, which must not ask every actor
    /// of a large catalog each second.
    ///
    /// # Errors
    /// `Overloaded` when one of those SKUs' mailbox is full.
    pub async fn skus_head(&self, limit: usize) -> Result<(Vec<SkuView>, usize), EngineError> {
        self.durably(move |engine| async move { engine.skus_head_now(limit).await })
            .await
    }

    async fn skus_head_now(&self, limit: usize) -> Result<(Vec<SkuView>, usize), EngineError> {
        let handles = self.inner.skus.page(None, limit);
        let views = self.views_of(&handles).await?;
        Ok((views, self.inner.skus.len()))
    }

    /// At most `limit` SKUs for `/metrics`: the awake ones (those a sale
    /// is touching) first, then the first by id; and how many SKUs there
    /// are and are awake. Bounded, whatever the catalog's size.
    ///
    /// # Errors
    /// `Overloaded` when one of those SKUs' mailbox is full.
    pub async fn skus_watched(
        &self,
        limit: usize,
    ) -> Result<(Vec<SkuView>, usize, usize), EngineError> {
        let awake = self.inner.lives.awake_ids(limit);
        let mut handles: Vec<Arc<SkuHandle>> = awake
            .iter()
            .filter_map(|id| self.inner.skus.get(id))
            .collect();
        if handles.len() < limit {
            let head = self.inner.skus.page(None, limit);
            let more: Vec<Arc<SkuHandle>> = head
                .into_iter()
                .filter(|h| !awake.contains(&h.id))
                .take(limit - handles.len())
                .collect();
            handles.extend(more);
        }
        handles.sort_unstable_by_key(|h| h.id);
        let views = self.views_of(&handles).await?;
        Ok((views, self.inner.skus.len(), self.inner.lives.awake_count()))
    }

    /// How many SKU actors run (the rest of the catalog sleeps).
    pub fn awake_skus(&self) -> usize {
        self.inner.lives.awake_count()
    }

    /// How many times a sleeping SKU's actor was started.
    pub fn sku_wakes(&self) -> u64 {
        self.inner.lives.wakes()
    }

    /// Whether the actor of `sku` runs.
    ///
    /// # Errors
    /// `NotFound`.
    pub fn is_awake(&self, sku: SkuId) -> Result<bool, EngineError> {
        Ok(self.sku_handle(&sku)?.is_awake())
    }

    /// Puts every awake SKU actor to sleep now, as if its idle time had
    /// passed, unless something holds it awake (a message in its mailbox, a
    /// release to retry, a snapshot under way); answers how many slept.
    /// For tests and operators: the actors also sleep by themselves.
    ///
    /// # Errors
    /// `Overloaded`, `Stopped`.
    pub async fn sleep_skus(&self) -> Result<usize, EngineError> {
        let awake = self.inner.lives.awake_ids(usize::MAX);
        let mut pending = Vec::with_capacity(awake.len());
        for id in awake {
            let Some(handle) = self.inner.skus.get(&id) else {
                continue;
            };
            let (reply, rx) = reply_channel();
            if handle.do_send_if_awake(Sleep { reply }) {
                pending.push(rx);
            }
        }
        let mut slept = 0;
        for rx in pending {
            let answer = rx.await.map_err(|_| EngineError::Stopped)?;
            if answer.result? {
                slept += 1;
            }
        }
        Ok(slept)
    }

    /// Creates a promotion.
    ///
    /// # Errors
    /// `AlreadyExists`, `Domain(Invalid)` (also when there are too many),
    /// journal errors.
    pub async fn create_promotion(&self, promo: Promotion) -> Result<Promotion, EngineError> {
        let seq = {
            let mut promotions = self
                .inner
                .promotions
                .write()
                .unwrap_or_else(|poisoned| poisoned.into_inner());
            let decided = promotions
                .decide_create(promo, self.now_ms())
                .map_err(|refusal| match refusal {
                    CreateRefusal::AlreadyExists => EngineError::AlreadyExists {
                        what: "promotion",
                        id: promo.code.to_string(),
                    },
                    CreateRefusal::Full => {
                        DomainError::invalid("there are too many promotions").into()
                    }
                });
            match decided {
                Ok(event) => {
                    let seq = self.inner.journal.append(&event)?;
                    promotions.apply(&event)?;
                    Ok(seq)
                }
                // The promotions this answer saw may still be on their way to disk.
                Err(error) => Err((error, self.inner.journal.last_seq())),
            }
        };
        let seq = match seq {
            Ok(seq) => seq,
            Err((error, seen)) => return self.refuse(seen, error).await,
        };
        self.settle(seq).await?;
        Ok(promo)
    }

    /// Takes a promotion that lives outside this engine's journal (cluster
    /// mode: the cluster's promotions bucket) into its table, in memory
    /// only: an order's record carries its discount, so replay never needs
    /// the table. One that is already there is left as it is.
    pub fn adopt_promotion(&self, promo: Promotion) {
        let mut promotions = self
            .inner
            .promotions
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if promotions.get(&promo.code).is_none() {
            let event = Event::PromotionCreated {
                promo,
                at_ms: self.now_ms(),
            };
            // Not there: the insert cannot meet a duplicate.
            if let Err(e) = promotions.apply(&event) {
                tracing::warn!(error = %e, "adopting a promotion");
            }
        }
    }

    /// The promotion with this code.
    ///
    /// # Errors
    /// `NotFound` when there is none.
    pub fn promotion(&self, code: PromoCode) -> Result<Promotion, EngineError> {
        self.inner
            .promotions
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .get(&code)
            .copied()
            .ok_or_else(|| EngineError::NotFound {
                what: "promotion",
                id: code.to_string(),
            })
    }
}
