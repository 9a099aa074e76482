//! Buyers racing for one hot SKU: the `flash-sale` and `overload` workload.
//!
//! Each request is `POST /v1/orders {"items":[{"sku_id": hot, "qty": 1}]}`
//! with the buyer's own token and a fresh `Idempotency-Key`. A 201 is
//! remembered for the book check; a request with no answer (or a 5xx) is
//! remembered as one unit that may or may not have been granted. Once the
//! stock is gone the buyers keep going: the sold-out path is part of the test.

use std::sync::Arc;

use anyhow::{Context, Result};
use hyper::Method;
use hyper::body::Bytes;
use serde::Deserialize;

use super::{Ctx, Load, WorkerOutput, endpoint, share_of, user_id};
use crate::books::{AckedOrder, AckedState, Line};
use crate::client::Call;
use crate::stats::Outcome;
use crate::token::Minter;

/// One buyer: an id and a token.
#[derive(Debug, Clone)]
pub struct Buyer {
    /// `buyer-00001`, ...
    pub user_id: Arc<str>,
    /// Their customer token.
    pub token: Arc<str>,
}

/// Mints `count` buyers named `buyer-00001`, ...
///
/// # Errors
///
/// Signing failed.
pub fn mint_buyers(minter: &Minter, prefix: &str, count: u32) -> Result<Vec<Buyer>> {
    (0..count)
        .map(|i| {
            let id = user_id(prefix, i);
            let token = minter
                .customer(&id)
                .with_context(|| format!("minting a token for {id}"))?;
            Ok(Buyer {
                user_id: id.into(),
                token: token.into(),
            })
        })
        .collect()
}

/// The buyers worker `worker` of `workers` plays; when there are fewer buyers
/// than workers, buyers are shared (so one buyer races itself).
#[must_use]
pub fn buyers_for(all: &[Buyer], worker: u32, workers: u32) -> Vec<Buyer> {
    let total = u32::try_from(all.len()).unwrap_or(u32::MAX);
    let mine: Vec<Buyer> = share_of(worker, workers, total)
        .into_iter()
        .filter_map(|i| all.get(usize::try_from(i).ok()?).cloned())
        .collect();
    if !mine.is_empty() || all.is_empty() {
        return mine;
    }
    let index = usize::try_from(worker).unwrap_or(0) % all.len();
    all.get(index).cloned().into_iter().collect()
}

/// The part of a 201 Order body the run keeps.
#[derive(Debug, Deserialize)]
struct Created {
    order_id: String,
}

/// A worker's buyers and what they were told.
#[derive(Debug)]
pub struct BuyerAgent {
    key_prefix: String,
    sku_id: Arc<str>,
    body: Bytes,
    buyers: Vec<Buyer>,
    next: usize,
    seq: u64,
    out: WorkerOutput,
}

impl BuyerAgent {
    /// An agent for worker `worker`, buying `sku_id` one unit at a time.
    ///
    /// # Errors
    ///
    /// The request body could not be encoded.
    pub fn new(run_id: &str, worker: u32, sku_id: Arc<str>, buyers: Vec<Buyer>) -> Result<Self> {
        let body = serde_json::json!({ "items": [{ "sku_id": &*sku_id, "qty": 1 }] });
        Ok(Self {
            key_prefix: format!("{run_id}-w{worker}"),
            body: Bytes::from(serde_json::to_vec(&body)?),
            sku_id,
            buyers,
            next: 0,
            seq: 0,
            out: WorkerOutput::default(),
        })
    }

    /// One order attempt by the next buyer in turn.
    pub async fn step(&mut self, ctx: &mut Ctx<'_>, load: &Load) {
        let Some(buyer) = self
            .buyers
            .get(self.next % self.buyers.len().max(1))
            .cloned()
        else {
            return;
        };
        self.next = self.next.wrapping_add(1);
        self.seq = self.seq.saturating_add(1);
        let key = format!("{}-{}", self.key_prefix, self.seq);
        let call = Call::json(Method::POST, "/v1/orders", self.body.clone())
            .token(&buyer.token)
            .idempotency_key(&key);
        let (result, outcome) = ctx.send(endpoint::ORDERS_CREATE, &call).await;
        match (&result, &outcome) {
            (Ok(answer), _) if answer.status == 201 => match answer.json::<Created>() {
                Ok(created) => {
                    self.out.acked.push(AckedOrder {
                        order_id: created.order_id,
                        user_id: buyer.user_id.to_string(),
                        lines: vec![Line {
                            sku_id: self.sku_id.to_string(),
                            qty: 1,
                        }],
                        state: AckedState::Reserved,
                        uncertain: false,
                    });
                    ctx.granted(1);
                    self.out.last_granted_ms = Some(load.elapsed_ms());
                }
                Err(_) => self.out.unreadable_acks = self.out.unreadable_acks.saturating_add(1),
            },
            (
                _,
                Outcome::Answered {
                    status: 409,
                    code: Some(code),
                },
            ) if code == "out_of_stock" => {
                self.out
                    .first_sold_out_ms
                    .get_or_insert_with(|| load.elapsed_ms());
            }
            (Ok(answer), _) if answer.status >= 500 => self.out.unknown(&self.sku_id, 1),
            (Err(_), _) => self.out.unknown(&self.sku_id, 1),
            _ => {}
        }
    }

    /// What this worker learned.
    #[must_use]
    pub fn finish(self) -> WorkerOutput {
        self.out
    }
}
