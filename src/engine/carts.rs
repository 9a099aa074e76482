//! The cart side of the [`Engine`] handle.

#[allow(clippy::wildcard_imports)]
use super::*;

impl Engine {
    async fn cart_op(
        &self,
        user: UserId,
        set: Option<(SkuId, u32)>,
        clear: bool,
    ) -> Result<Cart, EngineError> {
        let (reply, rx) = reply_channel();
        send(
            self.shard_of_user(&user),
            CartOp {
                user,
                set,
                clear,
                reply,
            },
        )?;
        self.answer(rx).await
    }

    /// Reads `user`'s cart.
    ///
    /// # Errors
    /// `Overloaded`, `Stopped`.
    pub async fn cart(&self, user: UserId) -> Result<Cart, EngineError> {
        self.durably(move |engine| async move { engine.cart_now(user).await })
            .await
    }

    async fn cart_now(&self, user: UserId) -> Result<Cart, EngineError> {
        self.cart_op(user, None, false).await
    }

    /// Sets a cart line (`qty` 0 removes it).
    ///
    /// # Errors
    /// `NotFound` for an unknown SKU, `Domain(Invalid)`, `Overloaded`,
    /// journal errors.
    pub async fn set_cart_item(
        &self,
        user: UserId,
        sku: SkuId,
        qty: u32,
    ) -> Result<Cart, EngineError> {
        validate::cart_qty(qty)?;
        self.sku_handle(&sku)?;
        self.cart_op(user, Some((sku, qty)), false).await
    }

    /// Empties `user`'s cart.
    ///
    /// # Errors
    /// `Overloaded`, journal errors.
    pub async fn clear_cart(&self, user: UserId) -> Result<(), EngineError> {
        self.cart_op(user, None, true).await.map(|_| ())
    }
}
