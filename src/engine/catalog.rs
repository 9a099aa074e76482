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
            let refused = if self.inner.skus.contains_key(&new.sku) {
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
                self.now_ms(),
            )?;
            let seq = self.inner.journal.append(&event)?;
            let state = SkuState::from_created(&event)?;
            let view = state.view();
            self.spawn_sku(state, seq);
            (view, seq)
        };
        self.settle(seq).await?;
        Ok(view)
    }

    /// Changes a SKU's name, price or per-user limit (`Some(None)` makes it
    /// unlimited). Orders placed earlier keep their snapshot.
    ///
    /// # Errors
    /// `NotFound`, `Domain(Invalid)`, `Overloaded`, journal errors.
    pub async fn update_sku(
        &self,
        sku: SkuId,
        name: Option<String>,
        price_cents: Option<u64>,
        per_user_limit: Option<Option<u32>>,
    ) -> Result<SkuView, EngineError> {
        let handle = self.sku_handle(&sku)?;
        let (reply, rx) = reply_channel();
        send(
            &handle.addr,
            Update {
                name,
                price_cents,
                per_user_limit,
                reply,
            },
        )?;
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
        send(&handle.addr, Restock { qty, idem, reply })?;
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
        let (reply, rx) = reply_channel();
        send(&handle.addr, View { reply })?;
        self.answer(rx).await
    }

    /// Reads every SKU, sorted by id.
    ///
    /// # Errors
    /// `Overloaded` when a SKU's mailbox is full.
    pub async fn skus(&self) -> Result<Vec<SkuView>, EngineError> {
        self.durably(|engine| async move { engine.skus_now().await })
            .await
    }

    async fn skus_now(&self) -> Result<Vec<SkuView>, EngineError> {
        let handles: Vec<Arc<SkuHandle>> = self
            .inner
            .skus
            .iter()
            .map(|h| Arc::clone(h.value()))
            .collect();
        let mut pending = Vec::with_capacity(handles.len());
        for handle in &handles {
            let (reply, rx) = reply_channel();
            send(&handle.addr, View { reply })?;
            pending.push(rx);
        }
        let mut views = try_join_all(pending.into_iter().map(|rx| self.answer(rx))).await?;
        views.sort_by_key(|v| v.sku);
        Ok(views)
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
        let mut handles: Vec<Arc<SkuHandle>> = self
            .inner
            .skus
            .iter()
            .map(|h| Arc::clone(h.value()))
            .collect();
        let total = handles.len();
        handles.sort_unstable_by_key(|h| h.id);
        handles.truncate(limit);
        let mut pending = Vec::with_capacity(handles.len());
        for handle in &handles {
            let (reply, rx) = reply_channel();
            send(&handle.addr, View { reply })?;
            pending.push(rx);
        }
        let views = try_join_all(pending.into_iter().map(|rx| self.answer(rx))).await?;
        Ok((views, total))
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
