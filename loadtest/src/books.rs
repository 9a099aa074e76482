//! The book check: after every run, read the books back through the API and
//! count what does not add up.
//!
//! What a run remembers ([`BookInput`]): every order that was answered 201
//! (user, lines, the last state we were told), the units of order requests
//! that got no answer (they may or may not have happened), and for every SKU
//! the run created, how many units it stocked.
//!
//! What is checked ([`evaluate`], pure, so tests can feed it any answers):
//!
//! * every acked order is there (`GET /v1/orders/{id}` 200) with the same user
//!   and lines, else `acked_missing`; its status is one the run can explain and
//!   its money adds up, else `inconsistent`;
//! * every SKU balances (`on_hand == available + reserved + allocated` and
//!   `on_hand + shipped == stock_in`), else `sku_invariant`;
//! * units granted (`reserved + allocated + shipped`) never exceed `stock_in`
//!   (else `oversold`, in units), are at least the units of acked orders that
//!   are still live (else `acked_missing`, in units), and at most those plus
//!   the units of unanswered requests (else `phantom_units`).
//!
//! The SKUs are read before and after the orders ([`check`]): reservations
//! only ever expire during the check, so "granted before >= live acked" and
//! "granted after <= live acked + unanswered" hold for a correct server even
//! while deadlines pass.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};

use crate::client::{Call, Conn};
use crate::limits;

/// One line of an order: a SKU and a quantity.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Line {
    /// The SKU.
    pub sku_id: String,
    /// Units.
    pub qty: u64,
}

/// The last state the server acknowledged for an order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum AckedState {
    /// Placed (201), not paid: may also have expired since.
    Reserved,
    /// Paid (200 on pay).
    Paid,
    /// Cancelled (200 on cancel).
    Cancelled,
    /// Fully refunded (200 on refund).
    Refunded,
}

/// An order that was answered 201, as the run knows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AckedOrder {
    /// From the 201 body.
    pub order_id: String,
    /// Who placed it.
    pub user_id: String,
    /// What it holds.
    pub lines: Vec<Line>,
    /// The last acknowledged state.
    pub state: AckedState,
    /// A later change was sent but got no answer (or a 5xx): any valid state
    /// is then possible.
    pub uncertain: bool,
}

/// A SKU the run created, and how many units went into it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SkuExpect {
    /// The SKU.
    pub sku_id: String,
    /// Initial stock plus restocks the run made.
    pub stock_in: u64,
}

/// Everything the run remembers for the check.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BookInput {
    /// SKUs created by the run.
    pub skus: Vec<SkuExpect>,
    /// Orders answered 201.
    pub acked: Vec<AckedOrder>,
    /// Per SKU, units of order requests that got no answer or a 5xx.
    pub unknown_units: BTreeMap<String, u64>,
    /// 201 answers whose body could not be read (no order id to check).
    pub unreadable_acks: u64,
}

/// An order as the server shows it (only the fields the check reads).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OrderView {
    /// Its id.
    pub order_id: String,
    /// Its owner.
    pub user_id: String,
    /// `reserved`, `paid`, ...
    pub status: String,
    /// Its lines.
    pub lines: Vec<OrderLineView>,
    /// Sum of qty * unit price.
    pub subtotal_cents: u64,
    /// Promotion discount.
    pub discount_cents: u64,
    /// subtotal - discount.
    pub total_cents: u64,
    /// Paid so far.
    pub paid_cents: u64,
    /// Refunded so far.
    pub refunded_cents: u64,
}

/// One line of an [`OrderView`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OrderLineView {
    /// The SKU.
    pub sku_id: String,
    /// Units ordered.
    pub qty: u64,
    /// Price snapshot.
    pub unit_price_cents: u64,
    /// This line's share of the discount.
    pub discount_cents: u64,
    /// Units refunded so far.
    pub refunded_qty: u64,
}

/// A SKU as the server shows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct SkuView {
    /// Units in the warehouse.
    pub on_hand: u64,
    /// What a new order can take.
    pub available: u64,
    /// Held for unpaid orders.
    pub reserved: u64,
    /// Paid, waiting to ship.
    pub allocated: u64,
    /// Left the warehouse, cumulative.
    pub shipped: u64,
}

/// The result of one read in the check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Fetched<T> {
    /// 200 with a readable body.
    Found(T),
    /// 404.
    NotFound,
    /// Another status, or a body of the wrong shape.
    Unreadable(String),
    /// No answer after [`limits::BOOK_CHECK_ATTEMPTS`] tries.
    Unanswered(String),
}

/// What the check read from the server.
#[derive(Debug, Clone, Default)]
pub struct Observed {
    /// SKUs read before the orders.
    pub skus_before: BTreeMap<String, Fetched<SkuView>>,
    /// Acked orders, by id.
    pub orders: BTreeMap<String, Fetched<OrderView>>,
    /// SKUs read after the orders.
    pub skus_after: BTreeMap<String, Fetched<SkuView>>,
}

/// The verdict, as written to `report.json`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct BookReport {
    /// No violation and nothing left unverified.
    pub ok: bool,
    /// Units granted beyond what was stocked, summed over SKUs.
    pub oversold: u64,
    /// Acked orders absent, altered or duplicated, plus acked live units that
    /// their SKU does not count as granted.
    pub acked_missing: u64,
    /// Acked orders in a state the run cannot explain, or whose money does not
    /// add up; 201 answers without a readable order.
    pub inconsistent: u64,
    /// SKUs whose counters do not balance.
    pub sku_invariant: u64,
    /// Units granted that neither an acked order nor an unanswered request
    /// explains.
    pub phantom_units: u64,
    /// Reads the check could not make (no answer).
    pub unverified: u64,
    /// Acked orders read back.
    pub orders_checked: u64,
    /// SKUs read back.
    pub skus_checked: u64,
    /// Units of order requests that got no answer (allowed either way).
    pub unknown_units: u64,
    /// The first violations, in words.
    pub violations: Vec<String>,
}

impl BookReport {
    fn violation(&mut self, text: String) {
        if self.violations.len() < limits::VIOLATIONS_LISTED_MAX {
            self.violations.push(text);
        }
    }

    /// Total violations of every kind.
    #[must_use]
    pub fn violation_count(&self) -> u64 {
        [
            self.oversold,
            self.acked_missing,
            self.inconsistent,
            self.sku_invariant,
            self.phantom_units,
            self.unverified,
        ]
        .iter()
        .fold(0_u64, |acc, n| acc.saturating_add(*n))
    }
}

const LIVE_STATUSES: [&str; 4] = ["reserved", "paid", "shipped", "delivered"];
const ALL_STATUSES: [&str; 7] = [
    "reserved",
    "paid",
    "shipped",
    "delivered",
    "cancelled",
    "expired",
    "refunded",
];

fn allowed_statuses(order: &AckedOrder) -> &'static [&'static str] {
    if order.uncertain {
        return &ALL_STATUSES;
    }
    match order.state {
        AckedState::Reserved => &["reserved", "expired"],
        AckedState::Paid => &["paid"],
        AckedState::Cancelled => &["cancelled"],
        AckedState::Refunded => &["refunded"],
    }
}

fn sorted_lines(lines: impl Iterator<Item = (String, u64)>) -> Vec<(String, u64)> {
    let mut v: Vec<(String, u64)> = lines.collect();
    v.sort();
    v
}

/// Why an order's money or lines cannot be right, if they cannot.
fn money_problem(order: &OrderView) -> Option<String> {
    let mut subtotal = 0_u64;
    let mut line_discounts = 0_u64;
    for line in &order.lines {
        if line.refunded_qty > line.qty {
            return Some(format!(
                "line {} refunded {} of {}",
                line.sku_id, line.refunded_qty, line.qty
            ));
        }
        let amount = line.qty.checked_mul(line.unit_price_cents)?;
        subtotal = subtotal.checked_add(amount)?;
        line_discounts = line_discounts.checked_add(line.discount_cents)?;
    }
    if subtotal != order.subtotal_cents {
        return Some(format!(
            "subtotal {} but lines add to {subtotal}",
            order.subtotal_cents
        ));
    }
    if line_discounts != order.discount_cents {
        return Some(format!(
            "discount {} but lines add to {line_discounts}",
            order.discount_cents
        ));
    }
    if order.subtotal_cents.checked_sub(order.discount_cents) != Some(order.total_cents) {
        return Some(format!(
            "total {} is not subtotal {} - discount {}",
            order.total_cents, order.subtotal_cents, order.discount_cents
        ));
    }
    if order.refunded_cents > order.paid_cents {
        return Some(format!(
            "refunded {} > paid {}",
            order.refunded_cents, order.paid_cents
        ));
    }
    let paid_expected = match order.status.as_str() {
        "reserved" | "cancelled" | "expired" => 0,
        _ => order.total_cents,
    };
    if order.paid_cents != paid_expected {
        return Some(format!(
            "status {} with paid_cents {}",
            order.status, order.paid_cents
        ));
    }
    if order.status == "refunded" && order.lines.iter().any(|l| l.refunded_qty != l.qty) {
        return Some("refunded, but not every unit is".to_owned());
    }
    None
}

/// Sums units per SKU that acked orders still hold, and counts order
/// violations into `report`.
fn check_orders(
    input: &BookInput,
    observed: &Observed,
    report: &mut BookReport,
) -> BTreeMap<String, u64> {
    let mut live_units: BTreeMap<String, u64> = BTreeMap::new();
    let mut seen: BTreeSet<&str> = BTreeSet::new();
    for acked in &input.acked {
        if !seen.insert(acked.order_id.as_str()) {
            report.acked_missing = report.acked_missing.saturating_add(1);
            report.violation(format!(
                "order {} was acked (201) to two different requests",
                acked.order_id
            ));
            continue;
        }
        let id = &acked.order_id;
        match observed.orders.get(id) {
            None | Some(Fetched::Unanswered(_)) => {
                report.unverified = report.unverified.saturating_add(1);
                report.violation(format!("order {id}: the check got no answer"));
            }
            Some(Fetched::NotFound) => {
                report.acked_missing = report.acked_missing.saturating_add(1);
                report.violation(format!(
                    "order {id} was acked 201 to {} but GET answers 404",
                    acked.user_id
                ));
            }
            Some(Fetched::Unreadable(why)) => {
                report.inconsistent = report.inconsistent.saturating_add(1);
                report.violation(format!("order {id}: unreadable answer: {why}"));
            }
            Some(Fetched::Found(order)) => {
                report.orders_checked = report.orders_checked.saturating_add(1);
                let want = sorted_lines(acked.lines.iter().map(|l| (l.sku_id.clone(), l.qty)));
                let got = sorted_lines(order.lines.iter().map(|l| (l.sku_id.clone(), l.qty)));
                if order.user_id != acked.user_id || order.order_id != acked.order_id {
                    report.acked_missing = report.acked_missing.saturating_add(1);
                    report.violation(format!(
                        "order {id} was acked to {} but reads as {} of {}",
                        acked.user_id, order.order_id, order.user_id
                    ));
                    continue;
                }
                if want != got {
                    report.acked_missing = report.acked_missing.saturating_add(1);
                    report.violation(format!(
                        "order {id} was acked with lines {want:?} but reads {got:?}"
                    ));
                    continue;
                }
                if !allowed_statuses(acked).contains(&order.status.as_str()) {
                    report.inconsistent = report.inconsistent.saturating_add(1);
                    report.violation(format!(
                        "order {id} was last acked {:?} but reads {:?}",
                        acked.state, order.status
                    ));
                }
                if let Some(problem) = money_problem(order) {
                    report.inconsistent = report.inconsistent.saturating_add(1);
                    report.violation(format!("order {id}: {problem}"));
                }
                if LIVE_STATUSES.contains(&order.status.as_str()) {
                    for line in &order.lines {
                        let held = line.qty.saturating_sub(line.refunded_qty);
                        let slot = live_units.entry(line.sku_id.clone()).or_insert(0);
                        *slot = slot.saturating_add(held);
                    }
                }
            }
        }
    }
    live_units
}

/// Units a SKU counts as granted: `reserved + allocated + shipped`.
fn granted(sku: &SkuView) -> Option<u64> {
    sku.reserved
        .checked_add(sku.allocated)?
        .checked_add(sku.shipped)
}

fn balance_problem(sku: &SkuView, stock_in: u64) -> Option<String> {
    let sum = sku
        .available
        .checked_add(sku.reserved)
        .and_then(|s| s.checked_add(sku.allocated));
    if sum != Some(sku.on_hand) {
        return Some(format!(
            "on_hand {} != available {} + reserved {} + allocated {}",
            sku.on_hand, sku.available, sku.reserved, sku.allocated
        ));
    }
    if sku.on_hand.checked_add(sku.shipped) != Some(stock_in) {
        return Some(format!(
            "on_hand {} + shipped {} != stock_in {stock_in}",
            sku.on_hand, sku.shipped
        ));
    }
    None
}

/// Judges what the server showed against what the run was told.
#[must_use]
pub fn evaluate(input: &BookInput, observed: &Observed) -> BookReport {
    let mut report = BookReport {
        unknown_units: input
            .unknown_units
            .values()
            .fold(0_u64, |a, n| a.saturating_add(*n)),
        ..BookReport::default()
    };
    if input.unreadable_acks > 0 {
        report.inconsistent = report.inconsistent.saturating_add(input.unreadable_acks);
        report.violation(format!(
            "{} answers were 201 without a readable order",
            input.unreadable_acks
        ));
    }
    let live_units = check_orders(input, observed, &mut report);

    for expect in &input.skus {
        let id = &expect.sku_id;
        let before = observed.skus_before.get(id);
        let after = observed.skus_after.get(id);
        let (before, after) = match (before, after) {
            (Some(Fetched::Found(b)), Some(Fetched::Found(a))) => (*b, *a),
            (Some(Fetched::NotFound), _) | (_, Some(Fetched::NotFound)) => {
                report.acked_missing = report.acked_missing.saturating_add(1);
                report.violation(format!("SKU {id} was created (201) but GET answers 404"));
                continue;
            }
            (Some(Fetched::Unreadable(why)), _) | (_, Some(Fetched::Unreadable(why))) => {
                report.inconsistent = report.inconsistent.saturating_add(1);
                report.violation(format!("SKU {id}: unreadable answer: {why}"));
                continue;
            }
            _ => {
                report.unverified = report.unverified.saturating_add(1);
                report.violation(format!("SKU {id}: the check got no answer"));
                continue;
            }
        };
        report.skus_checked = report.skus_checked.saturating_add(1);
        let problem = balance_problem(&before, expect.stock_in)
            .map(|p| format!("{p} (before the order reads)"))
            .or_else(|| balance_problem(&after, expect.stock_in).map(|p| format!("{p} (after)")));
        if let Some(problem) = problem {
            report.sku_invariant = report.sku_invariant.saturating_add(1);
            report.violation(format!("SKU {id}: {problem}"));
        }
        let (Some(granted_before), Some(granted_after)) = (granted(&before), granted(&after))
        else {
            report.sku_invariant = report.sku_invariant.saturating_add(1);
            report.violation(format!(
                "SKU {id}: reserved + allocated + shipped overflows"
            ));
            continue;
        };
        let most = granted_before.max(granted_after);
        if most > expect.stock_in {
            let over = most.saturating_sub(expect.stock_in);
            report.oversold = report.oversold.saturating_add(over);
            report.violation(format!(
                "SKU {id}: {most} units granted, only {} stocked (oversold by {over})",
                expect.stock_in
            ));
        }
        let live = live_units.get(id).copied().unwrap_or(0);
        if granted_before < live {
            let short = live.saturating_sub(granted_before);
            report.acked_missing = report.acked_missing.saturating_add(short);
            report.violation(format!(
                "SKU {id}: acked live orders hold {live} units but the SKU counts {granted_before} granted"
            ));
        }
        let unknown = input.unknown_units.get(id).copied().unwrap_or(0);
        let explained = live.saturating_add(unknown);
        if granted_after > explained {
            let extra = granted_after.saturating_sub(explained);
            report.phantom_units = report.phantom_units.saturating_add(extra);
            report.violation(format!(
                "SKU {id}: {granted_after} units granted, but acked orders hold {live} and \
                 unanswered requests at most {unknown}"
            ));
        }
    }
    report.ok = report.violation_count() == 0;
    report
}

/// Percent-encodes one path segment (ids are plain, but never trust that).
#[must_use]
pub fn path_segment(raw: &str) -> String {
    let mut out = String::with_capacity(raw.len());
    for byte in raw.bytes() {
        if byte.is_ascii_alphanumeric() || matches!(byte, b'-' | b'_' | b'.' | b'~') {
            out.push(char::from(byte));
        } else {
            out.push_str(&format!("%{byte:02X}"));
        }
    }
    out
}

/// Reads `path` with retries; 200 is parsed into `T`.
async fn fetch<T: serde::de::DeserializeOwned>(
    conn: &mut Conn,
    path: &str,
    token: &str,
) -> Fetched<T> {
    let mut last = String::new();
    for attempt in 0..limits::BOOK_CHECK_ATTEMPTS {
        if attempt > 0 {
            tokio::time::sleep(limits::BOOK_CHECK_RETRY_PAUSE).await;
        }
        match conn.send(&Call::get(path).token(token)).await {
            Ok(answer) if answer.status == 200 => {
                return match answer.json::<T>() {
                    Ok(value) => Fetched::Found(value),
                    Err(e) => Fetched::Unreadable(format!("{e}: {}", answer.body_excerpt())),
                };
            }
            Ok(answer) if answer.status == 404 => return Fetched::NotFound,
            Ok(answer) if answer.status >= 500 => {
                last = format!("{} {}", answer.status, answer.body_excerpt());
            }
            Ok(answer) => {
                return Fetched::Unreadable(format!("{} {}", answer.status, answer.body_excerpt()));
            }
            Err(failure) => last = failure.label().to_owned(),
        }
    }
    Fetched::Unanswered(last)
}

async fn read_skus(
    conn: &mut Conn,
    input: &BookInput,
    token: &str,
) -> BTreeMap<String, Fetched<SkuView>> {
    let mut out = BTreeMap::new();
    for sku in &input.skus {
        let path = format!("/v1/skus/{}", path_segment(&sku.sku_id));
        out.insert(
            sku.sku_id.clone(),
            fetch::<SkuView>(conn, &path, token).await,
        );
    }
    out
}

/// Reads the books back from the server at `addr` with an admin token and
/// judges them ([`evaluate`]).
///
/// # Errors
///
/// Only for a broken setup (a connection handle could not be made or a
/// reading task panicked); unanswered reads are counted as `unverified`.
pub async fn check(
    addr: SocketAddr,
    timeout: Duration,
    admin_token: &str,
    input: &BookInput,
    connections: u32,
) -> Result<BookReport> {
    let mut conn = Conn::new(addr, timeout)?;
    let skus_before = read_skus(&mut conn, input, admin_token).await;

    let ids: Vec<String> = input
        .acked
        .iter()
        .map(|o| o.order_id.clone())
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect();
    let workers =
        usize::try_from(connections.clamp(1, limits::BOOK_CHECK_CONNECTIONS_MAX)).unwrap_or(1);
    let mut tasks = Vec::with_capacity(workers);
    for w in 0..workers {
        let share: Vec<String> = ids.iter().skip(w).step_by(workers).cloned().collect();
        if share.is_empty() {
            continue;
        }
        let mut worker_conn = Conn::new(addr, timeout)?;
        let token = admin_token.to_owned();
        tasks.push(tokio::spawn(async move {
            let mut found = Vec::with_capacity(share.len());
            for id in share {
                let path = format!("/v1/orders/{}", path_segment(&id));
                let fetched = fetch::<OrderView>(&mut worker_conn, &path, &token).await;
                found.push((id, fetched));
            }
            found
        }));
    }
    let mut orders = BTreeMap::new();
    for task in tasks {
        orders.extend(task.await.context("a book-check reader panicked")?);
    }

    let skus_after = read_skus(&mut conn, input, admin_token).await;
    Ok(evaluate(
        input,
        &Observed {
            skus_before,
            orders,
            skus_after,
        },
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn acked(id: &str, user: &str, qty: u64) -> AckedOrder {
        AckedOrder {
            order_id: id.into(),
            user_id: user.into(),
            lines: vec![Line {
                sku_id: "hot".into(),
                qty,
            }],
            state: AckedState::Reserved,
            uncertain: false,
        }
    }

    fn order(id: &str, user: &str, qty: u64, status: &str) -> OrderView {
        OrderView {
            order_id: id.into(),
            user_id: user.into(),
            status: status.into(),
            lines: vec![OrderLineView {
                sku_id: "hot".into(),
                qty,
                unit_price_cents: 100,
                discount_cents: 0,
                refunded_qty: 0,
            }],
            subtotal_cents: 100 * qty,
            discount_cents: 0,
            total_cents: 100 * qty,
            paid_cents: 0,
            refunded_cents: 0,
        }
    }

    fn sku(stock: u64, reserved: u64) -> SkuView {
        SkuView {
            on_hand: stock,
            available: stock - reserved,
            reserved,
            allocated: 0,
            shipped: 0,
        }
    }

    /// Two acked orders of one unit each, on a SKU of 10.
    fn clean() -> (BookInput, Observed) {
        let input = BookInput {
            skus: vec![SkuExpect {
                sku_id: "hot".into(),
                stock_in: 10,
            }],
            acked: vec![acked("o1", "buyer-1", 1), acked("o2", "buyer-2", 1)],
            ..BookInput::default()
        };
        let mut observed = Observed::default();
        observed.orders.insert(
            "o1".into(),
            Fetched::Found(order("o1", "buyer-1", 1, "reserved")),
        );
        observed.orders.insert(
            "o2".into(),
            Fetched::Found(order("o2", "buyer-2", 1, "reserved")),
        );
        observed
            .skus_before
            .insert("hot".into(), Fetched::Found(sku(10, 2)));
        observed
            .skus_after
            .insert("hot".into(), Fetched::Found(sku(10, 2)));
        (input, observed)
    }

    #[test]
    fn a_clean_book_passes() {
        let (input, observed) = clean();
        let report = evaluate(&input, &observed);
        assert!(report.ok, "{report:?}");
        assert_eq!(report.orders_checked, 2);
        assert_eq!(report.skus_checked, 1);
        assert!(report.violations.is_empty());
    }

    #[test]
    fn an_acked_order_that_is_404_is_missing() {
        let (input, mut observed) = clean();
        observed.orders.insert("o2".into(), Fetched::NotFound);
        let report = evaluate(&input, &observed);
        assert!(!report.ok);
        assert_eq!(report.acked_missing, 1);
    }

    #[test]
    fn an_acked_order_with_another_qty_or_user_is_caught() {
        let (input, mut observed) = clean();
        observed.orders.insert(
            "o1".into(),
            Fetched::Found(order("o1", "buyer-1", 2, "reserved")),
        );
        let report = evaluate(&input, &observed);
        assert!(!report.ok);
        assert_eq!(report.acked_missing, 1);

        let (input, mut observed) = clean();
        observed.orders.insert(
            "o1".into(),
            Fetched::Found(order("o1", "buyer-9", 1, "reserved")),
        );
        let report = evaluate(&input, &observed);
        assert_eq!(report.acked_missing, 1);
        assert!(
            report.violations[0].contains("buyer-9"),
            "{:?}",
            report.violations
        );
    }

    #[test]
    fn unbalanced_counters_are_caught() {
        let (input, mut observed) = clean();
        let mut bad = sku(10, 2);
        bad.available += 1;
        observed
            .skus_after
            .insert("hot".into(), Fetched::Found(bad));
        let report = evaluate(&input, &observed);
        assert!(!report.ok);
        assert_eq!(report.sku_invariant, 1);
    }

    #[test]
    fn granting_more_than_the_stock_is_oversold() {
        let (mut input, mut observed) = clean();
        // Stock 2, but the server granted 3 (and the counters even balance).
        input.skus[0].stock_in = 2;
        input.acked.push(acked("o3", "buyer-3", 1));
        observed.orders.insert(
            "o3".into(),
            Fetched::Found(order("o3", "buyer-3", 1, "reserved")),
        );
        let over = SkuView {
            on_hand: 3,
            available: 0,
            reserved: 3,
            allocated: 0,
            shipped: 0,
        };
        observed
            .skus_before
            .insert("hot".into(), Fetched::Found(over));
        observed
            .skus_after
            .insert("hot".into(), Fetched::Found(over));
        let report = evaluate(&input, &observed);
        assert!(!report.ok);
        assert_eq!(report.oversold, 1);
    }

    #[test]
    fn acked_units_the_sku_forgot_are_missing() {
        let (input, mut observed) = clean();
        observed
            .skus_before
            .insert("hot".into(), Fetched::Found(sku(10, 1)));
        observed
            .skus_after
            .insert("hot".into(), Fetched::Found(sku(10, 1)));
        let report = evaluate(&input, &observed);
        assert_eq!(report.acked_missing, 1);
        assert!(!report.ok);
    }

    #[test]
    fn unanswered_requests_explain_extra_grants_but_nothing_else() {
        let (mut input, mut observed) = clean();
        observed
            .skus_before
            .insert("hot".into(), Fetched::Found(sku(10, 3)));
        observed
            .skus_after
            .insert("hot".into(), Fetched::Found(sku(10, 3)));
        let report = evaluate(&input, &observed);
        assert_eq!(report.phantom_units, 1, "a grant nobody asked for");
        input.unknown_units.insert("hot".into(), 1);
        let report = evaluate(&input, &observed);
        assert!(
            report.ok,
            "an unanswered request may have happened: {report:?}"
        );
        assert_eq!(report.unknown_units, 1);
    }

    #[test]
    fn expired_reservations_are_fine_and_not_counted_live() {
        let (input, mut observed) = clean();
        observed.orders.insert(
            "o2".into(),
            Fetched::Found(order("o2", "buyer-2", 1, "expired")),
        );
        // Expired between the two SKU reads: 2 granted before, 1 after.
        observed
            .skus_after
            .insert("hot".into(), Fetched::Found(sku(10, 1)));
        let report = evaluate(&input, &observed);
        assert!(report.ok, "{report:?}");
    }

    #[test]
    fn states_and_money_must_make_sense() {
        let (input, mut observed) = clean();
        observed.orders.insert(
            "o1".into(),
            Fetched::Found(order("o1", "buyer-1", 1, "paid")),
        );
        let report = evaluate(&input, &observed);
        // Never paid by us, and paid_cents 0 for a paid order: two problems.
        assert_eq!(report.inconsistent, 2, "{report:?}");

        let (input, mut observed) = clean();
        let mut wrong_total = order("o1", "buyer-1", 1, "reserved");
        wrong_total.total_cents = 1;
        observed
            .orders
            .insert("o1".into(), Fetched::Found(wrong_total));
        assert_eq!(evaluate(&input, &observed).inconsistent, 1);
    }

    #[test]
    fn duplicated_acks_and_unverified_reads_fail_the_book() {
        let (mut input, observed) = clean();
        input.acked.push(acked("o1", "buyer-1", 1));
        assert_eq!(evaluate(&input, &observed).acked_missing, 1);

        let (input, mut observed) = clean();
        observed
            .orders
            .insert("o1".into(), Fetched::Unanswered("timeout".into()));
        let report = evaluate(&input, &observed);
        assert_eq!(report.unverified, 1);
        assert!(!report.ok);
    }

    #[test]
    fn path_segments_are_encoded() {
        assert_eq!(path_segment("flash-1.a_b"), "flash-1.a_b");
        assert_eq!(path_segment("a/b c"), "a%2Fb%20c");
    }
}
