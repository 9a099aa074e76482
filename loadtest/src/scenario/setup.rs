//! Before the load: create what the scenario needs through the admin API and
//! build one agent per connection.
//!
//! Every id a run creates carries the run id (unix milliseconds), so runs
//! against a long-running `--url` server never collide: `flash-<ms>`,
//! `overload-<ms>`, `mix-<ms>-01`.., customers `mix-<ms>-00001`.. (buyers are
//! `buyer-00001`.., as the issue names them; the per-user limit is per SKU, so
//! a fresh SKU gives them a fresh start).

use std::sync::Arc;

use anyhow::{Context, Result, bail, ensure};
use hyper::Method;
use hyper::body::Bytes;
use serde_json::{Map, Value, json};

use super::buyer::{Buyer, BuyerAgent, buyers_for, mint_buyers};
use super::mixed::{Catalog, MixedAgent, mint_customer};
use super::{Agent, share_of, user_id};
use crate::books::SkuExpect;
use crate::cli::ScenarioCmd;
use crate::client::{Answer, Call, Conn};
use crate::limits;
use crate::rng::SmallRng;
use crate::token::Minter;

/// Tries of one setup request that got no answer.
const SETUP_ATTEMPTS: u32 = 3;
/// Ids tried when the first one is taken.
const SKU_ID_ATTEMPTS: u32 = 5;
/// The mixed run's promotion: 5.00 off orders of 50.00 or more, so some
/// carts reach it and some do not.
const PROMO_THRESHOLD_CENTS: u64 = 5_000;
const PROMO_OFF_CENTS: u64 = 500;
/// Mixed SKU prices run from 1.99 to 99.99.
const MIXED_PRICE_CENTS_MIN: u64 = 199;
const MIXED_PRICE_CENTS_SPAN: u64 = 9_801;
/// The hot SKU's price in a flash sale and in overload.
const HOT_PRICE_CENTS: u64 = 1_999;

/// What a scenario needs for its run.
#[derive(Debug)]
pub struct Plan {
    /// One per connection.
    pub agents: Vec<Agent>,
    /// SKUs created, with their stock, for the book check.
    pub skus: Vec<SkuExpect>,
    /// Open-loop arrivals per second (`soak`, `overload`); `None` is closed loop.
    pub rate_per_s: Option<u64>,
    /// Scenario facts for the report.
    pub detail: Map<String, Value>,
}

/// Sends one admin request, trying again only when it got no answer. Returns
/// the answer and whether an earlier try went unanswered.
async fn send_setup(
    conn: &mut Conn,
    method: &Method,
    path: &str,
    admin: &str,
    body: &Value,
) -> Result<(Answer, bool)> {
    let bytes = Bytes::from(serde_json::to_vec(body)?);
    let mut unanswered = false;
    let mut last = "";
    for _ in 0..SETUP_ATTEMPTS {
        let call = Call::json(method.clone(), path, bytes.clone()).token(admin);
        match conn.send(&call).await {
            Ok(answer) => return Ok((answer, unanswered)),
            Err(failure) => {
                unanswered = true;
                last = failure.label();
                tokio::time::sleep(limits::BOOK_CHECK_RETRY_PAUSE).await;
            }
        }
    }
    bail!("setup {method} {path} got no answer ({last}); is the server up?")
}

fn is_already_exists(answer: &Answer) -> bool {
    answer.status == 409 && answer.error_code().as_deref() == Some("already_exists")
}

/// Creates a SKU with a fresh id starting `base`; returns the id.
async fn create_sku(
    conn: &mut Conn,
    admin: &str,
    base: &str,
    stock: u64,
    price_cents: u64,
    per_user_limit: Option<u32>,
) -> Result<String> {
    for attempt in 0..SKU_ID_ATTEMPTS {
        let sku_id = if attempt == 0 {
            base.to_owned()
        } else {
            format!("{base}-{attempt}")
        };
        let body = json!({
            "sku_id": sku_id,
            "name": format!("Load test {sku_id}"),
            "price_cents": price_cents,
            "stock": stock,
            "per_user_limit": per_user_limit,
        });
        let (answer, unanswered) =
            send_setup(conn, &Method::POST, "/v1/skus", admin, &body).await?;
        if answer.status == 201 || (unanswered && is_already_exists(&answer)) {
            return Ok(sku_id);
        }
        if !is_already_exists(&answer) {
            bail!(
                "creating SKU {sku_id} answered {}: {}",
                answer.status,
                answer.body_excerpt()
            );
        }
    }
    bail!("no free SKU id starting {base}")
}

async fn create_promotion(conn: &mut Conn, admin: &str, code: &str) -> Result<()> {
    let body = json!({
        "code": code,
        "threshold_cents": PROMO_THRESHOLD_CENTS,
        "off_cents": PROMO_OFF_CENTS,
    });
    let (answer, unanswered) =
        send_setup(conn, &Method::POST, "/v1/promotions", admin, &body).await?;
    ensure!(
        answer.status == 201 || (unanswered && is_already_exists(&answer)),
        "creating promotion {code} answered {}: {}",
        answer.status,
        answer.body_excerpt()
    );
    Ok(())
}

/// Creates the scenario's SKUs and agents for `connections` workers.
///
/// # Errors
///
/// A setup request failed, or the flags do not fit the scenario.
pub async fn plan(
    cmd: &ScenarioCmd,
    conn: &mut Conn,
    minter: &Minter,
    admin: &str,
    run_id: &str,
    seed: u64,
) -> Result<Plan> {
    let connections = cmd.common().connections;
    let mut detail = Map::new();
    match cmd {
        ScenarioCmd::FlashSale(args) => {
            let sku_id = create_sku(
                conn,
                admin,
                &format!("flash-{run_id}"),
                args.stock,
                HOT_PRICE_CENTS,
                Some(args.per_user_limit),
            )
            .await?;
            let buyers = mint_buyers(minter, "buyer", args.buyers)?;
            let agents = buyer_agents(run_id, &sku_id, &buyers, connections)?;
            detail.insert("sku_id".into(), json!(sku_id));
            detail.insert("stock".into(), json!(args.stock));
            detail.insert("buyers".into(), json!(args.buyers));
            detail.insert("per_user_limit".into(), json!(args.per_user_limit));
            Ok(Plan {
                agents,
                skus: vec![SkuExpect {
                    sku_id,
                    stock_in: args.stock,
                }],
                rate_per_s: None,
                detail,
            })
        }
        ScenarioCmd::Overload(args) => {
            let stock = limits::STOCK_MAX;
            let sku_id = create_sku(
                conn,
                admin,
                &format!("overload-{run_id}"),
                stock,
                HOT_PRICE_CENTS,
                None,
            )
            .await?;
            let buyers = mint_buyers(minter, "buyer", args.buyers)?;
            let agents = buyer_agents(run_id, &sku_id, &buyers, connections)?;
            detail.insert("sku_id".into(), json!(sku_id));
            detail.insert("stock".into(), json!(stock));
            detail.insert("buyers".into(), json!(args.buyers));
            detail.insert("rate_target_rps".into(), json!(args.rate));
            Ok(Plan {
                agents,
                skus: vec![SkuExpect {
                    sku_id,
                    stock_in: stock,
                }],
                rate_per_s: Some(args.rate),
                detail,
            })
        }
        ScenarioCmd::Mixed(args) => {
            let plan = mixed_plan(
                conn,
                minter,
                admin,
                run_id,
                seed,
                connections,
                args.buyers,
                &mut detail,
            )
            .await?;
            Ok(Plan {
                agents: plan.0,
                skus: plan.1,
                rate_per_s: None,
                detail,
            })
        }
        ScenarioCmd::Soak(args) => {
            let plan = mixed_plan(
                conn,
                minter,
                admin,
                run_id,
                seed,
                connections,
                args.buyers,
                &mut detail,
            )
            .await?;
            detail.insert("rate_target_rps".into(), json!(args.rate));
            Ok(Plan {
                agents: plan.0,
                skus: plan.1,
                rate_per_s: Some(args.rate),
                detail,
            })
        }
    }
}

#[allow(clippy::too_many_arguments)]
async fn mixed_plan(
    conn: &mut Conn,
    minter: &Minter,
    admin: &str,
    run_id: &str,
    seed: u64,
    connections: u32,
    customers: u32,
    detail: &mut Map<String, Value>,
) -> Result<(Vec<Agent>, Vec<SkuExpect>)> {
    ensure!(
        customers >= connections,
        "--buyers ({customers}) must be at least --connections ({connections}): each connection owns its own customers"
    );
    let mut rng = SmallRng::new(seed);
    let mut skus = Vec::new();
    let mut ids: Vec<Arc<str>> = Vec::new();
    for i in 1..=limits::MIXED_SKUS {
        let price_cents = MIXED_PRICE_CENTS_MIN.saturating_add(rng.below(MIXED_PRICE_CENTS_SPAN));
        let id = create_sku(
            conn,
            admin,
            &format!("mix-{run_id}-{i:02}"),
            limits::MIXED_SKU_STOCK,
            price_cents,
            None,
        )
        .await
        .context("creating the mixed catalog")?;
        skus.push(SkuExpect {
            sku_id: id.clone(),
            stock_in: limits::MIXED_SKU_STOCK,
        });
        ids.push(id.into());
    }
    let promo = format!("MIX{run_id}");
    create_promotion(conn, admin, &promo).await?;
    let catalog = Arc::new(Catalog::new(ids, Some(promo.clone())));
    let admin: Arc<str> = admin.into();
    let prefix = format!("mix-{run_id}");
    let mut agents = Vec::new();
    for w in 0..connections {
        let mine = share_of(w, connections, customers)
            .into_iter()
            .map(|i| mint_customer(minter, &user_id(&prefix, i)))
            .collect::<Result<Vec<_>>>()?;
        agents.push(Agent::Mixed(Box::new(MixedAgent::new(
            run_id,
            w,
            catalog.clone(),
            admin.clone(),
            mine,
            seed,
        ))));
    }
    detail.insert("skus".into(), json!(limits::MIXED_SKUS));
    detail.insert("sku_stock".into(), json!(limits::MIXED_SKU_STOCK));
    detail.insert("customers".into(), json!(customers));
    detail.insert("promo_code".into(), json!(promo));
    Ok((agents, skus))
}

/// One buyer agent per connection, all racing `sku_id`, the buyers shared
/// out among them.
fn buyer_agents(
    run_id: &str,
    sku_id: &str,
    buyers: &[Buyer],
    connections: u32,
) -> Result<Vec<Agent>> {
    let sku: Arc<str> = sku_id.into();
    (0..connections)
        .map(|w| {
            Ok(Agent::Buyer(BuyerAgent::new(
                run_id,
                w,
                Arc::clone(&sku),
                buyers_for(buyers, w, connections),
            )?))
        })
        .collect()
}
